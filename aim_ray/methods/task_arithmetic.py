"""The generalized task-arithmetic family (MergeKit's GeneralizedTaskArithmeticMerge): task_arithmetic, ties,
dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear.

    d_i = sparsify(tau_i); D_i = w_i * d_i
    sign consensus ('sum'): s = +1 where sum_i D_i (in expert order) >= 0 else -1; M_i = sign(D_i) == s
        (pruned zeros never match); mixed = sum_i M_i D_i; div = sum_i M_i w_i (0 -> 1)
    otherwise: mixed = sum_i D_i; div = sum_i w_i (|div| < 1e-8 -> 1)
    normalize: mixed /= div; then mixed *= lambda

Memory does not grow with N: experts are streamed one at a time, each read and sparsified once (sign
consensus keeps the positive and negative sums apart, see `_consensus_sum`). Random masks come from
`inputs.mask_key(i)`, derived from (seed, expert, tensor), so they do not depend on the order of work.

This torch code is the reference; `fused.fused_gta` computes the same result in a few fused passes over the
stored tensors and is taken whenever it applies (every method here but DELLA).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..errors import ConfigError
from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register
from .fused import fused_gta
from .sparsify import RESCALE_NORMS, sparsify


def gta_merge(inputs: TensorInputs, params: MethodParams, *, sparsification: str | None,
              consensus: bool) -> torch.Tensor:
    fast = fused_gta(inputs, params, sparsification, consensus)
    if fast is not None:
        return fast
    weights = [float(params.expert(i, "weight")) for i in range(inputs.n_experts)]
    contribution = partial(_contribution, inputs, params, sparsification)
    if consensus:
        mixed, div = _consensus_sum(contribution, weights, params.shared["normalize"])
    else:
        mixed = contribution(0)
        for i in range(1, inputs.n_experts):
            mixed.add_(contribution(i))
        # MergeKit sums the weights in the tensor's dtype (float32).
        div = torch.tensor(weights, dtype=torch.float32).sum()
        if div.abs() < 1e-8:
            div = torch.ones(())
    if params.shared["normalize"]:
        mixed.div_(div)
    if params.shared["lambda"] != 1:
        mixed.mul_(params.shared["lambda"])
    return mixed


def _contribution(inputs: TensorInputs, params: MethodParams, sparsification: str | None, i: int
                  ) -> torch.Tensor:
    """D_i = w_i * sparsify(tau_i): a fresh float32 tensor."""
    tau = inputs.task_vector(i)
    if sparsification is not None:
        expert = params.per_expert[i]
        random = sparsification in ("random", "della_magprune")
        tau = sparsify(tau, sparsification, density=expert["density"], gamma=expert.get("gamma", 0.0),
                       epsilon=expert.get("epsilon", 0.0), norm=_rescale_norm(params),
                       key=inputs.mask_key(i) if random else None)
    return tau.mul_(float(params.expert(i, "weight")))


def _rescale_norm(params: MethodParams) -> str | None:
    return params.shared["rescale_norm"] if params.shared["rescale"] else None


def _consensus_sum(contribution: Callable[[int], torch.Tensor], weights: list[float], normalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign consensus in one pass over the experts. Returns (mixed, div).

    The positive and the negative contributions (and their weights) are summed apart: P = sum of D_i > 0,
    N = sum of D_i < 0. The majority sign is s = +1 where T = sum_i D_i >= 0, and sum_i [sign(D_i) == s] D_i
    is then exactly P (s = +1) or N (s = -1): the entries left out are those of the other sign and the
    pruned zeros. T is summed in expert order, as MergeKit's `deltas.sum(dim=0)` sums up to 4 experts: P + N
    rounds differently, and where T is ~0 (bf16 deltas cancel exactly) that flips the sign. (From 5 experts
    on, torch's CPU sum regroups the terms for the columns past the last full SIMD block, by the CPU's vector
    width; there the sign can still differ from MergeKit's where T rounds to ~0.) Each expert is read and
    sparsified once instead of twice, for three more buffers.
    """
    pos = neg = total = wpos = wneg = sign = None
    for i, w in enumerate(weights):
        d = contribution(i)
        if pos is None:
            pos, neg, total = torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d)
            if normalize:
                wpos, wneg = torch.zeros_like(d), torch.zeros_like(d)
                # one sign mask for every expert: a fresh one per expert fragmented the heap (DELLA, 16
                # experts: peak +16% over 2)
                sign = torch.empty(d.shape, dtype=torch.bool)
        if normalize:
            wpos.add_(torch.gt(d, 0, out=sign), alpha=w)
            wneg.add_(torch.lt(d, 0, out=sign), alpha=w)
        total.add_(d)
        pos.add_(d.clamp(min=0))
        neg.add_(d.clamp_(max=0))
        del d
    majority_positive = total >= 0
    del total
    mixed = torch.where(majority_positive, pos, neg)
    if not normalize:
        return mixed, torch.ones(())
    div = torch.where(majority_positive, wpos, wneg)
    return mixed, div.masked_fill_(div == 0, 1.0)


# ----------------------------------------------------------------------------------------- registration


def _check_della(params: MethodParams) -> None:
    for i, expert in enumerate(params.per_expert):
        density, epsilon = expert["density"], expert["epsilon"]
        if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise ConfigError(f"models[{i}]: epsilon={epsilon} with density={density}: epsilon must keep "
                              f"density - epsilon > 0 and density + epsilon < 1")


def _gta_params(normalize: bool, rescale: bool, sparsification: str | None) -> tuple[ParamSpec, ...]:
    specs = [
        ParamSpec("weight", per_expert=True, required=True),
        ParamSpec("density", per_expert=True, default=1.0, low=0.0, high=1.0, low_open=True),
        ParamSpec("lambda", per_expert=False, default=1.0),
        ParamSpec("normalize", per_expert=False, default=normalize, kind=bool),
        ParamSpec("rescale", per_expert=False, default=rescale, kind=bool),
        ParamSpec("rescale_norm", per_expert=False, default="l1", kind=str, choices=RESCALE_NORMS),
        # MergeKit's memory option for its stacked sign mask; ours is a bool tensor already: no effect.
        ParamSpec("int8_mask", per_expert=False, default=False, kind=bool),
    ]
    if sparsification == "magnitude_outliers":
        specs.append(ParamSpec("gamma", per_expert=True, default=0.01, low=0.0, high=1.0, high_open=True))
    if sparsification == "della_magprune":
        specs.append(ParamSpec("epsilon", per_expert=True, default=0.15, low=0.0))
    return tuple(specs)


# name: (sparsification, sign consensus, default normalize, default rescale, reference) -- MergeKit's registry
_FAMILY = {
    "task_arithmetic": (None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": ("magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
    "della": ("della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
}

for _name, (_sparse, _consensus, _normalize, _rescale, _ref) in _FAMILY.items():
    register(MergeMethod(
        name=_name,
        fn=partial(gta_merge, sparsification=_sparse, consensus=_consensus),
        params=_gta_params(_normalize, _rescale, _sparse),
        reference=_ref,
        doc=f"generalized task arithmetic: sparsification={_sparse}, sign consensus={_consensus}",
        extra_checks=(_check_della,) if _sparse == "della_magprune" else (),
    ))
