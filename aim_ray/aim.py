"""AIM relaxation (paper eq. 4): `theta_AIM = theta_pre + (1 - A * (1 - omega)) * delta_merged`.

`A = s / max(s)` per tensor, where `s` are the raw scales of the artifact (`aim_ray.scales`):

- activation scales: one value per **input** channel; applied along the last dimension of a weight, so column
  `j` of an `nn.Linear` weight `[out, in]` is scaled by `1 - A[j] * (1 - omega)`; norm weights elementwise;
  a weight stored as GPT-2's `Conv1D` `[in, out]` has its input channels along dimension 0 (`axis=0`, from
  `architectures.input_axis`): row `j` is scaled (never the last axis, even when the weight is square);
- sensitivity scales (eq. 5): same shape as the parameter, applied elementwise.

Not relaxed (the merged value is kept): embeddings and biases. A tied embedding (`tie_word_embeddings` and no
`lm_head.weight` in the checkpoint) is the head too: it is relaxed with `lm_head`'s scales, explicitly, and
`scale_for` returns a note for the writer to record in the output metadata.

Everything is float32 and `relax` never mutates its inputs (Tune reuses one cached delta for many omegas).

Differences from the reference implementation (deliberate):

- it accumulates the activation scales in bfloat16; we accumulate in float32;
- it rounds `delta` to bfloat16 before scaling, so omega=1 is not the identity; here omega=1 returns
  `theta_pre + delta` bit for bit (`1 - A * 0.0` is exactly 1.0 and nothing else is rounded);
- it relaxes a tied embedding by accident (through `lm_head`); here that is an explicit, recorded choice;
- it silently resizes vocabularies; we refuse mismatched shapes (ScalesError / CheckpointError);
- it does not save the tokenizer; the writer copies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .architectures import is_input_embedding, tied_head
from .errors import ConfigError, ScalesError
from .scales import KINDS, is_embedding

TIED_NOTE = "tied embedding {name} relaxed with lm_head's input scales ({key})"


class ScaleChoice(NamedTuple):
    """Which scales relax a tensor: `scale` None means not relaxed; `note` is set for the tied embedding."""

    scale: torch.Tensor | None
    key: str | None = None
    note: str | None = None


def validate_omega(omega: float) -> float:
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega):
        raise ConfigError(f"aim.omega must be a number in [0, 1], got {omega!r}")
    if not 0.0 <= omega <= 1.0:
        raise ConfigError(f"aim.omega must be in [0, 1] (1 = no relaxation, 0 = full revert), got {omega}")
    return float(omega)


def normalize(scale: torch.Tensor) -> torch.Tensor:
    """`A = s / max(s)` in float32; a dead module (max 0) gets A = 0, i.e. is not relaxed."""
    s = scale.to(torch.float32)
    peak = s.max()
    if not bool(peak > 0):
        return torch.zeros_like(s)
    return s / peak


def relaxation_factor(scale: torch.Tensor, omega: float) -> torch.Tensor:
    """`1 - A * (1 - omega)`; exactly 1.0 everywhere for omega = 1."""
    return 1.0 - normalize(scale) * (1.0 - validate_omega(omega))


def relax(name: str, theta_pre: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor | None,
          omega: float, axis: int = -1) -> torch.Tensor:
    """The AIM-relaxed weight in float32. `scale` None (embeddings, biases): `theta_pre + delta`."""
    if theta_pre.shape != delta.shape:
        raise ScalesError(f"{name}: base shape {tuple(theta_pre.shape)} != delta shape {tuple(delta.shape)}")
    base = theta_pre.to(torch.float32)
    d = delta.to(torch.float32)
    factor = factor_for(name, tuple(d.shape), scale, omega, axis)
    return base + d if factor is None else base + factor * d


def factor_for(name: str, shape: tuple[int, ...], scale: torch.Tensor | None, omega: float, axis: int = -1
               ) -> torch.Tensor | None:
    """The multiplier of delta in `relax` (per column or per element), None for 1 (no scales). With `axis=0`
    (input channels first: Conv1D) per-channel scales are expanded to the tensor's shape, one value per row."""
    omega = validate_omega(omega)
    if scale is None:
        return None
    elementwise = _check_scale_shape(name, scale, shape, axis)
    factor = relaxation_factor(scale, omega)
    if axis == 0 and not elementwise and len(shape) > 1:
        factor = factor.view(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous()
    return factor


def _check_scale_shape(name: str, scale: torch.Tensor, shape: tuple[int, ...], axis: int = -1) -> bool:
    """Whether the scales are elementwise (else one per input channel along `axis`); refuses other shapes."""
    elementwise = tuple(scale.shape) == shape
    per_channel = scale.dim() == 1 and len(shape) >= 1 and scale.shape[0] == shape[axis]
    if not (elementwise or per_channel):
        where = "last dimension" if axis == -1 else f"input dimension {axis} (Conv1D layout [in, out])"
        raise ScalesError(f"{name}: scales of shape {tuple(scale.shape)} fit neither the tensor's shape "
                          f"{shape} nor its {where}")
    return elementwise


def scale_for(name: str, scales: Mapping[str, torch.Tensor], tie_word_embeddings: bool = False,
              kind: str | None = None) -> ScaleChoice:
    """The raw scales that relax checkpoint tensor `name` (`kind` defaults to `scales.kind`, else activation).

    `X.weight` -> scales[`X`] (activation) or scales[`X.weight`] (sensitivity); embeddings and biases -> None;
    with tied embeddings, `model.embed_tokens.weight` -> `lm_head`'s scales, with a note.
    """
    kind = kind or getattr(scales, "kind", "activation")
    if kind not in KINDS:
        raise ScalesError(f"scales kind must be one of {KINDS}, got {kind!r}")
    if not name.endswith(".weight"):
        return ScaleChoice(None)  # biases (and any buffer) keep the merged value
    if is_embedding(name):
        if not (tie_word_embeddings and is_input_embedding(name)):  # position embeddings are never the head
            return ScaleChoice(None)
        key = tied_head(name) + ("" if kind == "activation" else ".weight")
        return ScaleChoice(_lookup(scales, key, name, kind), key, TIED_NOTE.format(name=name, key=key))
    key = name.removesuffix(".weight") if kind == "activation" else name
    return ScaleChoice(_lookup(scales, key, name, kind), key)


def _lookup(scales: Mapping[str, torch.Tensor], key: str, name: str, kind: str) -> torch.Tensor:
    if key not in scales:
        unit = "module" if kind == "activation" else "parameter"
        raise ScalesError(f"{kind} scales have no entry for {unit} {key!r} (needed by tensor {name!r})")
    return scales[key]
