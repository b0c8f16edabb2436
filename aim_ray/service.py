"""The merge driver used by the CLI and the Ray jobs: validate, get AIM scales, merge, commit.

With `workers=1` (the default) everything runs in this process through `engine`. With more workers the
same per-tensor functions run inside Ray actors (see `actors.py`); the output is bit-identical.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .aim import factor_for, relax, scale_for, validate_omega
from .calibration import cached_calibrate
from .checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, OutputDir
from .config import AimConfig, MergeConfig, parse_config
from .engine import MergeJob, model_dtype, prepare, run_merge
from .errors import ConfigError
from .scales import Scales, has_tied_embeddings

if TYPE_CHECKING:
    from .actors import ClusterOptions


def merge_from_config(cfg: MergeConfig, out: str | os.PathLike, *, seed: int = 0,
                      shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, resume: bool = False,
                      allow_pickle: bool = False, check_finite: bool = True, progress: bool = True,
                      workers: int = 1, address: str | None = None,
                      cluster: ClusterOptions | None = None) -> Path:
    """Merge (and relax, if `cfg.aim`) into `out`. Every input is validated before anything is written.

    More than one worker (`workers`, or `cluster.workers`) runs the merge on Ray (`actors.distributed_merge`,
    attaching to `address` / RAY_ADDRESS or starting a local cluster); one worker never imports Ray."""
    job = prepare(cfg, seed=seed, allow_pickle=allow_pickle, check_finite=check_finite, shard_size=shard_size)
    OutputDir(out, overwrite=overwrite, resume=resume)  # refuse an existing output before any long work
    if (cluster.workers if cluster is not None else workers) > 1:
        from .actors import ClusterOptions, distributed_merge, pool_aim

        cluster = cluster or ClusterOptions(workers=workers, address=address)
        return distributed_merge(job, out, cluster, allow_pickle=allow_pickle, overwrite=overwrite,
                                 resume=resume, aim=pool_aim(job), progress=progress)
    relax, metadata, report = aim_for_job(job)
    return run_merge(job, out, overwrite=overwrite, resume=resume, relax=relax, metadata=metadata,
                     report=report, progress=progress)


def relax_checkpoint(base: str, merged: str, out: str | os.PathLike, *, omega: float, scales: str | None = None,
                     kind: str = "activation", force: bool = False, calibration: dict[str, Any] | None = None,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """AIM on any merged checkpoint: task arithmetic with the merged model as the one expert gives exactly
    delta = merged - base, which is then relaxed. Vocabulary and tokenizer follow the merged model."""
    merged_ckpt = Checkpoint.open(merged)
    aim = {"omega": omega, "kind": kind, "force": force}
    aim.update({"scales": scales} if scales else {"calibration": {k: v for k, v in (calibration or {}).items()
                                                                   if v is not None}})
    cfg = parse_config(MergeConfig, {
        "merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": str(merged),
        "models": [{"model": str(merged), "parameters": {"weight": 1.0}}],
        "out_dtype": str(model_dtype(merged_ckpt)).removeprefix("torch."), "aim": aim}, "relax options")
    return merge_from_config(cfg, out, overwrite=overwrite, progress=progress)


class AimRelaxer:
    """The AIM hook `engine.merge_tensor` calls per tensor. Picklable, so Ray workers get it as is."""

    def __init__(self, scales: Mapping[str, torch.Tensor], kind: str, omega: float, tied: bool) -> None:
        self.scales = dict(scales)
        self.kind = kind
        self.omega = validate_omega(omega)
        self.tied = tied

    def __call__(self, name: str, theta_pre: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        choice = scale_for(name, self.scales, self.tied, self.kind)
        return relax(name, theta_pre, delta, choice.scale, self.omega)

    def factor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The multiplier of delta (per column or per element; None: 1), for the engine's fused apply:
        `theta_pre + factor * delta` is exactly what __call__ computes."""
        return factor_for(name, shape, scale_for(name, self.scales, self.tied, self.kind).scale, self.omega)

    def notes(self, names: list[str]) -> list[str]:
        """Checks every tensor has its scales (before any write) and returns the notes to record."""
        return [n for n in (scale_for(name, self.scales, self.tied, self.kind).note for name in names) if n]


def load_or_calibrate(job: MergeJob, aim: AimConfig) -> Scales:
    """The scales named by `aim.scales` (validated against the base), or a cached calibration."""
    if aim.scales is not None:
        scales = Scales.load(aim.scales)
        if scales.kind != aim.kind:
            raise ConfigError(f"aim.scales {aim.scales}: holds {scales.kind} scales but aim.kind is {aim.kind!r}")
        scales.validate(job.base, force=aim.force)
        return scales
    cal = aim.calibration_or_default()
    return cached_calibrate(job.base, dataset=cal.dataset, n_samples=cal.n_samples, block_size=cal.block_size,
                            n_blocks=cal.n_blocks, kind=aim.kind, split=cal.split, micro_batch=cal.micro_batch)


def aim_for_job(job: MergeJob, scales: Scales | None = None
                ) -> tuple[AimRelaxer | None, dict[str, str], dict[str, Any]]:
    """The AIM relaxation for this merge (None without an `aim:` section), shard metadata and report."""
    aim = job.config.aim
    if aim is None:
        return None, {}, {}
    scales = scales if scales is not None else load_or_calibrate(job, aim)
    relaxer = AimRelaxer(scales, scales.kind, aim.omega, has_tied_embeddings(job.base))
    notes = relaxer.notes([o.name for o in job.outputs])
    job.notes.extend(notes)
    metadata = {"aim_omega": repr(aim.omega), "aim_kind": scales.kind,
                "aim_scales_base_hash": scales.content_hash, **({"aim_note": "; ".join(notes)} if notes else {})}
    report = {"aim": {"omega": aim.omega, "kind": scales.kind, "scales": scales.metadata(), "notes": notes}}
    return relaxer, metadata, report
