"""AIM as the merge engine's per-tensor hook: the scales a merge uses (a file or a cached calibration) and
the picklable `AimRelaxer` that both the single-process and the Ray paths hand to `engine`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from .aim import factor_for, relax, scale_for, validate_omega
from .architectures import input_axis
from .calibration import cached_calibrate
from .config import AimConfig
from .engine import MergeJob
from .errors import ConfigError
from .scales import Scales, has_tied_embeddings


class AimRelaxer:
    """The AIM hook `engine.merge_tensor` calls per tensor. Picklable, so Ray workers get it as is."""

    def __init__(self, scales: Mapping[str, torch.Tensor], kind: str, omega: float, tied: bool,
                 axes: Mapping[str, int] | None = None) -> None:
        self.scales = dict(scales)
        self.kind = kind
        self.omega = validate_omega(omega)
        self.tied = tied
        self.axes = dict(axes or {})  # tensor -> input-channel dimension where it is not the last (Conv1D)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """sha256 of what this relaxation computes (the scales' bytes, kind, omega, tying), for --resume."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.kind}|{self.omega!r}|{self.tied}".encode())
            if self.axes:
                h.update(f"|axes|{sorted(self.axes.items())}".encode())
            for name in sorted(self.scales):
                t = self.scales[name].detach().cpu().contiguous()
                h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __call__(self, name: str, theta_pre: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        choice = scale_for(name, self.scales, self.tied, self.kind)
        return relax(name, theta_pre, delta, choice.scale, self.omega, self.axes.get(name, -1))

    def factor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The multiplier of delta (per column or per element; None: 1), for the engine's fused apply:
        `theta_pre + factor * delta` is exactly what __call__ computes."""
        return factor_for(name, shape, scale_for(name, self.scales, self.tied, self.kind).scale, self.omega,
                          self.axes.get(name, -1))

    def for_tensors(self, names: list[str]) -> AimRelaxer:
        """The same relaxation holding only the scales `names` need (what one shard's writer receives)."""
        keys = {c.key for c in (scale_for(n, self.scales, self.tied, self.kind) for n in names) if c.key}
        wanted = set(names)
        return AimRelaxer({k: self.scales[k] for k in sorted(keys)}, self.kind, self.omega, self.tied,
                          {n: a for n, a in self.axes.items() if n in wanted})

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
                            n_blocks=cal.n_blocks, kind=aim.kind, split=cal.split, micro_batch=cal.micro_batch,
                            dtype=cal.dtype, device=cal.device)


def input_axes(job: MergeJob) -> dict[str, int]:
    """Tensors whose input channels are not the last dimension (GPT-2's Conv1D weights: dimension 0)."""
    axes = {o.name: input_axis(o.name, job.base.config) for o in job.outputs}
    return {name: axis for name, axis in axes.items() if axis != -1}


def aim_for_job(job: MergeJob, scales: Scales | None = None
                ) -> tuple[AimRelaxer | None, dict[str, str], dict[str, Any]]:
    """The AIM relaxation for this merge (None without an `aim:` section), shard metadata and report."""
    aim = job.config.aim
    if aim is None:
        return None, {}, {}
    scales = scales if scales is not None else load_or_calibrate(job, aim)
    relaxer = AimRelaxer(scales, scales.kind, aim.omega, has_tied_embeddings(job.base), input_axes(job))
    notes = relaxer.notes([o.name for o in job.outputs])
    job.notes.extend(notes)
    metadata = {"aim_omega": repr(aim.omega), "aim_kind": scales.kind,
                "aim_scales_base_hash": scales.content_hash, **({"aim_note": "; ".join(notes)} if notes else {})}
    report = {"aim": {"omega": aim.omega, "kind": scales.kind, "scales": scales.metadata(), "notes": notes}}
    return relaxer, metadata, report
