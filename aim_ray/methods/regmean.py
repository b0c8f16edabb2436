"""regmean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"), as MergeBench runs it.

For each Linear weight (HF layout `W [out, in]`, the layer computes `x W^T`), the merge minimises
`sum_i ||X_i W^T - X_i W_i^T||^2` over the experts' own layer inputs `X_i`, with the off-diagonal part of the
Gram matrices shrunk by `alpha`:

    G_i = w_i (alpha X_i^T X_i + (1 - alpha) diag(X_i^T X_i))
    W*  = (sum_i W_i G_i) (sum_i G_i)^-1

`X_i^T X_i` is the mean over expert i's data tokens (`aim_ray.statistics`, kind "gram"); the per-model `weight`
w_i (default 1) scales expert i's Gram matrix. The solve runs in float64; a singular `sum_i G_i` (an input
channel no expert's data ever activates, with alpha = 1) is refused naming the tensor. Every other tensor
(embeddings, norms, biases) is the weighted mean `sum_i w_i theta_i / sum_i w_i`, as in RegMean.
The result is returned as a delta from the base, so AIM relaxes it like any other method.

Memory: streams over the experts with two float64 accumulators, `[out, in]` and `[in, in]`.
"""

from __future__ import annotations

import torch

from ..errors import StatisticsError
from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register

# The RegMean paper's recommendation for its transformer experiments (alpha in its notation); MergeBench sweeps it.
DEFAULT_ALPHA = 0.9


def regmean_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n = inputs.n_experts
    grams = [inputs.statistic(i) for i in range(n)]
    base = inputs.base()
    if base.dim() != 2 or any(g is None for g in grams):
        return weighted_mean(inputs, params).sub_(base)
    alpha = params.shared["alpha"]
    numerator = denominator = None
    for i in range(n):
        g = grams[i].to(torch.float64)
        g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        g.mul_(params.expert(i, "weight"))
        term = inputs.expert(i).to(torch.float64) @ g
        numerator = term if numerator is None else numerator.add_(term)
        denominator = g if denominator is None else denominator.add_(g)
        del term
    # W* G = N  <=>  G^T W*^T = N^T  (G is symmetric)
    solution, info = torch.linalg.solve_ex(denominator, numerator.T)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        raise StatisticsError(f"regmean: the summed Gram matrix of {inputs.name!r} is singular (an input channel "
                              f"no expert's data activates?); use alpha < 1 or more data")
    return solution.T.sub_(base.to(torch.float64)).to(torch.float32)


def weighted_mean(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    """sum_i w_i theta_i / sum_i w_i in float32 (a fresh tensor)."""
    total = None
    weights = 0.0
    for i in range(inputs.n_experts):
        w = params.expert(i, "weight")
        t = inputs.expert(i).mul_(w)
        total = t if total is None else total.add_(t)
        weights += w
    return total.div_(weights)


def _positive_total_weight(params: MethodParams) -> None:
    if sum(p["weight"] for p in params.per_expert) <= 0:
        from ..errors import ConfigError

        raise ConfigError("the weights must sum to a positive number")


REGMEAN = register(MergeMethod(
    name="regmean",
    fn=regmean_merge,
    params=(
        ParamSpec("weight", per_expert=True, default=1.0, low=0.0),
        ParamSpec("alpha", per_expert=False, default=DEFAULT_ALPHA, low=0.0, high=1.0),
    ),
    statistics="gram",
    mergekit=False,
    extra_checks=(_positive_total_weight,),
    reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (ICLR)",
    doc="W* = (sum_i W_i G_i)(sum_i G_i)^-1 per Linear, G_i the experts' input Gram matrices with the "
        "off-diagonal scaled by alpha; other tensors averaged",
))
