"""RAM and RAM+ (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572), MergeKit semantics.

An expert contributes to an element where its task vector is there: nz_i = |tau_i| > epsilon (strictly;
default 1e-5). With c = sum_i nz_i, the number of contributing experts per element:

    ram:        delta = sum_i nz_i tau_i / max(c, 1)
                (an element one expert changes keeps that change; shared ones are averaged over the experts
                that change them; untouched ones stay the base's)
    ramplus_tl: an expert's unique elements (c == 1) are scaled by lambda_i instead, per tensor:
                rho_i = #{nz_i and c > 1} / max(#{nz_i and c == 1}, epsilon)
                lambda_i = 1 + r * clamp(rho_i, 0, alpha)            (r = 0.1, alpha = 0.2)
                delta = sum_i nz_i tau_i (lambda_i if c == 1 else 1 / c)

An expert without unique elements gets rho_i = shared / epsilon (clamped to alpha) and, having no unique
element, no scaling at all. Base required, at least one expert.

Memory: ram streams in one pass (a float32 sum and a uint8 count, int16 past 255 experts, plus |tau| and mask
buffers that every expert reuses: `_Scratch`); it divides the sum
by c once, where MergeKit divides each term: a rounding apart (<= 1e-7 relative). ramplus_tl needs c before
it can weigh any expert, so it streams twice: the count, then the weighted sum, bit for bit MergeKit's.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, count_mask_, register


class _Scratch:
    """Full-size buffers reused by every expert of a tensor: fresh temporaries per expert fragment the heap,
    so its peak grew with the number of experts (ram, 16 experts: +80% over 2) though no more is live."""

    def __init__(self, like: torch.Tensor) -> None:
        self.magnitude = torch.empty_like(like)
        self.keep = torch.empty(like.shape, dtype=torch.bool)
        self.drop = torch.empty(like.shape, dtype=torch.bool)

    def kept(self, tau: torch.Tensor, epsilon: float) -> torch.Tensor:
        """|tau| > epsilon (a scratch buffer: valid until the next call)."""
        return torch.gt(torch.abs(tau, out=self.magnitude), epsilon, out=self.keep)

    def nonzero(self, tau: torch.Tensor, epsilon: float) -> torch.Tensor:
        """tau zeroed (in place) where |tau| <= epsilon; returns the mask of the kept entries (`kept`)."""
        tau.masked_fill_(torch.logical_not(self.kept(tau, epsilon), out=self.drop), 0.0)
        return self.keep


def _count_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 255 else torch.int16


def ram_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    epsilon = float(params.shared["epsilon"])
    total = count = scratch = None
    for i in range(inputs.n_experts):
        tau = inputs.task_vector(i)
        scratch = scratch or _Scratch(tau)
        keep = scratch.nonzero(tau, epsilon)
        total = tau if total is None else total.add_(tau)
        count = keep.to(_count_dtype(inputs.n_experts)) if count is None else count_mask_(count, keep)
        del tau
    return total.div_(count.clamp_(min=1))


def ramplus_tl_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    epsilon, r, alpha = (float(params.shared[k]) for k in ("epsilon", "r", "alpha"))
    count = scratch = None
    for i in range(inputs.n_experts):
        tau = inputs.task_vector(i)
        scratch = scratch or _Scratch(tau)
        keep = scratch.kept(tau, epsilon)
        count = keep.to(_count_dtype(inputs.n_experts)) if count is None else count_mask_(count, keep)
        del tau
    # float32 once: dividing by the uint8 count would cast it to a fresh temporary for every expert
    unique, divisor = count == 1, count.clamp_(min=1).to(torch.float32)
    total = None
    for i in range(inputs.n_experts):
        tau = inputs.task_vector(i)
        keep = scratch.nonzero(tau, epsilon)
        lam = _lambda(keep, unique, epsilon, r, alpha, scratch.drop)
        scaled = torch.mul(tau, lam, out=scratch.magnitude)
        term = torch.where(unique, scaled, tau.div_(divisor), out=tau)  # same element: the overlap is safe
        total = term if total is None else total.add_(term)
        del tau, term
    return total


def _lambda(keep: torch.Tensor, unique: torch.Tensor, epsilon: float, r: float, alpha: float,
            scratch: torch.Tensor) -> torch.Tensor:
    """lambda_i as a float32 0-d tensor, by the same tensor operations (and so roundings) as MergeKit's;
    `scratch` is a bool buffer of keep's shape."""
    n_unique = torch.logical_and(keep, unique, out=scratch).sum()
    n_shared = keep.sum() - n_unique
    rho = n_shared / n_unique.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


_EPSILON = ParamSpec("epsilon", per_expert=False, default=1e-5, low=0.0)

register(MergeMethod(
    name="ram",
    fn=ram_merge,
    params=(_EPSILON,),
    reference="https://arxiv.org/abs/2601.13572",
    doc="elements one expert changes keep its change; shared elements average the experts that change them",
))

register(MergeMethod(
    name="ramplus_tl",
    fn=ramplus_tl_merge,
    params=(
        ParamSpec("r", per_expert=False, default=0.1, low=0.0),
        ParamSpec("alpha", per_expert=False, default=0.2, low=0.0),
        _EPSILON,
    ),
    reference="https://arxiv.org/abs/2601.13572",
    doc="ram, with each expert's unique elements scaled up by its share of overlapping elements (per tensor)",
))
