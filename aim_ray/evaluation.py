"""lm-eval runners: `evaluate` in-process, `EvalActor` as a long-lived Ray actor, results appended to parquet.

Backends: `hf` (transformers, CPU or GPU; loads each model directory) and `vllm` (GPU; one `vllm.LLM` engine per
worker for its whole life: the next model's weights are reloaded into it in place, then lm-eval runs on the live
engine through a `VLLM` LM object that wraps it instead of building its own). vllm is imported lazily, only by
the vllm backend.

Scores are normalised to [0, 1] by each metric's declared range (`METRIC_RANGES`, or a task's own
`metadata: {metric_ranges: {metric: [lo, hi]}}`); `primary_metric` names the headline metric of a task.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from aim_ray.errors import CheckpointError, ConfigError

PAPER_TASKS = ("humaneval", "mbpp", "mmlu", "minerva_math", "gsm8k", "ifeval")
_CODE_TASK_PREFIXES = ("humaneval", "mbpp")  # their metrics execute model-generated code

# Headline metric per task ("metric" or "metric,filter" as lm-eval names them, ",none" dropped).
PRIMARY_METRICS = {
    "humaneval": "pass@1,create_test",
    "mbpp": "pass_at_1",
    "mmlu": "acc",
    "minerva_math": "exact_match",
    "hendrycks_math": "exact_match",
    "gsm8k": "exact_match,strict-match",
    "ifeval": "prompt_level_strict_acc",
}
_FALLBACK_METRICS = ("acc", "exact_match", "pass@1", "pass_at_1", "acc_norm", "f1", "em")
_UNBOUNDED_METRICS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loglikelihood", "ter"}
_FRACTION = (0.0, 1.0)
# The scale lm-eval reports each metric on. A score is (value - lo) / (hi - lo); a value outside its range is an
# error, never a guess (a 0.9 could be 0.9 or 0.9 %). Tasks declare others in their YAML's metadata.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "pass@1", "pass@10",
                     "pass_at_1", "prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                     "inst_level_loose_acc"), _FRACTION),
    "mcc": (-1.0, 1.0),
    **dict.fromkeys(("bleu", "chrf", "bleu_max"), (0.0, 100.0)),  # sacrebleu's percent scale
}

RESULTS_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("method", pa.string()),
    ("omega", pa.float64()),
    ("task", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("versions", pa.string()),  # JSON object: package -> version
])


# ---------------------------------------------------------------- suites and metrics


def is_code_task(task: str) -> bool:
    return task.startswith(_CODE_TASK_PREFIXES)


def check_code_execution(tasks: Sequence[str], allow_code_execution: bool) -> None:
    code = [t for t in tasks if is_code_task(t)]
    if code and not allow_code_execution:
        raise ConfigError(
            f"task(s) {code} score a model by executing the Python code it generates on this machine; "
            "run them only in a sandbox you trust and pass --allow-code-execution (allow_code_execution=True)"
        )


def resolve_suite(
    suite: str, tasks_dir: str | Path | None = None, allow_code_execution: bool = False
) -> tuple[list[str], str | None]:
    """`paper` | `real` | `toy` | a comma list of lm-eval task names -> (task names, include_path).

    `real` / `toy` without `tasks_dir` use that cached world (`aim_ray.worlds`, built on first use)."""
    name = suite.strip()
    if name == "paper":
        tasks = list(PAPER_TASKS)
    elif name in WORLD_SUITES:
        return _world_suite(name, tasks_dir)
    else:
        tasks = [t.strip() for t in name.split(",") if t.strip()]
        if not tasks:
            raise ConfigError(f"--suite {suite!r}: give 'paper', 'real', 'toy' or a comma list of lm-eval task names")
    check_code_execution(tasks, allow_code_execution)
    return tasks, str(tasks_dir) if tasks_dir else None


WORLD_SUITES = ("real", "toy")


def _world_suite(name: str, tasks_dir: str | Path | None) -> tuple[list[str], str]:
    if name == "real":
        from aim_ray.worlds import real_tasks as module
    else:
        from aim_ray.worlds import toy_tasks as module
    if tasks_dir is None:
        from aim_ray.worlds import load_world

        world = load_world(name)
        return list(world.task_names), str(world.tasks_dir)
    names = [module.task_name(k) for k in module.KINDS]
    missing = [n for n in names if not (Path(tasks_dir) / f"{n}.yaml").is_file()]
    if missing:
        raise ConfigError(f"tasks dir {tasks_dir} has no YAML for {name} task(s) {missing}")
    return names, str(tasks_dir)


def normalise_score(metric: str, value: float, declared: Mapping[str, Any] | None = None,
                    task: str = "") -> float | None:
    """`value` mapped from the metric's declared range to [0, 1] (perplexities stay as they are); None for a
    metric with no declared range (it is not used as a score)."""
    base = metric.split(",")[0]
    if base in _UNBOUNDED_METRICS:
        return float(value)
    bounds = (declared or {}).get(base) or METRIC_RANGES.get(base)
    if bounds is None:
        return None
    lo, hi = (float(b) for b in bounds)
    if not lo - 1e-9 <= value <= hi + 1e-9:
        raise ConfigError(f"task {task!r}: metric {metric!r} = {value} is outside its declared range [{lo}, {hi}]"
                          f"; declare the right one in the task YAML's metadata.metric_ranges")
    return (float(value) - lo) / (hi - lo)


def _declared_ranges(raw: Mapping[str, Any], task: str) -> Mapping[str, Any]:
    """The task YAML's `metadata.metric_ranges` (lm-eval returns each task's config under `configs`)."""
    metadata = (raw.get("configs", {}).get(task) or {}).get("metadata") or {}
    ranges = metadata.get("metric_ranges") or {}
    if not isinstance(ranges, Mapping) or any(not isinstance(r, Sequence) or len(r) != 2 or r[0] >= r[1]
                                              for r in ranges.values()):
        raise ConfigError(f"task {task!r}: metadata.metric_ranges must map metric names to [lo, hi] with lo < hi")
    return ranges


def primary_metric(task: str, results: Mapping[str, Any]) -> str:
    """The headline metric of `task` among those in `results` (a task's metric dict, or evaluate()'s output)."""
    metrics = results[task] if isinstance(results.get(task), Mapping) else results
    wanted = PRIMARY_METRICS.get(task)
    if wanted in metrics:
        return wanted
    for name in _FALLBACK_METRICS:
        for key in (name, *sorted(k for k in metrics if k.split(",")[0] == name)):
            if key in metrics:
                return key
    bounded = sorted(k for k in metrics if k.split(",")[0] not in _UNBOUNDED_METRICS)
    if not bounded:
        raise ConfigError(f"task {task!r} reported no metric usable as a score: {sorted(metrics)} (a metric "
                          f"needs a range: METRIC_RANGES or the task YAML's metadata.metric_ranges)")
    return bounded[0]


def _parse_results(raw: Mapping[str, Any], tasks: Sequence[str], subtasks: bool) -> dict[str, dict[str, float]]:
    """lm-eval's results (tasks and groups) -> task -> metric -> normalised value, stderr and labels dropped."""
    merged = {**raw.get("results", {}), **raw.get("groups", {})}
    out: dict[str, dict[str, float]] = {}
    for task, entries in merged.items():
        if not subtasks and task not in tasks:
            continue
        metrics = {}
        declared = _declared_ranges(raw, task)
        for key, value in entries.items():
            if "_stderr" in key or "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = key[: -len(",none")] if key.endswith(",none") else key
            score = normalise_score(name, value, declared, task)
            if score is not None:
                metrics[name] = score
        if metrics:
            out[task] = metrics
    return out


# ---------------------------------------------------------------- task managers (indexing all tasks takes ~6 s)

_TASK_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def _task_manager(include_path: str | Sequence[str] | None, tasks: Sequence[str]):
    """A cached TaskManager knowing `tasks`; without lm-eval's own tasks when the include path has them all."""
    from lm_eval.tasks import TaskManager

    paths = tuple(str(p) for p in ([include_path] if isinstance(include_path, str | Path) else include_path or []))
    for defaults in ((False, True) if paths else (True,)):
        key = (paths, defaults)
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=defaults)
        tm = _TASK_MANAGERS[key]
        unknown = [t for t in tasks if t not in tm.all_tasks]
        if not unknown:
            return tm
    where = f" (include path {list(paths)})" if paths else " (no include path given)"
    raise ConfigError(f"unknown lm-eval task(s) {unknown}{where}")


# ---------------------------------------------------------------- backends


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFBackend:
    """transformers models through lm-eval's HFLM; each model directory is loaded when evaluated."""

    name = "hf"

    def __init__(self, device: str | None = None, batch_size: int | str | None = None, dtype: str = "auto",
                 max_length: int | None = None, trust_remote_code: bool = False):
        self.device = device or _default_device()
        self.batch_size = batch_size or 32
        self.dtype = dtype
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.loads = 0

    def compute_dtype(self) -> str:
        """`auto` is the checkpoint's dtype on a GPU, float32 on a CPU: CPUs without native bf16 (AVX2 ones)
        emulate it, ~8x slower than float32 here."""
        if self.dtype == "auto" and not str(self.device).startswith("cuda"):
            return "float32"
        return self.dtype

    def load(self, model_dir: str | Path):
        from lm_eval.models.huggingface import HFLM

        self.loads += 1
        return HFLM(pretrained=str(model_dir), device=self.device, batch_size=self.batch_size,
                    dtype=self.compute_dtype(),
                    max_length=self.max_length, trust_remote_code=self.trust_remote_code)

    def close(self) -> None:
        pass


def _architecture(model_dir: str | Path) -> dict[str, Any]:
    """The config fields that fix tensor shapes: a reload into a live engine needs them all equal."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory")
    config = json.loads(path.read_text())
    keys = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {k: config.get(k) for k in keys}


class VLLMBackend:
    """One vLLM engine for the backend's life. Model 1 starts the engine; model k>1 is loaded in place:
    `collective_rpc("reload_weights", weights_path=...)` on every worker, then `reset_prefix_cache()` so no
    KV block computed with the old weights is reused."""

    name = "vllm"

    def __init__(self, tensor_parallel_size: int = 1, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, seed: int = 1234, batch_size: int | str = "auto",
                 max_gen_toks: int = 256, enforce_eager: bool = False, reload_api: str = "auto",
                 engine_kwargs: Mapping[str, Any] | None = None,
                 engine_factory: Callable[..., Any] | None = None,
                 lm_factory: Callable[..., Any] | None = None):
        if reload_api not in ("auto", "weights_path", "update_config"):
            raise ConfigError(f"reload_api must be auto, weights_path or update_config, not {reload_api!r}")
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.seed = seed
        self.batch_size = batch_size or "auto"
        self.max_gen_toks = max_gen_toks
        self.enforce_eager = enforce_eager
        self.reload_api = reload_api
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine_factory = engine_factory
        self._lm_factory = lm_factory or live_vllm_lm
        self.llm: Any = None
        self.current: str | None = None
        self._stamp: tuple | None = None
        self._arch: dict[str, Any] | None = None
        self.loads = 0
        self.engines_started = 0

    def engine_args(self, model_dir: str | Path) -> dict[str, Any]:
        args = {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": self.dtype,
                "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization, "seed": self.seed,
                "enforce_eager": self.enforce_eager}
        if self.max_model_len:
            args["max_model_len"] = int(self.max_model_len)
        return {**args, **self.engine_kwargs}

    def _start(self, model_dir: str) -> None:
        factory = self._engine_factory
        if factory is None:
            try:
                from vllm import LLM
            except ImportError as exc:
                raise ConfigError("backend 'vllm' needs vllm (pip install 'aim-ray[vllm]', CUDA only); "
                                  "use --backend hf on CPU") from exc
            factory = LLM
        self.llm = factory(**self.engine_args(model_dir))
        self.engines_started += 1

    def _reload(self, model_dir: str) -> None:
        if _architecture(model_dir) != self._arch:
            raise CheckpointError(f"{model_dir} does not have the architecture of the model the vLLM engine was "
                                  f"started with ({self.current}); start a new EvalActor for it")
        if self._resolved_reload_api() == "weights_path":
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_path": model_dir, "is_checkpoint_format": True})
        else:  # older vLLM: reload_weights() takes no argument and reads model_config.model
            self.llm.collective_rpc("update_config", args=({"model_config": {"model": model_dir}},))
            self.llm.collective_rpc("reload_weights")
        self.llm.reset_prefix_cache()

    def _resolved_reload_api(self) -> str:
        if self.reload_api != "auto":
            return self.reload_api
        try:
            from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        except ImportError:
            return "weights_path"
        params = inspect.signature(GPUModelRunner.reload_weights).parameters
        return "weights_path" if "weights_path" in params else "update_config"

    def load(self, model_dir: str | Path):
        path = str(Path(model_dir).absolute())
        stamp = weights_stamp(path)
        if self.llm is None:
            self._arch = _architecture(path)
            self._start(path)
        elif (path, stamp) != (self.current, self._stamp):  # a trial rewritten in place reloads too
            self._reload(path)
        self.current, self._stamp = path, stamp
        self.loads += 1
        return self._lm_factory(self.llm, path, tensor_parallel_size=self.tensor_parallel_size,
                                batch_size=self.batch_size, max_gen_toks=self.max_gen_toks,
                                max_length=self.max_model_len)

    def close(self) -> None:
        self.llm = None


def weights_stamp(model_dir: str | Path) -> tuple:
    """What identifies the weights in a directory without reading them: each weight file's name, size,
    mtime and inode (a rewrite through a temp file and rename changes the inode even within one mtime tick)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    return tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])


def live_vllm_lm(llm: Any, model_dir: str, *, tensor_parallel_size: int = 1, batch_size: int | str = "auto",
                 max_gen_toks: int = 256, max_length: int | None = None, add_bos_token: bool | None = None):
    """lm-eval's `VLLM` LM on an existing engine: same request handling, no engine of its own."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import configure_pad_token
    from lm_eval.models.vllm_causallms import VLLM
    from transformers import AutoConfig

    class LiveVLLM(VLLM):
        def __init__(self) -> None:  # replaces VLLM.__init__, which always calls LLM(...)
            TemplateLM.__init__(self)
            self.model = llm
            self.model_args = {"model": model_dir, "tensor_parallel_size": tensor_parallel_size}
            self._config = AutoConfig.from_pretrained(model_dir)
            self.tokenizer = configure_pad_token(llm.get_tokenizer(), model_config=self._config)
            self._max_length = max_length
            self.tensor_parallel_size = tensor_parallel_size
            self.data_parallel_size = 1
            self.batch_size = "auto" if isinstance(batch_size, str) else int(batch_size)
            self.add_bos_token = add_bos_token
            self.custom_prefix_token_id = None
            self._max_gen_toks = max_gen_toks
            self.truncation_side = "left"
            self.think_end_token = None
            self.enable_thinking = None
            self.chat_template_args = {}
            self.hf_chat_template = None
            self.lora_request = None

    return LiveVLLM()


def make_backend(backend: str, **options: Any):
    classes = {"hf": HFBackend, "vllm": VLLMBackend}
    if backend not in classes:
        raise ConfigError(f"--backend must be 'hf' or 'vllm', not {backend!r}")
    if backend == "vllm":
        options.pop("device", None)  # vLLM places itself (CUDA_VISIBLE_DEVICES / the actor's GPUs)
    elif options.get("tensor_parallel_size", 1) == 1:
        options.pop("tensor_parallel_size", None)  # the neutral value: hf runs on one device anyway
    known = inspect.signature(classes[backend]).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"backend {backend!r} has no option(s) {unknown}; known: {sorted(known)}")
    return classes[backend](**options)


# ---------------------------------------------------------------- the worker (plain class) and its Ray actor


def runtime_versions() -> dict[str, str]:
    packages = {"aim-ray": "aim-ray", "lm-eval": "lm_eval", "torch": "torch", "transformers": "transformers",
                "vllm": "vllm"}
    out = {}
    for label, dist in packages.items():
        try:
            out[label] = version(dist)
        except PackageNotFoundError:
            if label != "vllm":
                out[label] = "unknown"
    return out


def _now() -> datetime:
    return datetime.now(timezone.utc)


class EvalWorker:
    """Runs lm-eval for one model after another on a backend that stays alive between models.

    `tasks`, `include_path`, `limit` and `allow_code_execution` given here are the defaults of every call
    (a sweep configures its actor once and then only sends model directories)."""

    def __init__(self, backend: str = "hf", *, tasks: str | Sequence[str] | None = None,
                 include_path: str | Sequence[str] | None = None, limit: int | float | None = None,
                 allow_code_execution: bool = False, **backend_options: Any):
        self.backend = make_backend(backend, **backend_options)
        self.defaults = {"tasks": tasks, "include_path": include_path, "limit": limit,
                         "allow_code_execution": allow_code_execution}
        if tasks is not None:  # fail at creation, not at the first model
            _task_list(tasks, include_path, allow_code_execution)
        self.evaluated: list[str] = []
        self.spans: list[tuple[str, float, float]] = []  # (model, start, end) in wall-clock seconds

    def evaluate(self, model_dir: str | Path, tasks: str | Sequence[str] | None = None, *,
                 limit: int | float | None = None, include_path: str | Sequence[str] | None = None,
                 allow_code_execution: bool | None = None, num_fewshot: int | None = None,
                 gen_kwargs: str | dict | None = None, subtasks: bool = False,
                 bootstrap_iters: int = 0) -> dict[str, dict[str, float]]:
        """task -> metric -> score in [0, 1]. `tasks`: names, or a suite string (see `resolve_suite`)."""
        from lm_eval import simple_evaluate

        tasks = tasks if tasks is not None else self.defaults["tasks"]
        if tasks is None:
            raise ConfigError("no tasks to evaluate: pass tasks (or give the worker default tasks)")
        limit = limit if limit is not None else self.defaults["limit"]
        include_path = include_path if include_path is not None else self.defaults["include_path"]
        code = self.defaults["allow_code_execution"] if allow_code_execution is None else allow_code_execution
        names, include = _task_list(tasks, include_path, code)
        manager = _task_manager(include, names)
        _check_model(model_dir)
        started = time.time()
        lm = self.backend.load(model_dir)
        with _code_eval_env(code and any(is_code_task(t) for t in names)):
            raw = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, gen_kwargs=gen_kwargs, log_samples=False,
                                  bootstrap_iters=bootstrap_iters, confirm_run_unsafe_code=code)
        self.evaluated.append(str(model_dir))
        self.spans.append((str(model_dir), started, time.time()))
        return _parse_results(raw or {}, names, subtasks)

    def score(self, model_dir: str | Path, tasks: str | Sequence[str] | None = None, **kwargs: Any
              ) -> dict[str, float]:
        """task -> its primary metric's score in [0, 1]: the vector HV gain is computed on."""
        results = self.evaluate(model_dir, tasks, **kwargs)
        return {task: metrics[primary_metric(task, metrics)] for task, metrics in results.items()}

    def evaluate_rows(self, model_dir: str | Path, tasks: str | Sequence[str] | None = None, *,
                      model: str | None = None, method: str | None = None, omega: float | None = None,
                      **kwargs: Any) -> list[dict]:
        """Like `evaluate`, as rows for `append_results` (timestamps and package versions included)."""
        started = _now()
        scores = self.evaluate(model_dir, tasks, **kwargs)
        return score_rows(model or str(model_dir), scores, method=method, omega=omega, started_at=started,
                          finished_at=_now(), versions=runtime_versions())

    def info(self) -> dict[str, Any]:
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"pid": os.getpid(), "node_id": node, "backend": self.backend.name, "evaluated": list(self.evaluated),
                "spans": list(self.spans), "loads": self.backend.loads,
                "engines_started": getattr(self.backend, "engines_started", 0)}

    def close(self) -> None:
        self.backend.close()


def _check_model(model_dir: str | Path) -> None:
    """A local checkpoint directory, or (hf backend) a hub id such as `org/name`."""
    if not Path(model_dir).is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(model_dir)):
        raise CheckpointError(f"model directory {model_dir} does not exist")


# Create with EvalActor.options(name=..., num_gpus=..., lifetime=...).remote(backend, **options).
EvalActor = ray.remote(EvalWorker)


def _task_list(tasks: str | Sequence[str], include_path, allow_code_execution: bool):
    paths = [str(include_path)] if isinstance(include_path, str | Path) else [str(p) for p in include_path or []]
    if isinstance(tasks, str):
        tasks_dir = paths[0] if len(paths) == 1 else None
        names, suite_include = resolve_suite(tasks, tasks_dir, allow_code_execution=allow_code_execution)
        if suite_include and suite_include not in paths:
            paths.append(suite_include)
    else:
        names = list(tasks)
        check_code_execution(names, allow_code_execution)
    return names, paths or None


@contextmanager
def _code_eval_env(enabled: bool) -> Iterator[None]:
    """HF's code_eval metric refuses to run unless HF_ALLOW_CODE_EVAL=1: set it only for runs allowed to."""
    if not enabled:
        yield
        return
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


def evaluate(model_dir: str | Path, tasks: str | Sequence[str], backend: str = "hf", *,
             limit: int | float | None = None, batch_size: int | str | None = None, device: str | None = None,
             include_path: str | Sequence[str] | None = None, allow_code_execution: bool = False,
             num_fewshot: int | None = None, dtype: str = "auto", tensor_parallel_size: int = 1,
             **backend_options: Any) -> dict[str, dict[str, float]]:
    """Evaluate one model in this process: task -> metric -> score in [0, 1]."""
    options = {"device": device, "batch_size": batch_size, "dtype": dtype, **backend_options}
    if backend == "vllm":
        options["tensor_parallel_size"] = tensor_parallel_size
    worker = EvalWorker(backend, **options)
    try:
        return worker.evaluate(model_dir, tasks, limit=limit, include_path=include_path,
                               allow_code_execution=allow_code_execution, num_fewshot=num_fewshot)
    finally:
        worker.close()


# ---------------------------------------------------------------- results table


def score_rows(model: str, scores: Mapping[str, Mapping[str, float]], *, method: str | None = None,
               omega: float | None = None, started_at: datetime | None = None,
               finished_at: datetime | None = None, versions: Mapping[str, str] | None = None) -> list[dict]:
    """One row per (task, metric) of `evaluate`'s output, in RESULTS_SCHEMA's columns."""
    finished = finished_at or _now()
    meta = {"model": str(model), "method": method, "omega": None if omega is None else float(omega),
            "started_at": started_at or finished, "finished_at": finished,
            "versions": json.dumps(dict(versions or runtime_versions()), sort_keys=True)}
    return [{**meta, "task": task, "metric": metric, "value": float(value)}
            for task, metrics in scores.items() for metric, value in metrics.items()]


def _to_table(rows: Sequence[Mapping[str, Any]] | pa.Table) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)
    required = {"model", "task", "metric", "value"}
    clean = []
    for i, row in enumerate(rows):
        missing = required - set(row)
        extra = set(row) - set(RESULTS_SCHEMA.names)
        if missing or extra:
            raise ConfigError(f"result row {i}: missing column(s) {sorted(missing)}, unknown {sorted(extra)}")
        r = {name: row.get(name) for name in RESULTS_SCHEMA.names}
        if isinstance(r["versions"], Mapping):
            r["versions"] = json.dumps(dict(r["versions"]), sort_keys=True)
        for key in ("started_at", "finished_at"):
            if isinstance(r[key], str):
                r[key] = datetime.fromisoformat(r[key])
        clean.append(r)
    return pa.Table.from_pylist(clean, schema=RESULTS_SCHEMA)


def read_results(path: str | Path) -> pa.Table:
    table = pq.read_table(path)
    if not table.schema.equals(RESULTS_SCHEMA, check_metadata=False):
        raise ConfigError(f"{path} is not an aim-ray results table: schema\n{table.schema}\nexpected\n"
                          f"{RESULTS_SCHEMA}")
    return table


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write appends by concurrent processes (e.g. Tune trials on one node)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_results(path: str | Path, rows: Sequence[Mapping[str, Any]] | pa.Table) -> int:
    """Append rows to the parquet table at `path` (created if absent); return its row count.

    The table is rewritten to a temporary file and renamed over the old one, so a crash leaves either the old
    or the new table, never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = _to_table(rows)
    with _locked(path):
        table = pa.concat_tables([read_results(path), new]) if path.exists() else new
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return table.num_rows
