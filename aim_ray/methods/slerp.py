"""slerp (MergeKit semantics): spherical interpolation between the base (t=0) and the single expert (t=1),
over the whole flattened tensor. Norms at most eps (1e-8) count as 1; when |cos| > 0.9995 (DOT_THRESHOLD:
nearly collinear or antipodal) it falls back to linear interpolation. Returns slerp(base, expert) - base.

Norms and the dot product are accumulated in float64 over 1M-element chunks (MergeKit: float32 chunks), so
scratch memory is bounded and the coefficients are at least as accurate as MergeKit's.
"""

from __future__ import annotations

import math

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8
_CHUNK = 1 << 20


def slerp_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    t = float(params.shared["t"])
    base = inputs.base()
    expert = inputs.expert(0)
    coef_a, coef_b = slerp_coefficients(base.reshape(-1), expert.reshape(-1), t)
    return expert.mul_(coef_b).add_(base, alpha=coef_a).sub_(base)


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """(coef_a, coef_b) with slerp(a, b, t) = coef_a * a + coef_b * b, for flat tensors a and b."""
    norm_a2 = norm_b2 = dot = 0.0
    for start in range(0, a.numel(), _CHUNK):
        x, y = a[start:start + _CHUNK].double(), b[start:start + _CHUNK].double()
        norm_a2 += float(x @ x)
        norm_b2 += float(y @ y)
        dot += float(x @ y)
    norm_a, norm_b = math.sqrt(norm_a2), math.sqrt(norm_b2)
    norm_a, norm_b = (norm_a if norm_a > EPS else 1.0), (norm_b if norm_b > EPS else 1.0)
    cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


register(MergeMethod(
    name="slerp",
    fn=slerp_merge,
    params=(ParamSpec("t", per_expert=False, required=True, low=0.0, high=1.0),),
    min_experts=1,
    max_experts=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
    doc="spherical interpolation between the base (t=0) and one expert (t=1)",
))
