"""nearswap (MergeKit semantics): take the expert's value where it is near the base's, keep the base's where
they are far apart. Per element, with a = base and b = the single expert:

    w = clamp(t / max(|a - b|, 1e-6), 0, 1);  merged = w * b + (1 - w) * a,  i.e.  delta = w * (b - a)

So |b - a| <= t swaps in the expert's value (w = 1), and beyond that the step toward it shrinks as t / |b - a|
(a step of exactly t). The 1e-6 floor only keeps the division finite where a == b (delta 0 there anyway).
t is required (no default); t = 0 keeps the base. Base required, exactly one expert. One read of each.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register

DIFF_FLOOR = 1e-6  # MergeKit's clamp on |a - b|


def nearswap_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    t = float(params.shared["t"])
    delta = inputs.task_vector(0)
    # t * (1 / x): how torch evaluates MergeKit's `t / x` (Tensor.__rtruediv__), so w is bit for bit its w
    weight = delta.abs().clamp_(min=DIFF_FLOOR).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return delta.mul_(weight)


register(MergeMethod(
    name="nearswap",
    fn=nearswap_merge,
    params=(ParamSpec("t", per_expert=False, required=True, low=0.0),),
    min_experts=1,
    max_experts=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    doc="per element, the expert's value where it is within t of the base's, else a step of t toward it",
))
