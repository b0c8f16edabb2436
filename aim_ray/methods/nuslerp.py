"""nuslerp (MergeKit semantics): spherical interpolation between exactly two experts, the weights setting t.

    t = w_1 / (w_0 + w_1)   (0.5 where |w_0 + w_1| < 1e-6; negative weights may put t outside [0, 1])
    with a base_model: v_i = tau_i (task vectors) and delta = nuslerp(v_0, v_1, t);
    without one:       v_i = theta_i (the weights)  and delta = nuslerp(v_0, v_1, t) - theta_0.

nuslerp(v_0, v_1, t) over vectors: nuslerp_flatten (default true) takes the whole tensor as one vector;
otherwise each row (the last dimension), or with nuslerp_row_wise each column (vectors along dimension 0) is
interpolated apart. Per vector, cos = clamp(v_0 . v_1 / (max(|v_0|, 1e-7) max(|v_1|, 1e-7)), -1, 1) (a
norm below 1e-7 counts as 1e-7: a zero vector gives cos = 0); where 1 - cos^2 <= 1e-16 (collinear) the
result is (1 - t) v_0 + t v_1, else (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta) with
theta = acos(cos). MergeKit's cos is float32, so its test holds wherever |cos| rounds to 1 (1 - |cos| < 3e-8);
ours is float64, and in that band the two branches differ by ~theta^2 / 6 < 1e-8 relative.

Unlike slerp, nothing bounds t and there is no 0.9995 threshold: nearly collinear vectors take the spherical
branch. Two experts, so nothing to stream: the two vectors, plus the base when there is one. The norms and dot
products are float64 sums over chunks (MergeKit: float32), the coefficients float64, the result float32.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register

NORM_FLOOR = 1e-7  # MergeKit's clamp on each vector's norm
COLLINEAR = 1e-16  # 1 - cos^2 at most this (MergeKit's eps**2, eps = 1e-8): linear interpolation
ZERO_TOTAL = 1e-6  # |w_0 + w_1| below this: t = 0.5
_CHUNK = 1 << 20


def nuslerp_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    w0, w1 = (float(params.expert(i, "weight")) for i in range(2))
    total = w0 + w1
    t = 0.5 if abs(total) < ZERO_TOTAL else w1 / total
    read = inputs.task_vector if params.has_base else inputs.expert
    v0, v1 = read(0), read(1)
    dim = None if params.shared["nuslerp_flatten"] else 0 if params.shared["nuslerp_row_wise"] else -1
    coef0, coef1 = nuslerp_coefficients(v0, v1, t, dim)
    out = v0.mul_(coef0).add_(v1.mul_(coef1))
    del v1
    return out if params.has_base else out.sub_(inputs.base())


def nuslerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float, dim: int | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1), float32, broadcastable to v0, with nuslerp(v0, v1, t) = c0 * v0 + c1 * v1 per vector
    (dim None: the whole tensor is one vector; else the vectors lie along `dim`)."""
    n0, n1, dot = _norms_and_dot(v0, v1, dim)
    cos = (dot / (n0.clamp(min=NORM_FLOOR) * n1.clamp(min=NORM_FLOOR))).clamp(-1.0, 1.0)
    collinear = 1 - cos.square() <= COLLINEAR
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    sin = torch.where(collinear, 1.0, torch.sin(theta))
    c0 = torch.where(collinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(collinear, t, torch.sin(t * theta) / sin)
    return c0.to(torch.float32), c1.to(torch.float32)


def _norms_and_dot(v0: torch.Tensor, v1: torch.Tensor, dim: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|v0|, |v1| and v0 . v1 per vector, float64 (keepdim; 0-d for one vector), summed in chunks of about
    1M elements along a dimension that is not reduced, so the float64 copies stay small."""
    if dim is None or v0.dim() == 1:
        a, b = v0.reshape(-1), v1.reshape(-1)
        sums = torch.zeros(3, dtype=torch.float64)
        for start in range(0, a.numel(), _CHUNK):
            x, y = a[start:start + _CHUNK].double(), b[start:start + _CHUNK].double()
            sums += torch.stack([x @ x, y @ y, x @ y])
    else:
        split = 0 if dim == -1 else -1
        step = max(1, _CHUNK * v0.shape[split] // v0.numel())
        parts = []
        for x, y in zip(v0.split(step, split), v1.split(step, split), strict=True):
            x, y = x.double(), y.double()
            parts.append(torch.stack([(x * x).sum(dim, keepdim=True), (y * y).sum(dim, keepdim=True),
                                      (x * y).sum(dim, keepdim=True)]))
        sums = torch.cat(parts, dim=1 if split == 0 else -1)
    return sums[0].sqrt(), sums[1].sqrt(), sums[2]


register(MergeMethod(
    name="nuslerp",
    fn=nuslerp_merge,
    params=(
        ParamSpec("weight", per_expert=True, required=True),
        ParamSpec("nuslerp_row_wise", per_expert=False, default=False, kind=bool),
        ParamSpec("nuslerp_flatten", per_expert=False, default=True, kind=bool),
    ),
    needs_base=False,
    base_role="reference",
    min_experts=2,
    max_experts=2,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    doc="spherical interpolation of two experts (of their task vectors with a base), t from their weights",
))
