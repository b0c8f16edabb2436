"""linear (model soup, MergeKit semantics): merged = sum_i w_i theta_i / sum_i w_i (normalize=True) or
sum_i w_i theta_i (normalize=False), over the listed models; no base is involved in the average.

The contract returns a delta, so this returns `merged - base` with whatever base the engine supplies
(`inputs.base()`: the configured base_model, or the first model when there is none). `base + delta` then
equals `merged` up to one float32 rounding (<= 1 ulp of merged), and AIM can relax a soup like any method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register


def linear_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    weights = [float(params.expert(i, "weight")) for i in range(inputs.n_experts)]
    merged = inputs.expert(0).mul_(weights[0])
    for i in range(1, inputs.n_experts):
        merged.add_(inputs.expert(i), alpha=weights[i])
    if params.shared["normalize"]:
        merged.div_(torch.tensor(weights, dtype=torch.float32).sum())
    return merged.sub_(inputs.base())


def nonzero_weight_sum(flag: str) -> Callable[[MethodParams], None]:
    """A parameter check: with `flag` (a normalising option) true, the weights must not sum to 0."""

    def check(params: MethodParams) -> None:
        total = sum(float(e["weight"]) for e in params.per_expert)
        if params.shared[flag] and abs(total) < 1e-8:
            raise ConfigError(f"the weights sum to 0, so {flag}: true would divide by zero; change the weights "
                              f"or set {flag}: false")

    return check


register(MergeMethod(
    name="linear",
    fn=linear_merge,
    params=(
        ParamSpec("weight", per_expert=True, required=True),
        ParamSpec("normalize", per_expert=False, default=True, kind=bool),
    ),
    needs_base=False,
    reference="https://arxiv.org/abs/2203.05482",
    doc="weighted average of the models (model soup)",
    extra_checks=(nonzero_weight_sum("normalize"),),
))
