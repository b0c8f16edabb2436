"""model_stock (Jang et al. 2024, MergeKit semantics).

Per tensor (filter_wise=false) or per row of the last dimension (filter_wise=true; a 1-D tensor is one
row): c = mean over expert pairs of cos(tau_i, tau_j), where MergeKit's cosine is
clamp(tau_i . tau_j / max(|tau_i| |tau_j|, 1e-6), -1, 1); t = N c / (1 + (N - 1) c) (t = 0 where the
denominator is below 1e-6); merged = t * mean(theta_i) + (1 - t) * base, i.e. delta = t * mean_i(tau_i).

Memory: no Gram matrix over full tensors. With u_i = tau_i / |tau_i| (0 for a zero tau_i),
sum_{i<j} cos_ij = (|sum_i u_i|^2 - #{i: tau_i != 0}) / 2, so one streaming pass accumulating sum_i u_i and
sum_i tau_i gives the answer. The only pairs where this differs from MergeKit's formula are pairs with
0 < |tau_i| |tau_j| < 1e-6 (MergeKit divides by 1e-6 there); those rare pairs are corrected exactly by
re-reading just the experts involved, two at a time.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register

_NORM_FLOOR = 1e-6  # MergeKit clamps |a||b| to this
_SINGULAR = 1e-6  # MergeKit keeps the base where |1 + (N - 1) c| is below this


def _rows(t: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if filter_wise and t.dim() >= 2:
        return t.reshape(-1, t.shape[-1])
    return t.reshape(1, -1)


def model_stock_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    filter_wise = bool(params.shared["filter_wise"])
    n = inputs.n_experts
    total = unit_sum = None
    norms = []
    for i in range(n):
        tau = inputs.task_vector(i)
        shape, tau = tau.shape, _rows(tau, filter_wise)
        norm = torch.linalg.vector_norm(tau, dim=-1)
        norms.append(norm.double())
        unit = tau / torch.where(norm > 0, norm, 1.0).unsqueeze(-1)
        total = tau if total is None else total.add_(tau)
        unit_sum = unit if unit_sum is None else unit_sum.add_(unit)
        del tau, unit
    # sum_{i<j} u_i.u_j = (|sum_i u_i|^2 - sum_i |u_i|^2) / 2, with |u_i|^2 = 1 for nonzero tau_i
    squared = torch.linalg.vector_norm(unit_sum, dim=-1, dtype=torch.float64) ** 2
    del unit_sum
    nonzero = sum((norm > 0).double() for norm in norms)
    pair_sum = (squared - nonzero) / 2 + _tiny_pair_correction(inputs, norms, filter_wise)
    cos = pair_sum / (n * (n - 1) / 2)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return total.mul_(t.to(torch.float32).div_(n).unsqueeze(-1)).reshape(shape)


def _tiny_pair_correction(inputs: TensorInputs, norms: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Per row, MergeKit's cosine minus the unit-vector one, summed over pairs with 0 < |a||b| < 1e-6."""
    n = len(norms)
    correction = torch.zeros_like(norms[0])
    tiny = {}
    for i in range(n):
        for j in range(i + 1, n):
            product = norms[i] * norms[j]
            mask = (product > 0) & (product < _NORM_FLOOR)
            if bool(mask.any()):
                tiny[i, j] = (product, mask)
    for i in sorted({i for i, _ in tiny}):
        a = _rows(inputs.task_vector(i), filter_wise)
        for (p, j), (product, mask) in tiny.items():
            if p != i:
                continue
            dot = (a * _rows(inputs.task_vector(j), filter_wise)).sum(-1).double()
            exact = (dot / product.clamp(min=_NORM_FLOOR)).clamp(-1, 1)
            unit = (dot / torch.where(mask, product, 1.0)).clamp(-1, 1)
            correction += torch.where(mask, exact - unit, 0.0)
    return correction


register(MergeMethod(
    name="model_stock",
    fn=model_stock_merge,
    params=(ParamSpec("filter_wise", per_expert=False, default=False, kind=bool),),
    min_experts=2,  # MergeKit: at least 3 inputs including the base
    reference="https://arxiv.org/abs/2403.19522",
    doc="interpolates between the experts' average and the base by the experts' mean pairwise cosine",
))
