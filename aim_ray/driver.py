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
- Sensitivity scales are a pipeline too, one block at a time, forward down the stages and backward up them
  (`calibration.SensitivityStage`): the last stage returns the gradient of its input hidden states as an
  object ref, stage k backpropagates it through its own layers and hands back the gradient of its input. The
  driver submits the forward of block i+W before the backward of block i (W blocks in flight), so stages
  overlap, and each stage adds its blocks' gradients in block order: bit-identical to
  `collect_sensitivity_scales`. No worker holds more than its own layer range.
- Compute device and dtype: `auto` is resolved per worker (its GPU if Ray assigned one, else cpu); an `auto`
  dtype is bfloat16 when every stage is on a GPU, else float32 (one dtype for the whole pipeline, the one in
  the cache key).
- Merge: the global shard plan (independent of K) is cut into K contiguous runs balanced by bytes. Every
  worker rebuilds the `MergeJob` from the picklable config (`engine.prepare`) and writes its shards with
  `engine.write_shard` into the shared hidden work dir; the driver records progress as shards complete (for
  `--resume`), then `engine.finalize` and an atomic commit. Outputs are byte-identical for every K.
- Faults: actors have `max_restarts` and their calls `max_task_retries`, so a killed worker comes back and
  redoes its unfinished shards (a shard is written to a `.tmp` unique to the attempt and renamed when
  complete; the commit checks every shard's sha256 and drops stale `.tmp` files). A worker whose
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

import functools
import math
import os
import time
import uuid
import warnings
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
from .architectures import text_config
from .calibration import (
    check_finite,
    device_kind,
    is_pipelined,
    iter_micro_batches,
    load_calibration_blocks,
    load_tokenizer,
    one_stage_note,
    resolve_dtype,
    scales_artifact,
    scales_cache_path,
)
from .checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, OutputDir, shard_filename
from .config import CalibrationConfig, MergeConfig
from .engine import MergeJob, RelaxFn, finalize, prepare
from .errors import AimRayError, CalibrationError, CheckpointError, ClusterError, ConfigError
from .localize import MaskTraining
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
from .resume import PROGRESS, Progress
from .scales import Scales
from .statistics import STATISTIC_KINDS, attach_statistics, finish_fisher

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
    call_timeout_s: float = 1800.0  # the longest one worker call may take (a stage load, a shard write)
    lost_worker_grace_s: float = 60.0  # a worker whose node died gets this long to come back elsewhere

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.cpus_per_worker < 0 or (self.gpus_per_worker or 0) < 0:
            raise ConfigError("--cpus-per-worker and --gpus-per-worker must not be negative")
        if min(self.ready_timeout_s, self.call_timeout_s, self.lost_worker_grace_s) <= 0:
            raise ConfigError("ready_timeout_s, call_timeout_s and lost_worker_grace_s must be positive")

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
        self.workers = list(range(options.workers))  # the worker number of each live actor
        try:  # the first call waits for the actors to start (a torch import each)
            self.nodes = [i["node_id"] for i in self.call_all("info", timeout_s=options.ready_timeout_s)]
        except BaseException:
            self.close()
            raise

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
        return self.call_all("info")

    def call_all(self, method: str, *args_per_actor: Sequence[Any], timeout_s: float | None = None) -> list[Any]:
        """`method` on every actor (argument lists: one entry per actor), results in actor order. A timeout
        names the workers that did not answer and their nodes."""
        refs = [getattr(a, method).remote(*(args[i] for args in args_per_actor)) for i, a in enumerate(self.actors)]
        return self.get(refs, timeout_s, method)

    def get(self, refs: list[ray.ObjectRef], timeout_s: float | None, what: str) -> list[Any]:
        """`ray.get` of one ref per actor (in actor order) with a timeout naming the late workers."""
        timeout_s = timeout_s or self.options.call_timeout_s
        done, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if late:
            _abandon(late, timeout_s=0)
            names = [self.describe(refs.index(r)) for r in late]
            raise ClusterError(f"{what}: no answer within {timeout_s:.0f} s from {', '.join(names)}")
        return _get(refs)

    def describe(self, position: int) -> str:
        """'worker K on node ID (IP)' for log lines and errors."""
        node = self.nodes[position] if position < len(getattr(self, "nodes", [])) else None
        return f"worker {self.workers[position]} on node {_node_label(node)}"

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
    def compute(self, device: str = "auto", dtype: str = "auto", timeout_s: float = 120.0
                ) -> tuple[list[str], str]:
        """(device of each worker, the pipeline's dtype) for `device` / `dtype` (`auto` resolved as in the
        module docstring). Raises the workers' CalibrationError for cuda on a worker without a GPU."""
        devices = self.get([a.compute_device.remote(device) for a in self.actors], timeout_s, "compute_device")
        return devices, resolve_dtype(dtype, devices)

    def calibrate(self, base: str, ranges: Sequence[LayerRange], blocks: torch.Tensor, micro_batch: int,
                  dtype: str = "float32", max_inflight: int | None = None,
                  attempts: int = 2, kind: str = "activation", device: str = "auto",
                  timeout_s: float | None = None, aliases: dict[str, str] | None = None
                  ) -> dict[str, torch.Tensor]:
        """Pipelined scales of `kind` over `ranges` (one stage per worker, in order; fewer ranges than workers
        use the first workers only, e.g. one whole-model stage). A failure inside the
        pipeline (a worker died and lost its sums) reruns the whole calibration, up to `attempts` times.
        `timeout_s` (default `call_timeout_s`) bounds every wait on a worker (one pipeline step, a stage's
        setup); a timeout is a ClusterError naming the workers. Sensitivity runs one
        block per step (`micro_batch` is ignored); `max_inflight` is then the blocks between forward and
        backward."""
        if not 1 <= len(ranges) <= len(self.actors):
            raise ValueError(f"{len(ranges)} ranges for {len(self.actors)} workers")
        stages = self.actors[:len(ranges)]
        timeout_s = timeout_s or self.options.call_timeout_s
        if kind not in ("activation", "sensitivity", *STATISTIC_KINDS):
            raise CalibrationError(f"aim.kind must be 'activation' or 'sensitivity', got {kind!r}")
        _, dtype = self.compute(device, dtype)
        backward = kind in ("sensitivity", "fisher")
        once = functools.partial(self._sensitivity_once, labels=kind == "fisher") if backward \
            else self._calibrate_once
        for attempt in range(attempts):
            try:
                self.get([a.start_calibration.remote(base, r.layers.start, r.layers.stop, r.has_embed, r.has_head,
                                                     dtype, kind, device)
                          for a, r in zip(stages, ranges, strict=True)], timeout_s, "loading the stages")
                once(stages, blocks, micro_batch, max_inflight, timeout_s)
                scales: dict[str, torch.Tensor] = {}
                for part in self.get([a.get_scales.remote() for a in stages], timeout_s, "get_scales"):
                    scales.update({name: torch.from_numpy(np.array(arr)) for name, arr in part.items()})
                if aliases is not None:  # gram statistics: which modules share another's input matrix
                    for part in self.get([a.get_aliases.remote() for a in stages], timeout_s, "get_aliases"):
                        aliases.update(part)
                self.get([a.stop_calibration.remote() for a in stages], timeout_s, "stop_calibration")
                return scales
            except (ray.exceptions.RayActorError, CalibrationError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def train_masks(self, base: str, expert: str, ranges: Sequence[LayerRange], blocks: torch.Tensor,
                    training: MaskTraining, dtype: str = "float32", device: str = "auto", attempts: int = 2,
                    timeout_s: float | None = None) -> dict[str, torch.Tensor]:
        """`expert`'s Localize-and-Stitch masks over `base` (`localize.MaskStage`, one stage per range). Each
        epoch pipelines every block forward and backward (labels: the token ids), then updates every stage once
        the epoch's blocks have drained: the masks do not depend on the number of stages. Reruns from scratch
        on a lost worker, as `calibrate`."""
        stages = self.actors[:len(ranges)]
        timeout_s = timeout_s or self.options.call_timeout_s
        for attempt in range(attempts):
            try:
                self.get([a.start_mask_training.remote(base, expert, r.layers.start, r.layers.stop, r.has_embed,
                                                       r.has_head, dtype, training, device)
                          for a, r in zip(stages, ranges, strict=True)], timeout_s, "loading the mask stages")
                for _ in range(training.epochs):
                    self._sensitivity_once(stages, blocks, 1, None, timeout_s, labels=True)
                    self.get([a.update_masks.remote() for a in stages], timeout_s, "update_masks")
                masks: dict[str, torch.Tensor] = {}
                for part in self.get([a.get_scales.remote() for a in stages], timeout_s, "get_scales"):
                    masks.update({name: torch.from_numpy(np.array(arr)) for name, arr in part.items()})
                self.get([a.stop_calibration.remote() for a in stages], timeout_s, "stop_calibration")
                return masks
            except (ray.exceptions.RayActorError, CalibrationError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _calibrate_once(self, stages: Sequence[Any], blocks: torch.Tensor, micro_batch: int,
                        max_inflight: int | None, timeout_s: float) -> None:
        window = max_inflight or 2 * len(stages)
        inflight: list[ray.ObjectRef] = []
        for batch in iter_micro_batches(blocks, micro_batch):
            if len(inflight) >= window:  # bound the hidden states alive in the object store
                self._pipeline_get([inflight.pop(0)], timeout_s)
            ref = ray.put(to_wire(batch))
            for actor in stages:  # stage k's output ref is stage k+1's input: no driver round trip
                ref = actor.calibrate_step.remote(ref)
            inflight.append(ref)
        self._pipeline_get(inflight, timeout_s)

    def _sensitivity_once(self, stages: Sequence[Any], blocks: torch.Tensor, micro_batch: int,
                          max_inflight: int | None, timeout_s: float, labels: bool = False) -> None:
        """One block per step (|grad| is per block, as in process). Each actor runs its calls in submission
        order, so submitting forward(i + W) before backward(i) is what overlaps the stages; it cannot
        deadlock: backward(i) on stage k waits only on stage k+1's calls submitted before it."""
        *body, last = stages
        window = max_inflight or 2 * len(stages)
        waiting: list[tuple[int, ray.ObjectRef]] = []  # blocks whose backward is not submitted yet
        finished: list[ray.ObjectRef] = []

        def backward(i: int, grad: ray.ObjectRef) -> None:
            for actor in reversed(body):
                grad = actor.sensitivity_backward.remote(i, grad)
            finished.append(grad)
            if len(finished) > window:
                self._pipeline_get([finished.pop(0)], timeout_s)

        for i in range(blocks.shape[0]):
            ref = ray.put(to_wire(blocks[i:i + 1]))
            for actor in body:
                ref = actor.sensitivity_forward.remote(i, ref)
            ids = ray.put(to_wire(blocks[i:i + 1])) if labels else None  # the Fisher's next-token targets
            waiting.append((i, last.sensitivity_last.remote(ref, ids)))
            if len(waiting) >= window:
                backward(*waiting.pop(0))
        for i, grad in waiting:
            backward(i, grad)
        self._pipeline_get(finished, timeout_s)

    def _pipeline_get(self, refs: list[ray.ObjectRef], timeout_s: float) -> None:
        """Wait for micro-batches to leave the pipeline; each passed one call per stage, so the wait is bounded
        by K steps. A timeout names every stage (which one is stuck is not visible from the last stage's ref)."""
        timeout_s = timeout_s * len(self.actors)
        _, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if late:
            stages = ", ".join(self.describe(k) for k in range(len(self.actors)))
            raise ClusterError(f"calibration pipeline: a micro-batch did not pass every stage within "
                               f"{timeout_s:.0f} s (stages: {stages})")
        _get(refs)

    # -- merge ----------------------------------------------------------------------------------------
    def merge_shards(self, job: MergeJob, options: MergeOptions, work: Path, todo: Sequence[Sequence[int]],
                     relax: RelaxFn | None = None, metadata: dict[str, str] | None = None,
                     on_done: Callable[[int, str, int], None] | None = None) -> dict[int, str]:
        """Write shard indices `todo[k]` on worker k, concurrently. `on_done(index, sha256, pid)` is called
        in the driver as each shard completes. The shards of a worker that is gone for good (its restarts
        used up, or its node dead and no capacity to restart it elsewhere) go to the surviving workers."""
        self._check_shared_dir(work)
        cfg = ray.put(job.config)
        indices = [i for run in todo for i in run]
        relax_refs = _relax_per_shard(job, relax, indices)
        stats_refs = _statistics_per_shard(job, indices)

        def submit(k: int, index: int) -> ray.ObjectRef:
            return self.actors[k].write_shard.remote(cfg, options, str(work), index, relax_refs[index], metadata,
                                                     stats_refs[index])

        run = ShardRun(self, submit)
        for k, indices in enumerate(todo):
            for index in indices:
                run.submit(k, index)
        try:
            digests = run.wait_all(on_done)
        except BaseException:
            _abandon(list(run.pending))
            raise
        finally:
            self._forget(run.lost)
        return digests

    def _forget(self, lost: set[int]) -> None:
        """Drop lost workers from the pool (later merges and calibrations use the survivors)."""
        keep = [k for k in range(len(self.actors)) if k not in lost]
        self.actors = [self.actors[k] for k in keep]
        self.workers = [self.workers[k] for k in keep]
        self.nodes = [self.nodes[k] for k in keep]

    def _check_shared_dir(self, work: Path) -> None:
        """Workers write into the driver's work dir: it must be the same directory on every node."""
        marker = work / f".aim-ray-visible-{uuid.uuid4().hex}"
        marker.touch()
        try:
            seen = self.call_all("can_see", [str(marker)] * len(self.actors))
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
    """`ray.get` of refs a timed `ray.wait` found ready, re-raising a user error (`AimRayError`) raised in a
    worker as itself (no Ray wrapper)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, AimRayError):
            raise cause from None
        raise



def _node_label(node_id: str | None) -> str:
    """A node's short id and address, from the GCS (no dashboard needed)."""
    if node_id is None:
        return "?"
    ip = next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)
    return f"{node_id[:8]}" + (f" ({ip})" if ip else "")


def _dead_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if not n.get("Alive", False)}


def _relax_per_shard(job: MergeJob, relax: RelaxFn | None, indices: Sequence[int]) -> dict[int, Any]:
    """One object ref per shard holding only the scales of that shard's tensors (an `AimRelaxer` restricted
    with `for_tensors`), so no worker receives the full-model scales; a shard moved to another worker takes
    its own ref along. Other relax functions travel whole, once."""
    if relax is None:
        return dict.fromkeys(indices)
    restrict = getattr(relax, "for_tensors", None)
    if restrict is None:
        ref = ray.put(relax)
        return dict.fromkeys(indices, ref)
    return {i: ray.put(restrict([t.name for t in job.shards[i]])) for i in indices}


def _statistics_per_shard(job: MergeJob, indices: Sequence[int]) -> dict[int, Any]:
    """One object ref per shard holding only the experts' statistics of that shard's tensors."""
    if job.statistics is None:
        return dict.fromkeys(indices)
    return {i: ray.put(job.statistics.restricted([t.name for t in job.shards[i]])) for i in indices}


POLL_S = 1.0  # how often the merge loop looks at node health while no shard completes


class ShardRun:
    """One parallel shard write: submit, collect, move the shards of lost workers, time out a stall.

    A worker is lost when its calls fail after its restarts (RayActorError), or when its node is dead and it
    has not answered a ping within `lost_worker_grace_s` (Ray keeps such an actor RESTARTING forever when no
    node has room for its bundle; its queued calls would wait with it). A lost worker is killed (no restart),
    and its outstanding shards are resubmitted round-robin to the live ones. Writers use unique temporary
    files and an atomic rename, and shards are deterministic, so a late write from a partitioned node is
    harmless."""

    def __init__(self, pool: WorkerPool, submit: Callable[[int, int], ray.ObjectRef]) -> None:
        self.pool = pool
        self._submit = submit
        self.pending: dict[ray.ObjectRef, tuple[int, int]] = {}
        self.lost: set[int] = set()
        self.moved: dict[int, int] = {}  # shard -> the worker position it was moved to
        self._suspects: dict[int, tuple[float, ray.ObjectRef]] = {}  # position -> (since, ping)
        self._last_progress = time.monotonic()

    def submit(self, k: int, index: int) -> None:
        self.pending[self._submit(k, index)] = (k, index)

    def wait_all(self, on_done: Callable[[int, str, int], None] | None) -> dict[int, str]:
        digests: dict[int, str] = {}
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=POLL_S)
            if not ready:
                self._watch()
                continue
            k, index = self.pending.pop(ready[0])
            try:
                _, digest, pid = _get(ready[0])
            except ray.exceptions.RayActorError:  # restarts exhausted: move its work
                self._lose(k, "its restarts are used up")
                self._move(index)
                continue
            self._last_progress = time.monotonic()
            self._suspects.pop(k, None)
            digests[index] = digest
            if on_done is not None:
                on_done(index, digest, pid)
        return digests

    def _alive(self) -> list[int]:
        return [k for k in range(len(self.pool.actors)) if k not in self.lost]

    def _move(self, index: int) -> None:
        alive = self._alive()
        if not alive:
            raise ClusterError(f"every worker is lost; shard {index} and others are unwritten (the finished "
                               f"shards are kept: rerun with --resume)")
        k = alive[index % len(alive)]
        self.moved[index] = k
        self.submit(k, index)

    def _lose(self, k: int, why: str) -> None:
        if k in self.lost:
            return
        warnings.warn(f"{self.pool.describe(k)} is lost ({why}); its shards move to the other workers",
                      stacklevel=2)
        self.lost.add(k)
        self._suspects.pop(k, None)
        ray.kill(self.pool.actors[k], no_restart=True)
        for ref, (owner, index) in list(self.pending.items()):
            if owner == k:
                del self.pending[ref]
                self._move(index)

    def _watch(self) -> None:
        """No shard finished in the last poll: check the nodes of busy workers, then the stall timeout."""
        now = time.monotonic()
        busy = {k for k, _ in self.pending.values()}
        dead = _dead_nodes() if busy else set()
        for k in busy - self.lost:
            if self.pool.nodes[k] in dead and k not in self._suspects:
                self._suspects[k] = (now, self.pool.actors[k].info.remote())
        for k, (since, ping) in list(self._suspects.items()):
            self._check_suspect(k, since, ping, now)
        if now - self._last_progress > self.pool.options.call_timeout_s:
            late = sorted({k for k, _ in self.pending.values()})
            names = ", ".join(self.pool.describe(k) for k in late)
            raise ClusterError(f"no shard finished in {self.pool.options.call_timeout_s:.0f} s; waiting on "
                               f"{names} (the finished shards are kept: rerun with --resume)")

    def _check_suspect(self, k: int, since: float, ping: ray.ObjectRef, now: float) -> None:
        ready, _ = ray.wait([ping], timeout=0)
        if ready:
            try:
                self.pool.nodes[k] = _get(ping)["node_id"]  # restarted on a node with room: carry on
                del self._suspects[k]
            except ray.exceptions.RayActorError:
                self._lose(k, "its node is dead and it could not restart")
        elif now - since > self.pool.options.lost_worker_grace_s:
            self._lose(k, f"its node died and it did not restart within "
                          f"{self.pool.options.lost_worker_grace_s:.0f} s: no node has room for it")


# ------------------------------------------------------------------------------------------ the driver


def layer_ranges(job: MergeJob, workers: int) -> list[LayerRange]:
    """K contiguous block ranges of the model balanced by bytes (embeddings first, head last)."""
    return plan_ranges({t.name: t.nbytes for t in job.outputs}, job.n_layers, workers)


def calibration_ranges(job: MergeJob, workers: int) -> list[LayerRange]:
    """The calibration stages: `layer_ranges`, or one whole-model stage (on the pool's first worker) with a
    warning naming the family when it has no pipelined stage runner."""
    if is_pipelined(job.base):
        return layer_ranges(job, workers)
    warnings.warn(one_stage_note(job.base, " on one worker of the pool"), stacklevel=3)
    return plan_ranges({t.name: t.nbytes for t in job.outputs}, job.n_layers, 1)


def shard_assignment(job: MergeJob, workers: int) -> list[range]:
    return assign_shards([sum(t.nbytes for t in shard) for shard in job.shards], workers)


def service_plan(job: MergeJob, options: ClusterOptions, calibration: CalibrationConfig | None = None,
                 kind: str = "activation") -> ServicePlan:
    """What `--dry-run` prints: per worker, its layer range, shards, bytes and memory estimates
    (calibration memory only when the merge calibrates)."""
    ranges = layer_ranges(job, options.workers)
    runs = shard_assignment(job, options.workers)
    shards = job.shards
    workers = []
    whole = plan_ranges({t.name: t.nbytes for t in job.outputs}, job.n_layers, 1)[0]
    for r, run in zip(ranges, runs, strict=True):
        tensors = [t for i in run for t in shards[i]]
        stage = r if is_pipelined(job.base) else (whole if r.worker == 0 else None)  # else one stage on worker 0
        calib = _calibration_bytes(job, stage, calibration, kind) if calibration and stage else 0
        largest = max((math.prod(t.shape) for t in tensors), default=0)
        workers.append(WorkerPlan(r, run, sum(t.nbytes for t in tensors), calib, merge_memory(largest)))
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else "auto"
    bundle = {**options.bundle(0), **({"GPU": gpus} if gpus else {})}
    return ServicePlan(workers, len(shards), sum(t.nbytes for t in job.outputs), options.placement, bundle)


def _calibration_bytes(job: MergeJob, r: LayerRange, c: CalibrationConfig, kind: str) -> int:
    """Peak bytes of one calibration stage, in the compute dtype (auto counts as float32: an upper bound).
    Sensitivity: one block at a time, but autograd keeps every layer's activations, float32 |grad| sums
    and the logits' softmax and gradient."""
    width = 2 if c.dtype in ("bfloat16", "float16") else 4
    weights = r.nbytes * width // job.out_dtype.itemsize
    cfg = text_config(job.base.config)  # a multimodal model: its language model's sizes
    hidden = cfg.get("hidden_size", cfg.get("n_embd", 0))  # GPT-2 names it n_embd (MLP: 4 * n_embd)
    inter, vocab = cfg.get("intermediate_size", cfg.get("n_inner") or 4 * hidden), cfg.get("vocab_size", 0)
    if kind != "sensitivity":
        return calibration_memory(weights, c.micro_batch * c.block_size, hidden, inter, vocab, r.has_head, width)
    per_layer = calibration_memory(0, c.block_size, hidden, inter, 0, False, width)
    sums = r.nbytes * 4 // job.out_dtype.itemsize
    return weights + sums + per_layer * max(1, len(r.layers)) + (3 * c.block_size * vocab * 4 if r.has_head else 0)


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
            + (f", pipelined over {cluster.workers} stage(s)" if is_pipelined(job.base) else
               f", one whole-model stage (model_type {job.base.config.get('model_type')!r} has no pipelined "
               f"stage runner)"))
        lines.append(f"AIM omega={aim.omega}, {source}")
    if cluster.workers == 1:
        lines.append("--workers 1: runs in this process, without Ray")
    plan = service_plan(job, cluster, aim.calibration_or_default() if calibrates and aim else None,
                        aim.kind if aim else "activation")
    lines.append(plan.describe())
    return "\n".join(lines)


def distributed_scales(pool: WorkerPool, job: MergeJob, calibration: CalibrationConfig,
                       dtype: str | None = None, cache_root: str | os.PathLike | None = None,
                       refresh: bool = False, kind: str = "activation") -> Scales:
    """Scales of the merge's base (`kind`), computed by the pipeline, cached exactly like
    `calibration.cached_calibrate` (same key: base, settings, resolved compute dtype, kind), so one calibration
    serves single-process runs too. `dtype` None: the calibration's (default auto)."""
    c = calibration
    base = job.base
    devices, dtype = pool.compute(c.device, dtype or c.dtype)
    path = scales_cache_path(base, c.dataset, c.n_samples, c.block_size, c.n_blocks, c.split, dtype, kind,
                             cache_root)
    if path.exists() and not refresh:
        return Scales.load(path)
    blocks = load_calibration_blocks(load_tokenizer(base.path), c.dataset, c.n_samples, c.block_size,
                                     c.n_blocks, c.split)
    ranges = calibration_ranges(job, len(pool.actors))
    tensors = pool.calibrate(base.ref, ranges, blocks, c.micro_batch, dtype, kind=kind, device=c.device)  # pinned
    check_finite(tensors, dtype)
    device = "+".join(sorted({device_kind(d) for d in devices}))
    scales = scales_artifact(base, tensors, kind, c.dataset, c.n_samples, c.block_size, blocks, c.split, dtype,
                             device)
    scales.save(path)
    return scales


class PipelineCollector:
    """Expert statistics on the pool: one pipeline pass per expert over the same stages as the calibration, so
    no worker holds more than its own layer range; cached with the single-process path's key."""

    def __init__(self, pool: WorkerPool, job: MergeJob) -> None:
        self.pool = pool
        self.ranges = calibration_ranges(job, len(pool.actors))

    def dtype(self, data: CalibrationConfig) -> str:
        return self.pool.compute(data.device, data.dtype)[1]

    def collect(self, model: Checkpoint, blocks: torch.Tensor, kind: str, data: CalibrationConfig, dtype: str,
                base: Checkpoint | None = None, training: MaskTraining | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if kind == "mask":
            return self.pool.train_masks(base.ref, model.ref, self.ranges, blocks, training, dtype, data.device), {}
        aliases: dict[str, str] = {}
        tensors = self.pool.calibrate(model.ref, self.ranges, blocks, data.micro_batch, dtype, kind=kind,
                                      device=data.device, aliases=aliases)
        if kind == "fisher":
            tensors = finish_fisher(model, tensors, int(blocks.shape[0]))
        return tensors, aliases


AimFn = Callable[["WorkerPool"], tuple[RelaxFn | None, dict[str, str], dict[str, Any]]]


def pool_aim(job: MergeJob) -> AimFn:
    """AIM for a distributed merge: scales from an `aim.calibration` (activation or sensitivity) come from the
    pipeline on the pool (cache shared with the single-process path); a scales file goes through
    `relaxer.aim_for_job` as in the single-process path. Either way the relaxation is the same object."""

    def aim(pool: WorkerPool) -> tuple[RelaxFn | None, dict[str, str], dict[str, Any]]:
        cfg = job.config.aim
        if cfg is None or cfg.scales is not None:
            return aim_for_job(job)
        return aim_for_job(job, distributed_scales(pool, job, cfg.calibration_or_default(), kind=cfg.kind))

    return aim


def distributed_merge(job: MergeJob, out: str | os.PathLike | OutputDir, cluster: ClusterOptions, *,
                      allow_pickle: bool = False, overwrite: bool = False, resume: bool = False,
                      aim: AimFn | None = None,
                      progress: bool = True, pool: WorkerPool | None = None,
                      on_done: Callable[[int, str, int], None] | None = None) -> Path:
    """Merge `job` on K Ray workers into `out` (atomic). `aim(pool)` returns (relax, shard metadata, report)
    and may use the pool to calibrate; `pool` reuses existing workers (else a pool is made and closed)."""
    output = out if isinstance(out, OutputDir) else OutputDir(out, overwrite=overwrite, resume=resume)
    own = pool is None
    with output.locked():  # before the pool starts, anything is calibrated, deleted or written
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
    report = {**report, **attach_statistics(job, PipelineCollector(pool, job))}
    calibrated = time.time()
    work = output.prepare()
    state = Progress(job, work, relax, metadata)
    done = state.load(output.resume)  # a refused resume leaves the work dir as it was
    try:
        todo = [[i for i in run if i not in done] for run in shard_assignment(job, len(pool.actors))]
        bar = _bar(len(job.shards), len(done), progress)
        writers: dict[int, int] = {}

        def record(index: int, digest: str, pid: int) -> None:
            state.record(index, digest)  # a crash from here on keeps this shard for --resume
            writers[index] = pid
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
        finalize(job, work, done, {"timings": timings, "service": service,
                                   "resumed_shards": state.resumed_names(), **report})
        return output.commit(state.shard_digests(), scratch=[PROGRESS])
    except AimRayError as e:
        # Bad input: finished shards are kept for --resume (the error says so); with none, nothing is left.
        # Crashes keep the hidden work dir as it is.
        raise output.abandon(e, len(done)) from None
    finally:
        state.close()


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
