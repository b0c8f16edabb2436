"""The driver of the merge service on Ray: connect, place the pool, plan, pipeline the calibration, merge, commit.

The actor itself (`LayerRangeWorker`) lives in `actors.py`; this module only drives it.

K workers live in one placement group (one bundle each: `{"CPU": c, "GPU": g}`; PACK by default, SPREAD
optional). A worker is generic: it owns a layer range only while it calibrates, and a run of output shards
only while it merges, so one pool serves many merges (Tune reuses it).

- Calibration is a pipeline: worker k runs the decoder layers of range k (`calibration.StageRunner`, only
  that range's base weights loaded) with scale hooks. The driver submits every micro-batch up front (within a
  bounded window) and chains the stages through object refs, so stage k works on micro-batch i while stage
  k+1 works on i-1. Calls on one actor run in submission order, so each module accumulates its micro-batches
  in the same order as the in-process path: the scales are bit-identical to `collect_activation_scales`.
- Merge: the global shard plan (independent of K) is cut into K contiguous runs balanced by bytes. Every
  worker rebuilds the `MergeJob` from the picklable config (`engine.prepare`) and writes its shards with
  `engine.write_shard` into the shared hidden work dir; the driver records progress as shards complete (for
  `--resume`), then `engine.finalize` and an atomic commit. Outputs are byte-identical for every K.
- Faults: actors have `max_restarts` and their calls `max_task_retries`, so a killed worker comes back and
  redoes its unfinished shards (a shard is written to `.tmp` and renamed when complete). A worker whose
  restarts are exhausted, or whose node is gone for good, has its remaining shards resubmitted by the driver
  to the surviving workers. A failed run leaves only the hidden work dir; `--resume` reuses verified shards.

The output directory must be on a filesystem every node sees (NFS, EFS, Filestore): workers write shards
directly into it. The driver checks this before merging.

Connecting: with an address (or RAY_ADDRESS, as inside `ray job submit`) Ray is attached with a plain
`ray.init(address=...)` / `ray.init()` (resource arguments raise on an existing cluster); otherwise a local
cluster is started with `ray.init(address="local", num_cpus=..., num_gpus=...)` ("local": never attach to a
cluster some `ray start` left registered in /tmp/ray). An already initialised Ray is used as is.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .actors import MergeOptions, RemoteWorker, to_wire
from .calibration import (
    iter_micro_batches,
    load_calibration_blocks,
    load_tokenizer,
    scales_artifact,
    scales_cache_path,
)
from .checkpoint import DEFAULT_SHARD_SIZE, OutputDir, shard_filename
from .config import CalibrationConfig, MergeConfig
from .engine import MergeJob, RelaxFn, finalize, load_progress, prepare, save_progress
from .errors import AimRayError, CalibrationError, CheckpointError, ConfigError
from .plan import (
    LayerRange,
    ServicePlan,
    WorkerPlan,
    assign_shards,
    calibration_memory,
    merge_memory,
    plan_ranges,
)
from .relaxer import aim_for_job
from .scales import Scales

PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ClusterOptions:
    """How many workers, where, and with what resources.

    `gpus_per_worker=None` means one GPU per worker when the cluster has at least one per worker, else none.
    `resources_per_worker` adds custom resources to each bundle (e.g. to pin workers to a node type).
    """

    workers: int = 2
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    placement: str = "pack"
    resources_per_worker: Mapping[str, float] = field(default_factory=dict)
    max_restarts: int = 3
    ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.cpus_per_worker < 0 or (self.gpus_per_worker or 0) < 0:
            raise ConfigError("--cpus-per-worker and --gpus-per-worker must not be negative")

    def bundle(self, gpus: float) -> dict[str, float]:
        custom = {k: float(v) for k, v in self.resources_per_worker.items()}
        bundle = {"CPU": float(self.cpus_per_worker), **custom}
        if gpus:
            bundle["GPU"] = float(gpus)
        bundle = {k: v for k, v in bundle.items() if v}
        if not bundle:
            raise ConfigError("a worker needs some resource: --cpus-per-worker or --gpus-per-worker above 0")
        return bundle


# ---------------------------------------------------------------------------------------- connecting


def connect(options: ClusterOptions) -> bool:
    """Attach to a cluster (address given or RAY_ADDRESS set) or start a local one. True if we connected
    (the caller then disconnects); False if Ray was already initialised by the caller."""
    if ray.is_initialized():
        return False
    if options.address or os.environ.get("RAY_ADDRESS"):
        # Attaching: resource arguments raise on an existing cluster (DESIGN.md section 6).
        ray.init(address=options.address) if options.address else ray.init()
        return True
    detected = torch.cuda.device_count()
    gpus = max(detected, math.ceil(options.workers * (options.gpus_per_worker or 0)))
    cpus = max(os.cpu_count() or 1, math.ceil(options.workers * options.cpus_per_worker))
    # address="local": a new cluster, never one some `ray start` on this machine left in /tmp/ray.
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
             runtime_env=_local_runtime_env())
    return True


def _local_runtime_env() -> dict[str, Any]:
    """Workers of a local cluster import aim_ray from wherever the driver did (a source checkout too)."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def resolve_gpus(options: ClusterOptions) -> float:
    """GPUs per worker: as given, else one each when the connected cluster has enough."""
    if options.gpus_per_worker is not None:
        return options.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= options.workers else 0.0


# --------------------------------------------------------------------------------------------- the pool


class WorkerPool:
    """K `LayerRangeWorker` actors in one placement group. Use as a context manager (or call `close`)."""

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        options.bundle(options.gpus_per_worker or 0)  # refuse an empty bundle before connecting
        self._connected = connect(options)
        self.gpus = resolve_gpus(options)
        self.bundle = options.bundle(self.gpus)
        self.pg = self._reserve()
        self.actors = [self._actor(k) for k in range(options.workers)]

    def _reserve(self) -> PlacementGroup:
        k = self.options.workers
        strategy = PLACEMENTS[self.options.placement]
        pg = placement_group([dict(self.bundle) for _ in range(k)], strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=self.options.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            self._disconnect()
            raise ConfigError(f"cannot reserve {k} bundle(s) of {self.bundle} ({strategy}) within "
                              f"{self.options.ready_timeout_s:.0f} s; the cluster has "
                              f"{ray.cluster_resources()}. Lower --workers / --cpus-per-worker / "
                              f"--gpus-per-worker") from None
        return pg

    def _actor(self, k: int):
        n = self.options.max_restarts
        custom = {r: v for r, v in self.bundle.items() if r not in ("CPU", "GPU")}
        return RemoteWorker.options(
            num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0), resources=custom,
            max_restarts=n, max_task_retries=n,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
        ).remote(k, self.bundle.get("CPU", 1.0))

    def info(self) -> list[dict[str, Any]]:
        return ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        remove_placement_group(self.pg)
        self._disconnect()

    def _disconnect(self) -> None:
        if self._connected:
            ray.shutdown()
            self._connected = False

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calibration ----------------------------------------------------------------------------------
    def calibrate(self, base: str, ranges: Sequence[LayerRange], blocks: torch.Tensor, micro_batch: int,
                  dtype: str = "float32", max_inflight: int | None = None,
                  attempts: int = 2) -> dict[str, torch.Tensor]:
        """Pipelined activation scales over `ranges` (one stage per worker, in order). A failure inside the
        pipeline (a worker died and lost its sums) reruns the whole calibration, up to `attempts` times."""
        if len(ranges) != len(self.actors):
            raise ValueError(f"{len(ranges)} ranges for {len(self.actors)} workers")
        for attempt in range(attempts):
            try:
                return self._calibrate_once(base, ranges, blocks, micro_batch, dtype, max_inflight)
            except (ray.exceptions.RayActorError, CalibrationError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _calibrate_once(self, base: str, ranges: Sequence[LayerRange], blocks: torch.Tensor, micro_batch: int,
                        dtype: str, max_inflight: int | None) -> dict[str, torch.Tensor]:
        _get([a.start_calibration.remote(base, r.layers.start, r.layers.stop, r.has_embed, r.has_head, dtype)
              for a, r in zip(self.actors, ranges, strict=True)])
        window = max_inflight or 2 * len(self.actors)
        inflight: list[ray.ObjectRef] = []
        for batch in iter_micro_batches(blocks, micro_batch):
            if len(inflight) >= window:  # bound the hidden states alive in the object store
                _get(inflight.pop(0))
            ref = ray.put(to_wire(batch))
            for actor in self.actors:  # stage k's output ref is stage k+1's input: no driver round trip
                ref = actor.calibrate_step.remote(ref)
            inflight.append(ref)
        _get(inflight)
        scales: dict[str, torch.Tensor] = {}
        for part in _get([a.get_scales.remote() for a in self.actors]):
            scales.update({name: torch.from_numpy(np.array(arr)) for name, arr in part.items()})
        _get([a.stop_calibration.remote() for a in self.actors])
        return scales

    # -- merge ----------------------------------------------------------------------------------------
    def merge_shards(self, job: MergeJob, options: MergeOptions, work: Path, todo: Sequence[Sequence[int]],
                     relax: RelaxFn | None = None, metadata: dict[str, str] | None = None,
                     on_done: Callable[[int, str, int], None] | None = None) -> dict[int, str]:
        """Write shard indices `todo[k]` on worker k, concurrently. `on_done(index, sha256, pid)` is called
        in the driver as each shard completes. Shards of a worker that is gone for good go to the others."""
        self._check_shared_dir(work)
        relax_arg = ray.put(relax) if relax is not None else None
        cfg = ray.put(job.config)
        alive = list(range(len(self.actors)))
        pending: dict[ray.ObjectRef, tuple[int, int]] = {}

        def submit(k: int, index: int) -> None:
            ref = self.actors[k].write_shard.remote(cfg, options, str(work), index, relax_arg, metadata)
            pending[ref] = (k, index)

        for k, indices in enumerate(todo):
            for index in indices:
                submit(k, index)
        digests: dict[int, str] = {}
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                k, index = pending.pop(ref)
                try:
                    _, digest, pid = _get(ref)
                except ray.exceptions.RayActorError:  # restarts exhausted, node gone: move the work
                    if k in alive:
                        alive.remove(k)
                    if not alive:
                        raise
                    submit(alive[index % len(alive)], index)
                    continue
                digests[index] = digest
                if on_done is not None:
                    on_done(index, digest, pid)
        except BaseException:
            _abandon(list(pending))
            raise
        return digests

    def _check_shared_dir(self, work: Path) -> None:
        """Workers write into the driver's work dir: it must be the same directory on every node."""
        marker = work / f".aim-ray-visible-{uuid.uuid4().hex}"
        marker.touch()
        try:
            seen = _get([a.can_see.remote(str(marker)) for a in self.actors])
        finally:
            marker.unlink(missing_ok=True)
        if not all(seen):
            blind = [k for k, s in enumerate(seen) if not s]
            raise ConfigError(f"{work.parent}: worker(s) {blind} cannot see the output's work dir; --out "
                              f"must be on a filesystem shared by every node (NFS, EFS, Filestore)")


def _abandon(refs: list[ray.ObjectRef], timeout_s: float = 120.0) -> None:
    """Cancel queued shard writes and let running ones finish, so no stray write races a `--resume`."""
    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - best effort; a running sync actor task cannot be interrupted
            pass
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def _get(refs: Any) -> Any:
    """`ray.get`, re-raising a user error (`AimRayError`) raised in a worker as itself (no Ray wrapper)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, AimRayError):
            raise cause from None
        raise


# ------------------------------------------------------------------------------------------ the driver


def layer_ranges(job: MergeJob, workers: int) -> list[LayerRange]:
    """K contiguous block ranges of the model balanced by bytes (embeddings first, head last)."""
    return plan_ranges({t.name: t.nbytes for t in job.outputs}, job.n_layers, workers)


def shard_assignment(job: MergeJob, workers: int) -> list[range]:
    return assign_shards([sum(t.nbytes for t in shard) for shard in job.shards], workers)


def service_plan(job: MergeJob, options: ClusterOptions, calibration: CalibrationConfig | None = None,
                 calib_dtype_bytes: int = 4) -> ServicePlan:
    """What `--dry-run` prints: per worker, its layer range, shards, bytes and memory estimates
    (calibration memory only when the merge calibrates)."""
    ranges = layer_ranges(job, options.workers)
    runs = shard_assignment(job, options.workers)
    shards = job.shards
    cfg = job.base.config
    workers = []
    for r, run in zip(ranges, runs, strict=True):
        tensors = [t for i in run for t in shards[i]]
        calib = 0
        if calibration is not None:
            calib = calibration_memory(r.nbytes * calib_dtype_bytes // job.out_dtype.itemsize,
                                       calibration.micro_batch * calibration.block_size,
                                       cfg.get("hidden_size", 0), cfg.get("intermediate_size", 0),
                                       cfg.get("vocab_size", 0), r.has_head)
        largest = max((math.prod(t.shape) for t in tensors), default=0)
        workers.append(WorkerPlan(r, run, sum(t.nbytes for t in tensors), calib, merge_memory(largest)))
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else "auto"
    bundle = {**options.bundle(0), **({"GPU": gpus} if gpus else {})}
    return ServicePlan(workers, len(shards), sum(t.nbytes for t in job.outputs), options.placement, bundle)


def dry_run_plan(config: MergeConfig, cluster: ClusterOptions, *, seed: int = 0,
                 shard_size: int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False) -> str:
    """Validate the merge (headers only, nothing written, no Ray) and describe how K workers would run it."""
    job = prepare(config, seed=seed, allow_pickle=allow_pickle, shard_size=shard_size)
    aim = config.aim
    calibrates = aim is not None and aim.scales is None
    lines = [f"merge {job.method.name}: base {job.base.source} + {len(job.experts)} expert(s), "
             f"{len(job.outputs)} tensors, out dtype {str(job.out_dtype).removeprefix('torch.')}"]
    if aim is not None:
        source = f"scales {aim.scales}" if aim.scales else (
            f"{aim.kind} calibration {aim.calibration_or_default().model_dump()}"
            + (f", pipelined over {cluster.workers} stage(s)" if aim.kind == "activation" else ""))
        lines.append(f"AIM omega={aim.omega}, {source}")
    if cluster.workers == 1:
        lines.append("--workers 1: runs in this process, without Ray")
    plan = service_plan(job, cluster, aim.calibration_or_default() if calibrates and aim else None)
    lines.append(plan.describe())
    return "\n".join(lines)


def distributed_scales(pool: WorkerPool, job: MergeJob, calibration: CalibrationConfig,
                       dtype: str = "float32", cache_root: str | os.PathLike | None = None,
                       refresh: bool = False) -> Scales:
    """Activation scales of the merge's base, computed by the pipeline, cached exactly like
    `calibration.cached_calibrate` (same key), so one calibration serves single-process runs too."""
    c = calibration
    base = job.base
    path = scales_cache_path(base, c.dataset, c.n_samples, c.block_size, c.n_blocks, c.split, dtype, "activation",
                             cache_root)
    if path.exists() and not refresh:
        return Scales.load(path)
    blocks = load_calibration_blocks(load_tokenizer(base.path), c.dataset, c.n_samples, c.block_size,
                                     c.n_blocks, c.split)
    ranges = layer_ranges(job, len(pool.actors))
    tensors = pool.calibrate(base.ref, ranges, blocks, c.micro_batch, dtype)  # a hub ref pins its commit
    scales = scales_artifact(base, tensors, "activation", c.dataset, c.n_samples, c.block_size, blocks, c.split,
                             dtype)
    scales.save(path)
    return scales


AimFn = Callable[["WorkerPool"], tuple[RelaxFn | None, dict[str, str], dict[str, Any]]]


def pool_aim(job: MergeJob) -> AimFn:
    """AIM for a distributed merge: activation scales from an `aim.calibration` come from the pipeline on the
    pool (cache shared with the single-process path); a scales file or sensitivity scales go through
    `relaxer.aim_for_job` as in the single-process path. Either way the relaxation is the same object."""

    def aim(pool: WorkerPool) -> tuple[RelaxFn | None, dict[str, str], dict[str, Any]]:
        cfg = job.config.aim
        if cfg is None or cfg.scales is not None or cfg.kind != "activation":
            return aim_for_job(job)
        return aim_for_job(job, distributed_scales(pool, job, cfg.calibration_or_default()))

    return aim


def distributed_merge(job: MergeJob, out: str | os.PathLike, cluster: ClusterOptions, *,
                      allow_pickle: bool = False, overwrite: bool = False, resume: bool = False,
                      aim: AimFn | None = None,
                      progress: bool = True, pool: WorkerPool | None = None,
                      on_done: Callable[[int, str, int], None] | None = None) -> Path:
    """Merge `job` on K Ray workers into `out` (atomic). `aim(pool)` returns (relax, shard metadata, report)
    and may use the pool to calibrate; `pool` reuses existing workers (else a pool is made and closed)."""
    output = OutputDir(out, overwrite=overwrite, resume=resume)
    own = pool is None
    pool = pool or WorkerPool(cluster)
    try:
        return _merge_on(pool, job, output, MergeOptions.of(job, allow_pickle), aim, progress, on_done)
    finally:
        if own:
            pool.close()


def _merge_on(pool: WorkerPool, job: MergeJob, output: OutputDir, options: MergeOptions, aim: AimFn | None,
              progress: bool,
              on_done: Callable[[int, str, int], None] | None) -> Path:
    started = time.time()
    relax, metadata, report = aim(pool) if aim is not None else (None, {}, {})
    calibrated = time.time()
    work = output.prepare()
    try:
        done = load_progress(job, work)
        todo = [[i for i in run if i not in done] for run in shard_assignment(job, len(pool.actors))]
        bar = _bar(len(job.shards), len(done), progress)
        writers: dict[int, int] = {}

        def record(index: int, digest: str, pid: int) -> None:
            done[index] = digest
            writers[index] = pid
            save_progress(job, work, done)  # a crash from here on keeps this shard for --resume
            bar.update()
            if on_done is not None:
                on_done(index, digest, pid)

        pool.merge_shards(job, options, work, todo, relax, metadata, record)
        bar.close()
        _check_written(job, work, done)
        timings = {"aim_seconds": round(calibrated - started, 3),
                   "merge_seconds": round(time.time() - calibrated, 3)}
        service = {"workers": len(pool.actors), "placement": pool.options.placement, "bundle": pool.bundle,
                   "writer_pids": {str(i): p for i, p in sorted(writers.items())}}
        finalize(job, work, done, {"timings": timings, "service": service, **report})
        return output.commit()
    except AimRayError:
        output.discard()  # bad input: nothing to resume. Crashes keep the hidden work dir for --resume.
        raise


def _check_written(job: MergeJob, work: Path, done: Mapping[int, str]) -> None:
    n = len(job.shards)
    missing = [f for i, f in ((i, shard_filename(i, n)) for i in range(n)) if i not in done
               or not (work / f).exists()]
    if missing:
        raise CheckpointError(f"{work}: shard(s) {missing[:3]} were not written where the driver can see "
                              f"them; --out must be on a filesystem shared by every node")


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="shard", desc="merging", disable=not enabled)
