"""The Ray actor of the merge service: `LayerRangeWorker`, one per GPU (or CPU slot).

A worker is generic: it owns a layer range only while it calibrates (`calibration.StageRunner`, only that
range's base weights loaded, scale hooks on its modules; or a `calibration.SensitivityStage`, which also runs
the backward of its range), and a run of output shards only while it merges
(`engine.write_shard` into the shared hidden work dir). It knows nothing of the pool or the plan: the driver
(`driver.py`) places the actors, chains the pipeline and commits the output. Tensors cross the object store as
numpy arrays (`to_wire` / `from_wire`).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from .calibration import SensitivityStage, StageRunner, cuda_usable, resolve_device
from .checkpoint import DEFAULT_SHARD_SIZE
from .config import MergeConfig
from .engine import MergeJob, RelaxFn, pinned_revisions, prepare, set_merge_threads, write_shard
from .errors import CalibrationError
from .localize import MaskStage, MaskTraining
from .statistics import STATISTIC_KINDS, JobStatistics, start_stage

# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MergeOptions:
    """The `engine.prepare` options besides the config: what a worker needs to rebuild the same MergeJob."""

    seed: int = 0
    allow_pickle: bool = False
    check_finite: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    revisions: tuple[tuple[str, str], ...] = ()  # (hub ref, commit) as the driver resolved them

    @classmethod
    def of(cls, job: MergeJob, allow_pickle: bool = False) -> MergeOptions:
        return cls(job.seed, allow_pickle, job.check_finite, job.shard_size,
                   tuple(sorted(pinned_revisions(job).items())))

    def prepare(self, config: MergeConfig) -> MergeJob:
        return prepare(config, seed=self.seed, allow_pickle=self.allow_pickle, check_finite=self.check_finite,
                       shard_size=self.shard_size, revisions=dict(self.revisions))


# -------------------------------------------------------------------------------------------- the actor


def to_wire(t: torch.Tensor) -> tuple[str, np.ndarray]:
    """A tensor as a numpy array (zero-copy through the object store); bfloat16 travels as int16 bits."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    return str(t.dtype).removeprefix("torch."), t.numpy()


def from_wire(payload: tuple[str, np.ndarray]) -> torch.Tensor:
    dtype, array = payload
    with warnings.catch_warnings():  # arrays from the object store are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class LayerRangeWorker:
    """One worker of the pool. Plain class (testable in-process); `RemoteWorker` is its Ray actor."""

    def __init__(self, worker: int, cpus: float = 1.0) -> None:
        self.worker = worker
        torch.set_num_threads(max(1, int(cpus)))  # the bundle's share, whatever OMP_NUM_THREADS says
        set_merge_threads(int(cpus))
        self._job_key: str | None = None
        self._job: MergeJob | None = None
        self._stage: StageRunner | SensitivityStage | None = None
        self._busy_s = 0.0  # seconds spent in calibration steps since the last start_calibration

    def info(self) -> dict[str, Any]:
        """Where this worker runs (tests and the merge report use it)."""
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        gpus = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        return {"worker": self.worker, "pid": os.getpid(), "node_id": node, "gpu_ids": gpus,
                "device": self._device()}

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this worker process (Linux: ru_maxrss is in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def can_see(self, path: str) -> bool:
        return os.path.exists(path)

    @staticmethod
    def _device() -> str:
        return "cuda" if cuda_usable() else "cpu"

    def compute_device(self, device: str = "auto") -> str:
        """The device this worker calibrates on for `device` (auto: its GPU if Ray assigned one, else cpu);
        a CalibrationError if it was asked for cuda and has no GPU."""
        return resolve_device(device)

    # -- calibration stage ----------------------------------------------------------------------------
    def start_calibration(self, base: str, layer_start: int, layer_end: int, is_first: bool, is_last: bool,
                          dtype: str = "float32", kind: str = "activation", device: str = "auto") -> None:
        """Load only this range's base weights and hook its modules (activation) or make them require
        gradients (sensitivity), restarting any earlier calibration."""
        self._stage, self._busy_s = None, 0.0
        runner = StageRunner(base, layer_start, layer_end, is_first=is_first, is_last=is_last, dtype=dtype,
                             device=resolve_device(device))
        if kind in STATISTIC_KINDS:  # an expert's statistics (data-aware merges): a GramRecorder or FisherStage
            self._stage = start_stage(runner, kind)
        elif kind == "sensitivity":
            self._stage = SensitivityStage(runner)
        else:
            runner.start_recording()
            self._stage = runner

    def start_mask_training(self, base: str, expert: str, layer_start: int, layer_end: int, is_first: bool,
                            is_last: bool, dtype: str, training: MaskTraining, device: str = "auto") -> None:
        """Localize-and-Stitch: this range of the base, with `expert`'s mask logits at their top-k start."""
        self._stage, self._busy_s = None, 0.0
        runner = StageRunner(base, layer_start, layer_end, is_first=is_first, is_last=is_last, dtype=dtype,
                             device=resolve_device(device))
        self._stage = MaskStage(runner, expert, training)

    def update_masks(self) -> None:
        """One step on this range's mask logits from the epoch's gradients (the driver calls it once the
        epoch's blocks have left every stage)."""
        stage = self._stage_of(MaskStage)
        start = time.perf_counter()
        stage.update()
        self._busy_s += time.perf_counter() - start

    def _stage_of(self, kind: type) -> Any:
        if not isinstance(self._stage, kind):  # e.g. this actor was restarted mid-pipeline: its sums are gone
            raise CalibrationError(f"worker {self.worker}: {kind.__name__} calibration stage not set up "
                                   f"(worker restarted?)")
        return self._stage

    def calibrate_step(self, payload: tuple[str, np.ndarray]) -> tuple[str, np.ndarray] | int:
        """Run one micro-batch through this stage. Returns hidden states, or (last stage) the token count."""
        stage = self._stage_of(StageRunner)
        start = time.perf_counter()
        x = from_wire(payload)
        out = stage.forward(x)
        result = int(x.shape[0] * x.shape[1]) if stage.is_last else to_wire(out)  # logits stay here
        self._busy_s += time.perf_counter() - start
        return result

    def sensitivity_forward(self, key: int, payload: tuple[str, np.ndarray]) -> tuple[str, np.ndarray]:
        """Block `key` through this (not last) stage: keep its input, return the output hidden states."""
        stage = self._stage_of(SensitivityStage)
        start = time.perf_counter()
        out = to_wire(stage.forward(key, from_wire(payload)))
        self._busy_s += time.perf_counter() - start
        return out

    def sensitivity_last(self, payload: tuple[str, np.ndarray], labels: tuple[str, np.ndarray] | None = None
                         ) -> tuple[str, np.ndarray] | int:
        """The last stage: forward, loss (entropy; the Fisher's next-token loss on `labels`), backward.
        Returns the gradient of its input hidden states (0 when it is also the first stage)."""
        stage = self._stage_of(SensitivityStage)
        start = time.perf_counter()
        grad = stage.last(from_wire(payload), None if labels is None else from_wire(labels))
        self._busy_s += time.perf_counter() - start
        return 0 if grad is None else to_wire(grad)

    def sensitivity_backward(self, key: int, payload: tuple[str, np.ndarray]) -> tuple[str, np.ndarray] | int:
        """The gradient of block `key`'s output of this stage in, the gradient of its input out (0 for the
        first stage): this stage's parameters add their |gradient|."""
        stage = self._stage_of(SensitivityStage)
        start = time.perf_counter()
        grad = stage.backward(key, from_wire(payload))
        self._busy_s += time.perf_counter() - start
        return 0 if grad is None else to_wire(grad)

    def busy_seconds(self) -> float:
        """Compute time of the last calibration on this stage (pipeline utilisation = busy / wall)."""
        return self._busy_s

    def get_scales(self) -> dict[str, np.ndarray]:
        if self._stage is None:
            raise CalibrationError(f"worker {self.worker}: no calibration stage")
        return {name: t.numpy() for name, t in self._stage.scales().items()}

    def get_aliases(self) -> dict[str, str]:
        """Gram statistics: the modules that read another module's input (their matrix is that module's)."""
        recorder = getattr(self._stage, "recorder", None)
        return dict(getattr(recorder, "aliases", {}))

    def stop_calibration(self) -> None:
        """Drop the stage's weights before merging."""
        if isinstance(self._stage, StageRunner):
            self._stage.stop_recording()
        self._stage = None

    # -- merge ----------------------------------------------------------------------------------------
    def job(self, config: MergeConfig, options: MergeOptions) -> MergeJob:
        key = f"{config.model_dump_json()}|{options}"
        if self._job_key != key:  # keep one job: its checkpoints hold memory maps
            self._job, self._job_key = options.prepare(config), key
        assert self._job is not None
        return self._job

    def write_shard(self, config: MergeConfig, options: MergeOptions, work_dir: str, index: int,
                    relax: RelaxFn | None, metadata: dict[str, str] | None,
                    statistics: JobStatistics | None = None) -> tuple[int, str, int]:
        """Write shard `index` into the work dir; returns (index, sha256, pid). `statistics`: the experts'
        statistics of this shard's tensors (data-aware methods)."""
        job = self.job(config, options)
        job.statistics = statistics
        digest = write_shard(job, Path(work_dir), index, relax, metadata)
        return index, digest, os.getpid()


RemoteWorker = ray.remote(LayerRangeWorker)
