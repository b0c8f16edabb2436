"""passthrough (MergeKit semantics): one model's tensor as it is, times `scale` when given. With `slices:` it
stacks layer ranges of models into a deeper (or shallower) model, a "frankenmerge". It returns the merged tensor,
not a delta (`direct`): there is no base to relax toward, so AIM refuses it."""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register


def passthrough_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    tensor = inputs.expert(0)
    scale = params.expert(0, "scale")
    return tensor if scale is None else tensor * scale


register(MergeMethod(
    name="passthrough",
    fn=passthrough_merge,
    params=(ParamSpec("scale", per_expert=True, default=None),),
    needs_base=False,
    max_experts=1,
    reference="https://github.com/arcee-ai/mergekit",
    doc="copy one model's tensors (optionally scaled); with slices, stack layer ranges",
    direct=True,
))
