"""Evaluation: EvalActor on a real local Ray cluster (hf backend, CPU), parquet results, suites, and the vLLM
backend's engine arguments and in-place reload sequence (fake engine here; the real one under @pytest.mark.gpu)."""

from __future__ import annotations

import importlib.util
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from aim_ray.errors import CheckpointError, ConfigError
from aim_ray.evaluation import (
    PAPER_TASKS,
    RESULTS_SCHEMA,
    EvalActor,
    EvalWorker,
    VLLMBackend,
    _parse_results,
    append_results,
    evaluate,
    normalise_score,
    primary_metric,
    read_results,
    resolve_suite,
    score_rows,
)
from aim_ray.worlds import toy

LIMIT = 50


@pytest.fixture(scope="module")
def ray_cluster():
    # Resource arguments only when starting a local cluster (they raise when attaching to one).
    ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": 2}), include_dashboard=False)
    yield
    ray.shutdown()


def _acc(scores):
    return {task: metrics["acc"] for task, metrics in scores.items()}


# ---------------------------------------------------------------- hf backend through a Ray actor


def test_eval_actor_scores_two_models_in_a_row(ray_cluster, toy_world, tmp_path):
    kwargs = {"include_path": str(toy_world.tasks_dir), "limit": LIMIT}
    actor = EvalActor.options(name="eval-hf-test", num_cpus=1).remote(
        "hf", tasks=toy_world.task_names, device="cpu", batch_size=64, **kwargs)
    rows_base = ray.get(actor.evaluate_rows.remote(str(toy_world.base), model="base"))
    rows_add = ray.get(actor.evaluate_rows.remote(str(toy_world.experts["add"]), model="add-expert",
                                                  method="expert", omega=1.0))
    vector = ray.get(ray.get_actor("eval-hf-test").score.remote(str(toy_world.experts["add"])))
    info = ray.get(actor.info.remote())
    assert info["backend"] == "hf" and info["loads"] == 3  # one actor process served every model
    assert info["evaluated"] == [str(toy_world.base)] + [str(toy_world.experts["add"])] * 2
    assert info["pid"] != os.getpid()

    base = {r["task"]: r["value"] for r in rows_base}
    add = {r["task"]: r["value"] for r in rows_add}
    assert set(base) == set(toy_world.task_names)
    assert add["toy_add"] > base["toy_add"] + 0.3 and add["toy_know"] < base["toy_know"]
    assert vector == add  # score(): the primary metric (acc) per task
    local = _acc(evaluate(toy_world.base, toy_world.task_names, device="cpu", batch_size=64, **kwargs))
    assert base == local  # the actor computes what an in-process run computes

    path = tmp_path / "results.parquet"
    assert append_results(path, rows_base) == len(rows_base)
    assert append_results(path, rows_add) == len(rows_base) + len(rows_add)
    table = read_results(path)
    assert table.schema.equals(RESULTS_SCHEMA)
    back = table.to_pylist()
    assert [r["value"] for r in back] == [r["value"] for r in rows_base + rows_add]
    assert back[-1]["model"] == "add-expert" and back[-1]["omega"] == 1.0 and back[0]["method"] is None
    assert back[0]["started_at"] <= back[0]["finished_at"]
    versions = json.loads(back[0]["versions"])
    assert {"aim-ray", "lm-eval", "torch", "transformers"} <= set(versions)
    ray.kill(actor)


# ---------------------------------------------------------------- results table


def _rows(n=2, **extra):
    scores = {f"task{i}": {"acc": i / 10} for i in range(n)}
    return score_rows("m", scores, versions={"torch": "x"}, **extra)


def test_append_results_is_atomic_and_checks_schema(tmp_path):
    path = tmp_path / "r.parquet"
    append_results(path, _rows(3, method="ties", omega=0.4))
    append_results(path, pa.Table.from_pylist(_rows(2), schema=RESULTS_SCHEMA))
    table = read_results(path)
    assert table.num_rows == 5 and table.column("omega").to_pylist()[:3] == [0.4] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet", "r.parquet.lock"]  # no temp file left

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"model": ["m"], "score": [1.0]}), other)
    with pytest.raises(ConfigError, match="other.parquet is not an aim-ray results table"):
        append_results(other, _rows())
    assert pq.read_table(other).num_rows == 1  # left untouched
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['value'\]"):
        append_results(path, [{"model": "m", "task": "t", "metric": "acc"}])
    row = {**_rows(1)[0], "started_at": "2025-01-01T00:00:00+00:00", "versions": {"torch": "2"}}
    assert append_results(path, [row]) == 6


# ---------------------------------------------------------------- suites, metrics, results parsing


def test_resolve_suite(toy_world):
    with pytest.raises(ConfigError, match="executing the Python code.*--allow-code-execution"):
        resolve_suite("paper")
    tasks, include = resolve_suite("paper", allow_code_execution=True)
    assert tasks == list(PAPER_TASKS) and include is None
    assert resolve_suite("gsm8k, mmlu") == (["gsm8k", "mmlu"], None)
    with pytest.raises(ConfigError, match="mbpp"):
        resolve_suite("mbpp,gsm8k")
    with pytest.raises(ConfigError, match="comma list"):
        resolve_suite(" , ")
    assert resolve_suite("toy", toy_world.tasks_dir) == (toy_world.task_names, str(toy_world.tasks_dir))
    with pytest.raises(ConfigError, match="no YAML for toy task"):
        resolve_suite("toy", toy_world.root)


def test_toy_suite_defaults_to_the_cached_world(toy_world, monkeypatch):
    monkeypatch.setenv(toy.CACHE_ENV, str(toy_world.root.parent))
    assert resolve_suite("toy") == (toy_world.task_names, str(toy_world.tasks_dir))


def test_code_eval_env_is_set_only_while_allowed(monkeypatch):
    from aim_ray.evaluation import _code_eval_env

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with _code_eval_env(False):
        assert "HF_ALLOW_CODE_EVAL" not in os.environ
    with _code_eval_env(True):
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    assert "HF_ALLOW_CODE_EVAL" not in os.environ


def test_evaluate_refuses_code_tasks_and_unknown_tasks(toy_world):
    with pytest.raises(ConfigError, match="humaneval"):
        evaluate(toy_world.base, ["humaneval"], device="cpu")
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['toy_nope'\]"):
        evaluate(toy_world.base, ["toy_nope"], device="cpu", include_path=toy_world.tasks_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(toy_world.root / "nope", ["toy_add"], device="cpu", include_path=toy_world.tasks_dir)
    with pytest.raises(ConfigError, match="no option"):
        EvalWorker("hf", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="'hf' or 'vllm'"):
        EvalWorker("onnx")


def test_scores_are_normalised_and_primary_metric_chosen():
    raw = {"results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.5},
        "bleu_task": {"bleu,none": 23.0, "acc,none": 0.55},
        "wiki": {"word_perplexity,none": 31.2},
        "other": {"acc,none": 0.1},
    }, "groups": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01, "alias": "mmlu"}}}
    scores = _parse_results(raw, ["gsm8k", "bleu_task", "wiki", "mmlu"], subtasks=False)
    assert scores == {"gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5},
                      "bleu_task": {"bleu": 0.23, "acc": 0.55}, "wiki": {"word_perplexity": 31.2},
                      "mmlu": {"acc": 0.4}}
    assert primary_metric("gsm8k", scores) == "exact_match,strict-match"
    assert primary_metric("mmlu", scores["mmlu"]) == "acc"
    assert primary_metric("bleu_task", scores) == "acc"
    with pytest.raises(ConfigError, match="no metric usable"):
        primary_metric("wiki", scores)
    assert normalise_score("acc", 1.0) == 1.0 and normalise_score("mcc", 0.0) == 0.5


def test_scores_use_the_declared_range_never_a_guess():
    """A fraction metric reported as 55 is an error (not 0.55); a task declares the range of its own metric
    in its YAML metadata; a metric with no declared range is not a score."""
    declared = {"configs": {"judged": {"metadata": {"metric_ranges": {"rating": [1, 10]}}}}}
    raw = {**declared, "results": {"judged": {"rating,none": 7.75, "novel,none": 3.0}}}
    assert _parse_results(raw, ["judged"], subtasks=False) == {"judged": {"rating": 0.75}}
    with pytest.raises(ConfigError, match=r"task 'judged': metric 'acc' = 55.0 is outside its declared range"):
        _parse_results({"results": {"judged": {"acc,none": 55.0}}}, ["judged"], subtasks=False)
    with pytest.raises(ConfigError, match="metric_ranges must map"):
        _parse_results({"configs": {"t": {"metadata": {"metric_ranges": {"x": [2, 1]}}}},
                        "results": {"t": {"x,none": 1.5}}}, ["t"], subtasks=False)
    assert normalise_score("novel", 3.0) is None


# ---------------------------------------------------------------- vLLM backend with a fake engine


class FakeLLM:
    """Stands in for vllm.LLM: records its construction and the RPCs the backend sends it."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, tuple(args), dict(kwargs or {})))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True


def _hf_lm_on(llm, model_dir, **options):
    """Scores what the engine now holds: an lm-eval HFLM on the directory the engine was (re)loaded from."""
    from lm_eval.models.huggingface import HFLM

    assert llm is FakeLLM.instances[-1] and options["tensor_parallel_size"] == 2
    return HFLM(pretrained=model_dir, device="cpu", batch_size=64)


def test_vllm_backend_starts_one_engine_and_reloads_weights_in_place(toy_world):
    FakeLLM.instances.clear()
    worker = EvalWorker("vllm", engine_factory=FakeLLM, lm_factory=_hf_lm_on, tensor_parallel_size=2,
                        gpu_memory_utilization=0.5, max_model_len=128, reload_api="weights_path")
    kwargs = {"include_path": toy_world.tasks_dir, "limit": LIMIT}
    base = _acc(worker.evaluate(toy_world.base, toy_world.task_names, **kwargs))
    add = _acc(worker.evaluate(toy_world.experts["add"], toy_world.task_names, **kwargs))
    worker.evaluate(toy_world.experts["add"], ["toy_add"], **kwargs)  # same model: no reload

    (engine,) = FakeLLM.instances
    base_dir, add_dir = str(toy_world.base), str(toy_world.experts["add"])
    assert engine.kwargs == {"model": base_dir, "tokenizer": base_dir, "dtype": "auto", "tensor_parallel_size": 2,
                             "gpu_memory_utilization": 0.5, "seed": 1234, "enforce_eager": False,
                             "max_model_len": 128}
    assert engine.calls == [
        ("collective_rpc", "reload_weights", (), {"weights_path": add_dir, "is_checkpoint_format": True}),
        ("reset_prefix_cache",),
    ]
    assert worker.info()["engines_started"] == 1 and worker.info()["loads"] == 3
    assert add["toy_add"] > base["toy_add"] + 0.3


def test_vllm_backend_reloads_when_files_change_in_place(toy_world, tmp_path):
    """Same path, new weights (a trial directory rewritten): the engine reloads; untouched files: it does not."""
    import shutil

    model = tmp_path / "trial"
    shutil.copytree(toy_world.base, model)
    backend = VLLMBackend(engine_factory=FakeLLM, lm_factory=lambda *a, **k: None, reload_api="weights_path")
    backend.load(model)
    backend.load(model)
    assert backend.llm.calls == []
    shard = model / "model.safetensors"
    tmp = model / "model.safetensors.tmp"
    shutil.copyfile(toy_world.experts["add"] / "model.safetensors", tmp)
    tmp.replace(shard)  # what a rewritten trial looks like: same name, new file
    backend.load(model)
    assert backend.llm.calls == [
        ("collective_rpc", "reload_weights", (), {"weights_path": str(model), "is_checkpoint_format": True}),
        ("reset_prefix_cache",),
    ]


def test_vllm_backend_reload_for_older_vllm_and_architecture_check(toy_world, tmp_path):
    from aim_ray.worlds.tiny import build_model, save_model, tiny_config

    FakeLLM.instances.clear()
    backend = VLLMBackend(engine_factory=FakeLLM, lm_factory=lambda *a, **k: None, reload_api="update_config",
                          engine_kwargs={"max_num_seqs": 8})
    backend.load(toy_world.base)
    backend.load(toy_world.experts["shift"])
    (engine,) = FakeLLM.instances
    shift = str(toy_world.experts["shift"])
    assert engine.kwargs["max_num_seqs"] == 8 and "max_model_len" not in engine.kwargs
    assert engine.calls == [
        ("collective_rpc", "update_config", ({"model_config": {"model": shift}},), {}),
        ("collective_rpc", "reload_weights", (), {}),
        ("reset_prefix_cache",),
    ]
    other = save_model(build_model(tiny_config("llama", vocab_size=260, hidden_size=64)), tmp_path / "other")
    with pytest.raises(CheckpointError, match="architecture"):
        backend.load(other)
    assert len(engine.calls) == 3  # nothing sent to the engine
    with pytest.raises(ConfigError, match="reload_api"):
        VLLMBackend(reload_api="restart")


def test_vllm_backend_without_vllm_says_how_to_fix(toy_world):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ConfigError, match="backend 'vllm' needs vllm"):
        evaluate(toy_world.base, ["toy_add"], backend="vllm", include_path=toy_world.tasks_dir)


@pytest.mark.gpu
def test_vllm_engine_for_real(toy_world):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        pytest.skip("needs a CUDA GPU and vllm")
    kwargs = {"include_path": toy_world.tasks_dir, "limit": LIMIT}
    worker = EvalWorker("vllm", gpu_memory_utilization=0.3, max_model_len=128, enforce_eager=True, dtype="float32")
    got = {name: _acc(worker.evaluate(toy_world.models[name], toy_world.task_names, **kwargs))
           for name in ("base", "add", "shift")}
    assert worker.info()["engines_started"] == 1 and worker.info()["loads"] == 3
    for name, scores in got.items():  # greedy decisions of the reloaded engine match transformers'
        ref = _acc(evaluate(toy_world.models[name], toy_world.task_names, device="cuda", dtype="float32",
                            batch_size=64, **kwargs))
        assert scores == pytest.approx(ref, abs=0.05), name
