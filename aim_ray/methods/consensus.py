"""Mask-based merges: consensus_ta (TALL masks) and localize_stitch (dataless Localize-and-Stitch).

consensus_ta (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression",
https://arxiv.org/abs/2405.07813): tau_mtl = sum_t w_t tau_t; per task the TALL mask
m_t = |tau_t| >= tall_lambda_t * |tau_mtl - tau_t|; keep the entries at least k masks agree on:
delta = lambda * [sum_t m_t >= k] * tau_mtl. Defaults: k = 2 (the paper's consensus setting), weight = 1,
lambda = 1, tall_lambda = 0.4 (the paper tunes it per task on validation data in [0.2, 0.6]; 0.4 is the
middle of that range; MergeBench uses 0.5). Two passes: tau_mtl, then the agreement count (a uint8 buffer,
int16 beyond 255 experts).

localize_stitch (He et al. 2025, "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic",
https://arxiv.org/abs/2408.13656), dataless variant: per task keep the top `density` fraction of |tau_t|
(mask g_t, k = max(1, int(density * numel)), ties as in `sparsify.rank_mask`), then stitch with overlaps
averaged: delta = sum_t g_t tau_t / max(1, sum_t g_t). Default density 0.1: the sparsity MergeBench runs
the dataless variant with. One pass.

localize_stitch_trained (the same paper, with data): the same stitch with the masks m_t trained on each
expert's data from that top-k start (`aim_ray.localize`, statistics kind "mask"):
delta = sum_t m_t tau_t / max(1, sum_t m_t). Tensors no mask covers (the embeddings) keep the base value, as
in the authors' code. The training hyperparameters are the method's parameters and part of the masks' cache key.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError, StatisticsError
from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, count_mask_, register
from .sparsify import rank_mask


def consensus_ta_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n = inputs.n_experts
    mtl = inputs.task_vector(0).mul_(float(params.expert(0, "weight")))
    for i in range(1, n):
        mtl.add_(inputs.task_vector(i).mul_(float(params.expert(i, "weight"))))  # as written: w * tau, then +
    count = torch.zeros_like(mtl, dtype=torch.uint8 if n <= 255 else torch.int16)
    for i in range(n):
        tau = inputs.task_vector(i)
        distance = (mtl - tau).abs_().mul_(float(params.expert(i, "tall_lambda")))
        count.add_(tau.abs_() >= distance)
        del tau, distance
    mtl.masked_fill_(count < int(params.shared["k"]), 0.0)
    if params.shared["lambda"] != 1:
        mtl.mul_(params.shared["lambda"])
    return mtl


def stitch(inputs: TensorInputs, masked: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_t m_t tau_t / max(1, sum_t m_t) over the (tau_t, bool m_t) pairs (read one expert at a time); zeros
    when there are none."""
    total = count = None
    count_dtype = torch.uint8 if inputs.n_experts <= 255 else torch.int16
    for tau, mask in masked:
        tau.masked_fill_(~mask, 0.0)
        total = tau if total is None else total.add_(tau)
        count = mask.to(count_dtype) if count is None else count_mask_(count, mask)
        del tau, mask
    if total is None:
        return torch.zeros_like(inputs.base())
    return total.div_(count.clamp_(min=1))


def localize_stitch_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    def top_k() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(inputs.n_experts):
            tau = inputs.task_vector(i)
            yield tau, rank_mask(tau.abs(), max(1, int(params.expert(i, "density") * tau.numel())))

    return stitch(inputs, top_k())


def localize_stitch_trained_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    def trained() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(inputs.n_experts):
            mask = inputs.statistic(i)
            if mask is None:  # not localized (embeddings): the task vector is dropped
                continue
            tau = inputs.task_vector(i)
            if mask.shape != tau.shape:
                raise StatisticsError(f"localize_stitch_trained: the mask of {inputs.name!r} (expert {i}) has shape "
                                      f"{tuple(mask.shape)}, the tensor {tuple(tau.shape)}")
            yield tau, mask.to(torch.bool)

    return stitch(inputs, trained())


def _check_k(params: MethodParams) -> None:
    k, n = params.shared["k"], len(params.per_expert)
    if k > n:
        raise ConfigError(f"k={k} but only {n} model(s) are merged: no entry could reach {k} agreeing masks, "
                          f"so the merge would be all zeros; use k <= {n}")


register(MergeMethod(
    name="consensus_ta",
    mergekit=False,
    fn=consensus_ta_merge,
    params=(
        ParamSpec("weight", per_expert=True, default=1.0),
        ParamSpec("tall_lambda", per_expert=True, default=0.4, low=0.0),
        ParamSpec("k", per_expert=False, default=2, low=1, kind=int),
        ParamSpec("lambda", per_expert=False, default=1.0),
    ),
    reference="https://arxiv.org/abs/2405.07813",
    doc="task arithmetic restricted to entries where at least k TALL masks agree",
    extra_checks=(_check_k,),
))

register(MergeMethod(
    name="localize_stitch",
    mergekit=False,
    fn=localize_stitch_merge,
    params=(ParamSpec("density", per_expert=True, default=0.1, low=0.0, high=1.0, low_open=True),),
    reference="https://arxiv.org/abs/2408.13656",
    doc="dataless Localize-and-Stitch: top-density |tau| per task, overlaps averaged",
))

register(MergeMethod(
    name="localize_stitch_trained",
    mergekit=False,
    fn=localize_stitch_trained_merge,
    # MergeBench's LLM settings (`aim_ray.localize` says why, and where they differ from the authors' code).
    params=(
        ParamSpec("density", per_expert=True, default=0.1, low=0.0, high=1.0, low_open=True),
        ParamSpec("sigmoid_bias", per_expert=False, default=3.0, low=0.0, low_open=True),
        ParamSpec("lr", per_expert=False, default=1e8, low=0.0),
        ParamSpec("l1_strength", per_expert=False, default=0.0, low=0.0),
        ParamSpec("epochs", per_expert=False, default=1, low=0, kind=int),
    ),
    statistics="mask",
    reference="https://arxiv.org/abs/2408.13656",
    doc="Localize-and-Stitch with masks trained on each model's data (sigmoid-relaxed, from the top-density "
        "|tau|, L1 penalty), overlaps averaged",
))
