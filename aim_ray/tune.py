"""Ray Tune sweeps over merge method x method parameters x omega, ranked by HV Gain.

What makes a sweep cheap: the scales depend on neither the method nor omega, and a method's merged delta
does not depend on omega. So the driver computes the scales once (cached by base content + calibration
settings), each method variant's float32 delta once (cached, content-addressed), and the population scores
(base + experts) once; each trial only relaxes the cached delta with its omega, writes the model, and
scores it on a long-lived evaluation actor that the driver created (trials get its handle).

On several nodes all of it lives under one storage dir every node sees (`SweepStorage`, checked from each
node), and each trial writes its own directory, keyed by its trial id.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, cache_dir
from .config import AimConfig, MergeConfig, ModelEntry, TuneSweepConfig
from .errors import ConfigError
from .methods import get_method

EVAL_ACTOR = "aim-ray-eval"


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Variant:
    """One merge method with one choice of grid parameters: one cached delta, many omegas."""

    key: str
    method: str
    grid: tuple[tuple[str, Any], ...]

    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.grid)
        return f"{self.method}({extra})" if extra else self.method


def plan_variants(cfg: TuneSweepConfig) -> list[Variant]:
    names = list(cfg.method_grid)
    combos = list(itertools.product(*cfg.method_grid.values())) or [()]
    variants = []
    for method in cfg.methods:
        get_method(method)
        for combo in combos:
            grid = tuple((k, v) for k, v in zip(names, combo) if get_method(method).param(k) is not None)
            key = "-".join([method, *(f"{k}{v}" for k, v in grid)])
            if key not in {v.key for v in variants}:
                variants.append(Variant(key, method, grid))
    _check_known_parameters(cfg)
    return variants


def _check_known_parameters(cfg: TuneSweepConfig) -> None:
    """A parameter no method of the sweep knows is a typo, not something to drop silently."""
    given = set(cfg.parameters) | set(cfg.method_grid) | {k for m in cfg.models for k in m.parameters}
    for name in sorted(given):
        if not any(get_method(m).param(name) is not None for m in cfg.methods):
            raise ConfigError(f"parameter {name!r} is not used by any of the methods {cfg.methods}")


def merge_config(cfg: TuneSweepConfig, variant: Variant, omega: float | None = None,
                 scales: str | None = None) -> MergeConfig:
    """The plain MergeConfig of one variant (parameters the method does not take are left out)."""
    method = get_method(variant.method)

    def keep(params: dict[str, Any], per_expert: bool) -> dict[str, Any]:
        return {k: v for k, v in params.items() if (p := method.param(k)) is not None and p.per_expert == per_expert}

    grid = dict(variant.grid)
    models = [ModelEntry(model=m.model, parameters={**keep(m.parameters, True), **keep(grid, True)}, data=m.data)
              for m in cfg.models]
    shared = {**keep(cfg.parameters, False), **keep(grid, False)}
    aim = AimConfig(omega=omega, kind=cfg.kind, scales=scales) if omega is not None else None
    return MergeConfig(merge_method=variant.method, base_model=cfg.base_model, models=models, parameters=shared,
                       tokenizer_source=cfg.tokenizer_source, out_dtype=cfg.out_dtype, aim=aim)


# ------------------------------------------------------------------------------------------- cached artifacts


@dataclass(frozen=True)
class VariantCost:
    """What one method variant cost this run, once however many trials it has (MergeBench's algorithm time)."""

    statistics_seconds: float = 0.0  # the experts' statistics a data-aware method needs (`expert_statistics`)
    merge_seconds: float = 0.0  # computing its merged delta, or only finding it when `merge_cached`
    merge_cached: bool = False


def expert_statistics(cfg: TuneSweepConfig, variant: Variant, root: Path | None = None) -> float:
    """Collect (or find cached under `root/statistics`) the expert statistics `variant`'s method needs before its
    merge (data-aware methods; none for the others, nor when the variant's delta is already cached), and return
    the seconds it took: `run_sweep` reports them as the variant's `statistics_seconds`."""
    from .engine import prepare
    from .statistics import job_statistics

    if get_method(variant.method).statistics is None:
        return 0.0
    started = time.perf_counter()
    job = prepare(merge_config(cfg, variant), seed=cfg.seed)
    if not (_delta_path(job, root) / "model.safetensors").exists():
        job_statistics(job, cache_root=_statistics_root(root))
    return time.perf_counter() - started


def _delta_path(job, root: Path | None) -> Path:
    return (root or cache_dir()) / "deltas" / delta_key(job)


def _statistics_root(root: Path | None) -> Path | None:
    return None if root is None else root / "statistics"


def delta_key(job) -> str:
    payload = {"method": job.method.name, "params": [dict(p) for p in job.params.per_expert],
               "shared": dict(job.params.shared), "seed": job.seed, "vocab": job.vocab_rows,
               "inputs": [c.content_hash() for c in [job.base, *job.experts]]}
    if job.plan is not None:  # gradients/filters/slices: parameters differ per tensor
        payload["settings"] = job.config.model_dump(mode="json", include={"parameters", "models", "slices"})
    if job.method.statistics is not None:  # data-aware: the delta depends on each expert's data
        from .calibration import dataset_fingerprint

        payload["data"] = [[m.data.model_dump(mode="json"), dataset_fingerprint(m.data.dataset, m.data.split)]
                           for m in job.config.models if m.data is not None]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_delta(cfg: TuneSweepConfig, variant: Variant, root: Path | None = None) -> tuple[Path, bool]:
    """The variant's float32 delta checkpoint under `root/deltas` (default: the local cache); returns
    (path, computed_now)."""
    from .engine import prepare, write_delta
    from .statistics import attach_statistics

    job = prepare(merge_config(cfg, variant), seed=cfg.seed)
    path = _delta_path(job, root)
    if (path / "model.safetensors").exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    attach_statistics(job, cache_root=_statistics_root(root))  # data-aware: from `expert_statistics`' cache
    write_delta(job, path)
    return path, True


def cached_scales(cfg: TuneSweepConfig, root: Path | None = None) -> tuple[Path, bool]:
    """The scales artifact for the base + calibration settings, under `root/scales` (default: the local
    cache); returns (path, computed_now)."""
    from .calibration import cached_calibrate, resolve_compute, scales_cache_path
    from .scales import Scales

    if cfg.scales is not None:
        s = Scales.load(cfg.scales)
        s.validate(cfg.base_model)
        return Path(cfg.scales), False
    cal = cfg.calibration
    ckpt = Checkpoint.open(cfg.base_model)
    device, dtype = resolve_compute(cal.device, cal.dtype)  # on the driver, where the calibration runs
    where = None if root is None else root / "scales"
    path = scales_cache_path(ckpt, cal.dataset, cal.n_samples, cal.block_size, cal.n_blocks, cal.split, dtype,
                             cfg.kind, where)
    computed = not path.exists()
    cached_calibrate(ckpt, dataset=cal.dataset, n_samples=cal.n_samples, block_size=cal.block_size,
                     n_blocks=cal.n_blocks, kind=cfg.kind, split=cal.split, micro_batch=cal.micro_batch,
                     dtype=dtype, device=device, cache_root=where)
    return path, computed


# ------------------------------------------------------------------------------------------------- trials


def trial_model(cfg: TuneSweepConfig, variant: Variant, omega: float, delta: Path, scales: Path, out: Path,
                overwrite: bool = True, durable: bool = True) -> Path:
    """Relax the cached delta with `omega` and write the model (bit-identical to a one-pass merge + AIM).
    `durable=False` for a trial model that is scored and deleted: no fsync, no re-hash at commit."""
    from .engine import prepare, run_merge
    from .relaxer import aim_for_job

    job = prepare(merge_config(cfg, variant, omega, str(scales)), seed=cfg.seed)
    job.delta_source = Checkpoint.open(delta)
    job.durable = durable
    relax, metadata, report = aim_for_job(job)
    return run_merge(job, out, overwrite=overwrite, relax=relax, metadata=metadata, report=report, progress=False)


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trainable: relax, score on a free evaluation actor of the pool, report every metric."""
    from ray import tune

    from .metrics import forgetting, hv_gain, normalized_performance

    cfg = TuneSweepConfig.model_validate(ctx["config"])
    variant = next(v for v in plan_variants(cfg) if v.key == config["variant"])
    omega = float(config["omega"])
    # keyed by the trial, never by (variant, omega) alone: a searcher repeating a pair gets a second directory
    out = Path(ctx["trials_dir"]) / tune.get_context().get_trial_id()
    started = time.time()
    trial_model(cfg, variant, omega, Path(ctx["deltas"][variant.key]), Path(ctx["scales"]), out,
                durable=ctx["keep_models"])
    written = time.time()
    scores, actor = trial_scores(cfg, ctx, out)
    scored = time.time()
    cached = actor is None
    if not ctx["keep_models"]:
        shutil.rmtree(out, ignore_errors=True)
    tasks = ctx["tasks"]
    point = [scores[t] for t in tasks]
    population = [[row[t] for t in tasks] for row in ctx["population"].values()]
    metrics = {f"score/{t}": scores[t] for t in tasks}
    metrics.update(forgetting(scores, ctx["population"][cfg.base_model], cfg.eval.general_tasks))
    # MergeBench's runtime split: the variant's one-off cost is attributed to each of its trials here (the
    # sweep's totals, `runtime_summary`, count it once); a score from the cache costs no validation time
    cost = ctx["variant_costs"][variant.key]
    relax_seconds, eval_seconds = written - started, 0.0 if cached else scored - written
    metrics.update(method=variant.method, variant=variant.label(), omega=omega,
                   hv_gain=hv_gain(population, point),
                   normalized_performance=normalized_performance(scores, ctx["expert_scores"]),
                   seconds=time.time() - started, relax_seconds=relax_seconds, eval_seconds=eval_seconds,
                   statistics_seconds=cost["statistics_seconds"], merge_seconds=cost["merge_seconds"],
                   algorithm_seconds=cost["statistics_seconds"] + cost["merge_seconds"] + relax_seconds,
                   validation_seconds=eval_seconds, scores_cached=cached,
                   eval_actor=-1 if cached else actor, started_at=started, finished_at=time.time())
    tune.report(metrics)


def trial_scores(cfg: TuneSweepConfig, ctx: dict[str, Any], model_dir: Path) -> tuple[dict[str, float], int | None]:
    """The model's scores, from the scores cache when a model with the same bytes was scored before under the
    same evaluation setup (a rerun of a sweep, a repeated trial), else from a free actor of the pool; returns
    (scores, the index of the actor that scored it or None when cached)."""
    file = _scores_cache(str(model_dir), ctx["eval_key"], Path(ctx["artifacts"])) if cfg.eval.cache_scores else None
    if file is not None and file.exists():
        return json.loads(file.read_text()), None
    scores, actor = score_on_pool(ctx["pool"], str(model_dir), cfg.eval.timeout_s)
    if file is not None:
        _write_json(file, scores)
    return scores, actor


# ------------------------------------------------------------------------------------------------ storage

DEFAULT_EXPERIMENTS = Path("runs/tune")  # single-node default for Tune's experiments (artifacts: the local cache)


@dataclass(frozen=True)
class SweepStorage:
    """Where a sweep keeps its files. With a storage dir (`--storage DIR`, `storage:`), everything is under DIR,
    which every node must see: DIR/scales, DIR/deltas and DIR/scores (artifacts shared by sweeps) and DIR/<name>
    (the Ray Tune experiment: Tune's state, trials/<trial_id>, results.parquet, plots). Without one, on a
    single-node cluster only: experiments under runs/tune and artifacts in the local cache (~/.cache/aim-ray)."""

    experiments: Path
    artifacts: Path
    shared: bool

    @classmethod
    def resolve(cls, storage: str | os.PathLike | None) -> SweepStorage:
        """Refuses a cluster with nodes besides the driver's when no storage dir is given: trials and evaluation
        actors there could not read the driver's local files."""
        if storage is None:
            nodes = alive_nodes()
            if _beyond_driver(nodes):
                raise ConfigError(f"the Ray cluster has {len(nodes)} alive nodes: pass --storage DIR (or `storage:` "
                                  f"in the sweep config) on a filesystem every node sees (NFS, EFS, Filestore) for "
                                  f"the scales, deltas, trial models and results")
            return cls(DEFAULT_EXPERIMENTS.absolute(), cache_dir(), False)
        root = Path(storage).expanduser().absolute()  # not resolve(): the path as every node will spell it
        return cls(root, root, True)

    def check_visible(self, timeout_s: float = 60.0) -> None:
        nodes = alive_nodes()
        if self.shared and _beyond_driver(nodes):
            check_shared_dir(self.artifacts, nodes, timeout_s)


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _beyond_driver(nodes: list[dict[str, Any]]) -> bool:
    import ray

    return any(n["NodeID"] != ray.get_runtime_context().get_node_id() for n in nodes)


def check_shared_dir(root: Path, nodes: list[dict[str, Any]], timeout_s: float) -> None:
    """`root` must be the same directory on every node: the driver writes a marker file there and a task pinned
    to each node (node affinity, not soft) looks for it. Refuses naming the nodes that cannot see it (or did not
    answer within `timeout_s`); a directory created for the check is removed again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def exists(path: str) -> bool:  # nested: shipped by value, so the check imports nothing of aim_ray
        return os.path.exists(path)

    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".aim-ray-visible-{uuid.uuid4().hex}"
    marker.touch()
    probe = ray.remote(num_cpus=0)(exists)
    try:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                              ).remote(str(marker)) for n in nodes]
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        seen = dict(zip(ready, ray.get(ready, timeout=timeout_s)))
        for ref in late:
            ray.cancel(ref)
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"{n['NodeID']} ({n.get('NodeManagerAddress', '?')}"
             f"{'' if ref in seen else f', no answer within {timeout_s:.0f} s'})"
             for n, ref in zip(nodes, refs) if not seen.get(ref)]
    if blind:
        if created:
            root.rmdir()
        raise ConfigError(f"--storage {root}: not visible from node(s) {', '.join(blind)}; it must be a directory "
                          f"every node of the Ray cluster sees (NFS, EFS, Filestore)")


# ------------------------------------------------------------------------------------------------- driver


def _scores_cache(model: str, eval_key: str, root: Path) -> Path:
    digest = hashlib.sha256(f"{Checkpoint.open(model).content_hash()}:{eval_key}".encode()).hexdigest()[:24]
    return root / "scores" / f"{digest}.json"


def _write_json(file: Path, data: Any) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(file)


def population_scores(cfg: TuneSweepConfig, pool: EvalPool, eval_key: str, root: Path
                      ) -> dict[str, dict[str, float]]:
    """Scores of the base and every expert, each evaluated once ever for this eval setup (cached under
    `root/scores`); the ones not cached yet are scored at once, spread over the pool's actors."""
    models = [cfg.base_model, *[m.model for m in cfg.models]]
    files = {m: _scores_cache(m, eval_key, root) for m in models}
    todo = [m for m in models if not files[m].exists()]
    refs = [pool.actors[i % len(pool.actors)].score.remote(m) for i, m in enumerate(todo)]
    rounds = -(-len(todo) // len(pool.actors))  # each actor scores its models one after another
    for model, scores in zip(todo, _get(refs, cfg.eval.timeout_s * max(rounds, 1), "scoring the population")):
        _write_json(files[model], scores)
    return {m: json.loads(files[m].read_text()) for m in models}


def expert_scores(cfg: TuneSweepConfig, population: dict[str, dict[str, float]], tasks: list[str]
                  ) -> dict[str, float]:
    """The reference score per task for normalised performance: the model `expert_for_task` names (an expert,
    or the base for a task no expert specialises in), else the best expert on that task."""
    experts = [m.model for m in cfg.models]
    if cfg.expert_for_task:
        missing = [t for t in tasks if t not in cfg.expert_for_task]
        if missing:
            raise ConfigError(f"expert_for_task has no entry for task {missing[0]!r}")
        return {t: population[cfg.expert_for_task[t]][t] for t in tasks}
    return {t: max(population[e][t] for e in experts) for t in tasks}


def check_general_tasks(cfg: TuneSweepConfig, tasks: list[str]) -> None:
    """Forgetting is measured on evaluated tasks only."""
    for task in cfg.eval.general_tasks:
        if task not in tasks:
            raise ConfigError(f"eval.general_tasks: {task!r} is not one of the evaluated tasks {tasks}")


@dataclass
class SweepResult:
    table: Any  # pandas DataFrame, one row per trial, best first
    results_path: Path
    plots: list[Path]
    computed: dict[str, int]
    best: dict[str, Any]
    population: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> task -> score
    runtime: dict[str, Any] = field(default_factory=dict)  # `runtime_summary`: algorithm vs validation seconds


def param_space(cfg: TuneSweepConfig, variants: list[Variant]) -> dict[str, Any]:
    from ray import tune

    keys = [v.key for v in variants]
    if cfg.search == "optuna":
        return {"variant": tune.choice(keys), "omega": tune.choice(cfg.omegas)}
    return {"variant": tune.grid_search(keys), "omega": tune.grid_search(cfg.omegas)}


def tune_config(cfg: TuneSweepConfig, tasks: list[str]):
    from ray import tune

    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # multi-objective: every benchmark score is maximised; Pareto-optimal trials are kept
        searcher = OptunaSearch(metric=[f"score/{t}" for t in tasks], mode=["max"] * len(tasks), seed=cfg.seed)
        return tune.TuneConfig(search_alg=searcher, num_samples=cfg.num_samples,
                               max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True)
    # reuse_actors: a trial process keeps its imports (torch, the engine, numba's kernels) for the next trial
    return tune.TuneConfig(metric="hv_gain", mode="max", max_concurrent_trials=cfg.max_concurrent_trials,
                           reuse_actors=True)


def run_sweep(cfg: TuneSweepConfig, storage: str | os.PathLike | None = None, *, name: str = "sweep",
              resume: bool = False, keep_models: bool = False, export_best: str | os.PathLike | None = None,
              overwrite: bool = False, scorer_factory=None, echo=print, progress: bool = False) -> SweepResult:
    """Run (or resume) a sweep on the connected Ray cluster. `storage` (else `cfg.storage`): the directory every
    node sees, see `SweepStorage`. `scorer_factory(cfg)` returns the pool of long-lived evaluation actors, the
    task names and the scores-cache key (default: `default_scorer`, an `evaluation.EvalActor` pool configured by
    `cfg.eval`); trials take a free actor of the pool."""
    from ray import tune

    from .metrics import normalized_performance

    where = SweepStorage.resolve(storage if storage is not None else cfg.storage)
    experiment = where.experiments / name
    if experiment.exists() and not (resume or overwrite):
        raise ConfigError(f"{experiment}: a sweep of that name exists; pass --resume to continue it or "
                          f"--overwrite to start over")
    if export_best is not None and Path(export_best).exists() and not overwrite:
        raise ConfigError(f"--export-best {export_best}: already exists; pass --overwrite to replace it")
    variants = plan_variants(cfg)
    from .engine import prepare

    for v in variants:  # validate every merge before any long work
        prepare(merge_config(cfg, v), seed=cfg.seed)
    if cfg.eval.general_tasks and scorer_factory is None:  # a custom scorer's tasks are checked once it names them
        from .evaluation import resolve_suite

        check_general_tasks(cfg, resolve_suite(cfg.eval.suite, cfg.eval.include_path, cfg.eval.allow_code_execution)[0])
    where.check_visible()
    if overwrite and not resume and experiment.exists():
        shutil.rmtree(experiment)

    echo(f"calibrating {cfg.base_model} ({cfg.kind} scales) ...")
    started = time.perf_counter()
    scales, scales_computed = cached_scales(cfg, where.artifacts)
    calibration_seconds = time.perf_counter() - started
    deltas, merges, costs = {}, 0, {}
    for v in variants:
        echo(f"merged delta for {v.label()} ...")
        statistics_seconds = expert_statistics(cfg, v, where.artifacts)
        started = time.perf_counter()
        path, computed = cached_delta(cfg, v, where.artifacts)
        costs[v.key] = VariantCost(statistics_seconds, time.perf_counter() - started, merge_cached=not computed)
        deltas[v.key], merges = str(path), merges + computed
    pool, tasks, eval_key = (scorer_factory or default_scorer)(cfg)
    check_general_tasks(cfg, tasks)
    echo(f"scoring the base and {len(cfg.models)} experts on {', '.join(tasks)} with {len(pool.actors)} "
         f"evaluation actor(s) (cached after the first run) ...")
    started = time.perf_counter()
    population = population_scores(cfg, pool, eval_key, where.artifacts)
    population_seconds = time.perf_counter() - started
    ctx = {"config": cfg.model_dump(mode="json"), "deltas": deltas, "scales": str(scales),
           "artifacts": str(where.artifacts), "trials_dir": str(experiment / "trials"), "keep_models": keep_models,
           "pool": pool, "tasks": tasks, "eval_key": eval_key, "population": population,
           "expert_scores": expert_scores(cfg, population, tasks),
           "variant_costs": {k: asdict(c) for k, c in costs.items()}}
    normalized_performance(ctx["expert_scores"], ctx["expert_scores"])  # zero references fail here, not in trials
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    tune.PlacementGroupFactory([{"CPU": cfg.trial_cpus}]))
    if resume and tune.Tuner.can_restore(str(experiment)):
        echo(f"resuming {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        callbacks = [TrialProgress(_trial_count(cfg, variants))] if progress else []
        tuner = tune.Tuner(trainable, param_space=param_space(cfg, variants), tune_config=tune_config(cfg, tasks),
                           run_config=tune.RunConfig(name=name, storage_path=str(where.experiments),
                                                     verbose=0 if progress else 1, callbacks=callbacks))
    grid = tuner.fit()
    table = results_table(grid)
    results_path = experiment / "results.parquet"
    table.to_parquet(results_path)
    (experiment / "population.json").write_text(json.dumps(population, indent=1))  # for notebooks/analysis
    runtime = runtime_summary(calibration_seconds, {v.label(): costs[v.key] for v in variants}, population_seconds,
                              table)
    summary = {"base_model": cfg.base_model, "tasks": tasks, "general_tasks": cfg.eval.general_tasks,
               "runtime": runtime}
    (experiment / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = draw_plots(table, population, tasks, experiment)
    best = table.iloc[0].to_dict() if len(table) else {}
    if export_best is not None and best:
        v = next(v for v in variants if v.label() == best["variant"])
        trial_model(cfg, v, float(best["omega"]), Path(deltas[v.key]), scales, Path(export_best), overwrite)
    computed = {"calibrations": int(scales_computed), "merges": merges, "trials": len(table)}
    return SweepResult(table, results_path, plots, computed, best, population, runtime)


def runtime_summary(calibration_seconds: float, costs: dict[str, VariantCost], population_seconds: float,
                    table) -> dict[str, Any]:
    """MergeBench's runtime split for the whole sweep, each cost counted once. Algorithm: AIM's calibration +
    every variant's expert statistics and merge (once, however many trials it has) + every trial's relax and
    write. Validation: scoring the base and the experts + every trial's evaluation (a cached score costs 0).
    `costs`: variant label -> its cost. Seconds this run spent: an artifact found in the cache costs only its
    look-up."""
    def total(column: str) -> float:
        return float(table[column].fillna(0.0).sum()) if column in table else 0.0

    statistics = sum(c.statistics_seconds for c in costs.values())
    merges = sum(c.merge_seconds for c in costs.values())
    relax, evals = total("relax_seconds"), total("eval_seconds")
    return {"algorithm_seconds": calibration_seconds + statistics + merges + relax,
            "validation_seconds": population_seconds + evals,
            "calibration_seconds": calibration_seconds, "statistics_seconds": statistics, "merge_seconds": merges,
            "relax_seconds": relax, "population_seconds": population_seconds, "trial_eval_seconds": evals,
            "variants": {label: asdict(c) for label, c in costs.items()}}


def _trial_count(cfg: TuneSweepConfig, variants: list[Variant]) -> int:
    return cfg.num_samples if cfg.search == "optuna" else len(variants) * len(cfg.omegas)


def TrialProgress(total: int):  # noqa: N802 (a factory: ray.tune is imported only when a sweep runs)
    """A Tune callback drawing one progress bar (with ETA) over the sweep's trials."""
    from ray import tune
    from tqdm import tqdm

    class _TrialProgress(tune.Callback):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="trials", unit="trial")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.bar.update(1)

        def on_experiment_end(self, trials, **info) -> None:
            self.bar.close()

    return _TrialProgress()


_KEPT_METRICS = ("method", "variant", "omega", "seconds", "relax_seconds", "eval_seconds", "scores_cached",
                 "eval_actor", "started_at", "finished_at", "general_retention", "statistics_seconds",
                 "merge_seconds", "algorithm_seconds", "validation_seconds")


def results_table(grid):
    """One row per finished trial, ranked by HV Gain (then normalised performance); `duplicate_of` names the
    trial that finished first with the same variant and omega (a searcher such as Optuna may repeat a pair)."""
    import pandas as pd

    rows = []
    for result in grid:
        if result.error or not result.metrics:
            continue
        keep = {k: v for k, v in result.metrics.items()
                if k.startswith(("score/", "hv_gain", "normalized", "forgetting")) or k in _KEPT_METRICS}
        rows.append({**keep, "trial_id": result.metrics.get("trial_id")})
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    if "finished_at" not in table:  # trials of a sweep started by an older aim-ray, then resumed
        table["finished_at"] = float("nan")
    table = table.sort_values(["finished_at", "trial_id"], kind="stable")  # originals before their repeats
    first = table.groupby(["variant", "omega"], sort=False)["trial_id"].transform("first")
    table["duplicate_of"] = first.where(first != table["trial_id"], None)
    table = table.sort_values(["hv_gain", "normalized_performance"], ascending=False, kind="stable")
    return table.reset_index(drop=True)


def draw_plots(table, population, tasks, out_dir: Path) -> list[Path]:
    from . import plots

    if not len(table):
        return []
    # label the population by folder name (the full paths of the base and experts do not fit a legend)
    short = {(Path(m).name or m): scores for m, scores in population.items()}
    return [plots.hv_gain_vs_omega(table, out_dir / "hv_gain_vs_omega.png"),
            plots.pareto_front(table, short if len(short) == len(population) else population, tasks,
                               out_dir / "pareto.png")]


@dataclass
class EvalPool:
    """Long-lived evaluation actors shared by the trials, and a queue of the free ones: a trial takes an actor
    index, scores its model there and puts the index back, so concurrent trials never queue on one actor."""

    actors: list[Any]
    free: Any  # ray.util.queue.Queue of actor indices

    @classmethod
    def of(cls, actors: list[Any]) -> EvalPool:
        from ray.util.queue import Queue

        free = Queue(maxsize=len(actors), actor_options={"num_cpus": 0})  # reserves no CPU a trial needs
        for i in range(len(actors)):
            free.put(i)
        return cls(list(actors), free)


def score_on_pool(pool: EvalPool, model_dir: str, timeout_s: float) -> tuple[dict[str, float], int]:
    """Score on the next free actor; returns (scores, that actor's index)."""
    from ray.util.queue import Empty

    try:
        i = pool.free.get(block=True, timeout=timeout_s)
    except Empty as e:
        raise TimeoutError(f"no evaluation actor became free within {timeout_s:.0f} s for {model_dir}") from e
    try:
        return _get([pool.actors[i].score.remote(model_dir)], timeout_s, f"evaluation actor {i} on {model_dir}")[0], i
    finally:
        pool.free.put(i)


def _get(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s") from e


def num_eval_actors(cfg: TuneSweepConfig) -> int:
    """`eval.num_actors`, else one per GPU the cluster has for them (one on a CPU-only setup)."""
    import ray

    if cfg.eval.num_actors:
        return cfg.eval.num_actors
    if cfg.eval.num_gpus > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.eval.num_gpus))
    return 1


_DRIVER_SIDE_EVAL_OPTIONS = {"num_actors", "timeout_s", "cache_scores", "general_tasks"}  # change no actor


def default_scorer(cfg: TuneSweepConfig):
    """Create (or reuse) the named evaluation actors; returns (pool, task names, cache key)."""
    import ray

    from .evaluation import EvalActor, resolve_suite

    tasks, include_path = resolve_suite(cfg.eval.suite, cfg.eval.include_path, cfg.eval.allow_code_execution)
    key = json.dumps({"tasks": tasks, "limit": cfg.eval.limit, "backend": cfg.eval.backend}, sort_keys=True)
    setup = cfg.eval.model_dump(mode="json", exclude=_DRIVER_SIDE_EVAL_OPTIONS)  # what each actor is built with
    name = eval_actor_name(json.dumps([setup, tasks, include_path], sort_keys=True))
    names = [name if i == 0 else f"{name}-{i}" for i in range(num_eval_actors(cfg))]
    for other in ray.util.list_named_actors():  # an earlier sweep's actor, set up for other tasks or limit:
        if other.startswith(EVAL_ACTOR) and other not in names:  # reusing it would score (and cache) the wrong
            ray.kill(ray.get_actor(other))  # thing; keeping it would hold the resources trials need
    quiet = {"env_vars": {"TQDM_DISABLE": "1"}}  # per-request bars would drown Tune's trial table
    # SPREAD: on a multi-node cluster the actors go to different nodes, so they do not share one node's cores
    actors = [EvalActor.options(name=n, get_if_exists=True, num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus,
                                scheduling_strategy="SPREAD", runtime_env=quiet).remote(
        backend=cfg.eval.backend, tasks=tasks, include_path=include_path, limit=cfg.eval.limit,
        batch_size=cfg.eval.batch_size, tensor_parallel_size=cfg.eval.tensor_parallel_size,
        allow_code_execution=cfg.eval.allow_code_execution) for n in names]
    # up (or failed) before any scoring: the population is then scored by every actor at once
    _get([a.info.remote() for a in actors], cfg.eval.timeout_s, "starting the evaluation actors")
    return EvalPool.of(actors), tasks, key


def eval_actor_name(setup: str) -> str:
    """One named evaluation actor per evaluation setup (the eval config and the resolved tasks)."""
    return f"{EVAL_ACTOR}-{hashlib.sha256(setup.encode()).hexdigest()[:12]}"


def sweep(cfg: TuneSweepConfig, storage: str | os.PathLike, *, address: str | None = None, **kwargs: Any
          ) -> SweepResult:
    """`run_sweep` on a local Ray cluster (embedded default) or the one at `address` / RAY_ADDRESS."""
    import ray

    from .driver import ClusterOptions, connect

    connected = connect(ClusterOptions(workers=1, address=address))
    try:
        return run_sweep(cfg, storage, **kwargs)
    finally:
        if connected:
            ray.shutdown()


def print_summary(result: SweepResult, echo=print, top: int = 20) -> None:
    table = result.table
    if not len(table):
        echo("no trial finished")
        return
    scores = [c for c in table.columns if c.startswith("score/")]
    repeats = int(table["duplicate_of"].notna().sum())
    measures = [c for c in ("forgetting", "algorithm_seconds", "validation_seconds") if c in table]
    cols = ["variant", "omega", "hv_gain", "normalized_performance", *measures, *scores,
            *(["duplicate_of"] if repeats else [])]
    echo("\nranked by HV Gain:\n" + table[cols].head(top).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if repeats:
        echo(f"{repeats} trial(s) repeat the variant and omega of an earlier trial (column duplicate_of)")
    echo(f"\ncomputed this run: {result.computed['calibrations']} calibration(s), {result.computed['merges']} "
         f"merge(s), {result.computed['trials']} trial(s)")
    if result.runtime:
        echo(runtime_line(result.runtime))
    echo(f"results: {result.results_path}")
    for p in result.plots:
        echo(f"plot: {p}")


def runtime_line(runtime: dict[str, Any]) -> str:
    """The sweep's MergeBench runtime split in one line."""
    r = runtime
    return (f"runtime: algorithm {r['algorithm_seconds']:.1f} s (calibration {r['calibration_seconds']:.1f}, expert "
            f"statistics {r['statistics_seconds']:.1f}, merges {r['merge_seconds']:.1f} for {len(r['variants'])} "
            f"variant(s), relax + write {r['relax_seconds']:.1f}) vs validation {r['validation_seconds']:.1f} s "
            f"(base + experts {r['population_seconds']:.1f}, trials {r['trial_eval_seconds']:.1f})")
