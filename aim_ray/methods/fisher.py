"""fisher (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging"), as MergeBench runs it.

Elementwise over every tensor:

    F_i     = max(Fhat_i / ||Fhat_i||, epsilon)      (normalize: true; else max(Fhat_i, epsilon))
    theta*  = sum_i w_i F_i theta_i / sum_i w_i F_i

`Fhat_i` is expert i's diagonal Fisher on its own data (`aim_ray.statistics`, kind "fisher": the mean over
blocks of the squared gradient of the mean next-token log-likelihood) and `||Fhat_i||` its L2 norm over the
whole model, so that experts whose data give larger gradients do not dominate (MergeLM / MergeBench's
`normalize_fisher_weight`). `epsilon` floors the Fisher so an entry no expert's data touches (an unused
embedding row) becomes the weighted mean. The merge weights `w_i` multiply the F_i. Returned as a delta.

Memory: streams over the experts with two float32 accumulators.
"""

from __future__ import annotations

import torch

from ..errors import StatisticsError
from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register
from .regmean import _positive_total_weight


def fisher_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    eps = params.shared["epsilon"]
    normalize = params.shared["normalize"]
    numerator = denominator = None
    for i in range(inputs.n_experts):
        f = inputs.statistic(i)
        if f is None:
            raise StatisticsError(f"fisher: no Fisher for tensor {inputs.name!r} of expert {i}")
        f = f.to(torch.float32, copy=True)
        if normalize:
            f.div_(inputs.statistic_norm(i))
        f.clamp_(min=eps).mul_(params.expert(i, "weight"))
        term = inputs.expert(i).mul_(f)
        numerator = term if numerator is None else numerator.add_(term)
        denominator = f if denominator is None else denominator.add_(f)
    return numerator.div_(denominator).sub_(inputs.base())


FISHER = register(MergeMethod(
    name="fisher",
    fn=fisher_merge,
    params=(
        ParamSpec("weight", per_expert=True, default=1.0, low=0.0),
        ParamSpec("epsilon", per_expert=False, default=1e-6, low=0.0, low_open=True),
        ParamSpec("normalize", per_expert=False, default=True, kind=bool),
    ),
    statistics="fisher",
    mergekit=False,
    extra_checks=(_positive_total_weight,),
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS)",
    doc="theta* = sum_i w_i F_i theta_i / sum_i w_i F_i elementwise, F_i the experts' diagonal Fisher "
        "(normalised by its model-wide L2 norm, floored at epsilon)",
))
