"""sce (Select, Calculate, Erase; FuseChat 2.0, https://arxiv.org/abs/2408.07990), MergeKit semantics.

    select:    with select_topk < 1, keep the k = int(select_topk * #{var != 0}) elements of largest
               variance across the experts' task vectors (var = population variance, over the experts, of
               each element; equal variances at the cut taken as MergeKit's torch.topk takes them):
               tau_i <- m * tau_i for every expert (k = 0: nothing kept, the base). select_topk = 1 (the
               default) keeps everything.
    calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2) per tensor (uniform 1/N where that sum is below 1e-6:
               task vectors with an RMS below ~1e-3, common in fine-tuned LLMs)
    erase:     s = sign(sum_i tau_i) (+1 where the sum is 0); agree_i = sign(tau_i) == s (zeros never agree)
    delta = sum_i agree_i w_i tau_i / max(sum_i agree_i w_i, 1e-6)

There are no per-model weights (MergeKit ignores `weight` for sce). int8_mask only changes MergeKit's mask
dtype: no effect here. Base required.

Memory: streamed, one expert read at a time, but selection and weights come before any sum, so the experts are
read in up to three passes: (1) Welford's mean and M2 in float64 for the variance, exactly as torch.var
computes it (so equal variances stay equal, and the selected set is MergeKit's), (2) the weights' mean squares
and the sum for the sign vote, (3) the weighted sum. Peak, whatever the number of experts (MergeKit stacks all
N task vectors): pass 1 two float64 buffers, the expert read and 1M-element scratch; then the selection mask,
the sign vote (bool), the two sums, the expert read and 1M-element scratch. Without selection, passes 2
and 3 only.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register
from .sparsify import kth_largest

WEIGHT_FLOOR = 1e-6  # sum of mean squares below this: uniform weights
DIVISOR_FLOOR = 1e-6
_SLICE = 1 << 20


def sce_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n = inputs.n_experts
    topk = float(params.shared["select_topk"])
    keep = select_mask(inputs, topk) if topk < 1 else None

    def tau(i: int) -> torch.Tensor:
        t = inputs.task_vector(i)
        return t if keep is None else t.mul_(keep)

    squares, total = [], None
    for i in range(n):
        t = tau(i)
        squares.append(t.square().mean())
        total = t if total is None else total.add_(t)
        del t
    shape = total.shape
    positive = (total >= 0).view(-1)  # the sign vote: sum of the selected task vectors, in expert order
    del total
    weights = _weights(torch.stack(squares))
    negative = ~positive
    # Scratch reused by every expert: fresh full-size temporaries per expert fragmented the heap (the peak
    # grew with the experts), and slice-sized ones cost page faults.
    agree, other, w = torch.empty_like(positive), torch.empty_like(positive), torch.empty(positive.shape)
    zero = torch.zeros(())
    mixed = divisor = None
    for i in range(n):
        t = tau(i).view(-1)
        torch.gt(t, 0, out=agree).logical_and_(positive)  # (t > 0) & positive | (t < 0) & ~positive
        torch.lt(t, 0, out=other).logical_and_(negative)
        torch.where(agree.logical_or_(other), weights[i], zero, out=w)
        t.mul_(w)
        if mixed is None:
            mixed, divisor = t, w.clone()
        else:
            mixed.add_(t)
            divisor.add_(w)
        del t
    return mixed.div_(divisor.clamp_(min=DIVISOR_FLOOR)).view(shape)


def _weights(squares: torch.Tensor) -> torch.Tensor:
    total = torch.sum(squares).item()
    if abs(total) < WEIGHT_FLOOR:
        return torch.ones_like(squares) / squares.shape[0]
    return squares / total


def select_mask(inputs: TensorInputs, topk: float) -> torch.Tensor:
    """Bool mask of the k = int(topk * #{var != 0}) elements of largest variance across the experts."""
    var = _variance(inputs)
    k = int(torch.count_nonzero(var) * topk)  # a float32 product, as MergeKit's (it rounds past 2**24)
    flat = var.reshape(-1).abs_()
    if k == 0:
        return torch.zeros(var.shape, dtype=torch.bool)
    cut = kth_largest(flat, k)
    keep = flat >= cut
    if int(torch.count_nonzero(keep)) != k:  # equal variances straddle the cut: MergeKit's choice among them
        keep.zero_()
        keep[torch.topk(flat, k=k, largest=True).indices] = True
    return keep.view(var.shape)


def _variance(inputs: TensorInputs) -> torch.Tensor:
    """Population variance over the experts of each element of tau, float32: Welford's update in float64,
    operation for operation as torch.var(stack, dim=0, unbiased=False) on CPU, so bit for bit its result.
    The float64 scratch is one 1M-element slice, reused (fresh slices cost page faults); mean and M2 are the
    only full-size float64 buffers."""
    mean = m2 = shape = scratch = None
    for i in range(inputs.n_experts):
        x = inputs.task_vector(i)
        shape, x = x.shape, x.reshape(-1)
        if mean is None:
            mean, m2 = x.double(), torch.zeros(x.numel(), dtype=torch.float64)
            scratch = [torch.empty(min(_SLICE, x.numel()), dtype=torch.float64) for _ in range(3)]
            continue
        for s in range(0, x.numel(), _SLICE):
            ms = mean[s:s + _SLICE]
            xs, delta, step = (b[:ms.numel()] for b in scratch)
            xs.copy_(x[s:s + _SLICE])
            torch.sub(xs, ms, out=delta)
            ms.add_(torch.div(delta, i + 1, out=step))
            m2[s:s + _SLICE].add_(delta.mul_(xs.sub_(ms)))
        del x
    return m2.div_(inputs.n_experts).to(torch.float32).view(shape)


register(MergeMethod(
    name="sce",
    fn=sce_merge,
    params=(
        ParamSpec("select_topk", per_expert=False, default=1.0, low=0.0, high=1.0, low_open=True),
        ParamSpec("int8_mask", per_expert=False, default=False, kind=bool),
    ),
    reference="https://arxiv.org/abs/2408.07990",
    doc="top-variance selection, weights by mean square, sign-consensus erase, weighted average",
))
