"""Sparsification of one task vector: magnitude (TIES), magnitude_outliers (breadcrumbs), random (DARE),
della_magprune (DELLA), with MergeKit's semantics and rescaling.

Trimming never sorts the whole tensor: `kth_largest` finds the threshold with a two-level radix select on
the float bits (two `bincount`s, O(n)), about 6x faster than `torch.kthvalue` and 19x faster than the full
`argsort` MergeKit uses, on 33M elements on CPU.

Equal magnitudes: where several entries tie at a trim boundary, the kept count is exactly the target and
the kept entries are MergeKit's: those its CPU sort (`torch.argsort(descending=True)` for magnitude,
`torch.sort` ascending for magnitude_outliers, both unstable) puts inside. That order depends on the whole
tensor, so `stdsort` replays the sort's moves around the boundary, only when a boundary does split a group
of equal values (bf16 checkpoints: nearly every tensor; random float32 weights: practically never).
"""

from __future__ import annotations

import torch

from . import stdsort
from .kernels import select_bucket, uniform

SPARSIFICATIONS = ("magnitude", "magnitude_outliers", "random", "della_magprune")
# l1 / l2 / linf: scale the kept entries so that the norm matches the unpruned one (MergeKit; l1 is its
# only choice). inverse: divide by the keep probability, the classic DARE/DELLA 1/p rescaling.
RESCALE_NORMS = ("l1", "l2", "linf", "inverse")
_RESCALE_EPS = 1e-7  # MergeKit: below this norm (before or after) no rescaling


def kth_largest(w: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1 <= k <= numel) of a non-negative float32 tensor, exactly, as a 0-d tensor.

    Non-negative IEEE-754 floats order like their int32 bit patterns, so a radix select on the bits is
    exact: count the top 16 bits, find the bucket holding the k-th largest, then resolve its low 16 bits.
    """
    bits = w.detach().reshape(-1).contiguous().view(torch.int32)
    high = bits >> 16  # sign bit is 0: 0 <= high < 2**15
    bucket, k = select_bucket(torch.bincount(high, minlength=1 << 15).cpu().numpy(), k)
    low = bits[high == bucket] & 0xFFFF
    sub, _ = select_bucket(torch.bincount(low, minlength=1 << 16).cpu().numpy(), k)
    pattern = torch.tensor([(bucket << 16) | sub], dtype=torch.int32, device=w.device)
    return pattern.view(torch.float32)[0]


def rank_mask(w: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """Bool mask of the `count` largest (or smallest) entries of a non-negative float32 tensor, equal values
    taken as `torch.argsort(w.flatten(), descending=largest)[:count]` takes them on CPU."""
    return sorted_range_mask(w, 0, count, largest)


def sorted_range_mask(w: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Bool mask of the entries at positions [lo, hi) of `torch.argsort(w.flatten(), descending)` (CPU) of
    a non-negative float32 tensor. The boundary keys come from the radix select; only when a boundary splits
    a group of equal values is torch's sort replayed (`stdsort`) to tell which of them it puts inside."""
    flat = w.reshape(-1)
    n = flat.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo or (lo == 0 and hi == n):
        return torch.full(w.shape, hi > lo, dtype=torch.bool, device=w.device)
    first, last = _key_at(flat, lo, descending), _key_at(flat, hi - 1, descending)
    lower, upper = torch.minimum(first, last), torch.maximum(first, last)
    mask = (flat > lower) & (flat < upper)
    edges = (flat == lower) | (flat == upper)
    if hi - lo - int(torch.count_nonzero(mask)) == int(torch.count_nonzero(edges)):
        return (mask | edges).view(w.shape)  # no group of equal values straddles lo or hi
    bits = flat.detach().contiguous().cpu().view(torch.int32).numpy()
    order = torch.from_numpy(stdsort.order_at(bits, lo, hi, descending)[lo:hi])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    return mask.view(w.shape).to(w.device)


def _key_at(flat: torch.Tensor, position: int, descending: bool) -> torch.Tensor:
    """The value at `position` of the sorted flat tensor."""
    return kth_largest(flat, position + 1 if descending else flat.numel() - position)


def rescaled(tau: torch.Tensor, mask: torch.Tensor, norm: str | None,
             keep_prob: float | torch.Tensor | None) -> torch.Tensor:
    """tau * mask (bool, or float 1.0 / 0.0: the same products), rescaled: `norm` in RESCALE_NORMS or None;
    keep_prob (float or tensor) for 'inverse'."""
    masked = tau * mask
    if norm is None:
        return masked
    if norm == "inverse":
        return masked.div_(keep_prob)
    if norm == "l1":
        before, after = tau.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tau.norm(), masked.norm()
    elif norm == "linf":
        before, after = tau.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"unknown rescale norm {norm!r}")
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def magnitude(tau: torch.Tensor, density: float, norm: str | None = None) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density * numel)) entries of largest |tau|."""
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))
    return rescaled(tau, rank_mask(tau.abs(), k), norm, density)


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float, norm: str | None = None
                       ) -> torch.Tensor:
    """Breadcrumbs: in ascending |tau| order drop the n_bot smallest, keep the next int(density * numel),
    and so drop the top int(gamma * numel) (fewer when density + gamma > 1, as MergeKit)."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    keep = sorted_range_mask(tau.abs(), n_bot, n_bot + target, descending=False)
    return rescaled(tau, keep, norm, density)


def bernoulli(tau: torch.Tensor, density: float, key: int, norm: str | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability density: `uniform(key, tau.shape) < density`, a counter-based
    uniform draw (`kernels.uniform24`) that the fused path redraws without storing the mask."""
    if density >= 1:
        return tau
    mask = uniform(key, tau.shape).lt_(density)  # 1.0 / 0.0 in the draw's buffer, as in della_magprune
    return rescaled(tau, mask, norm, density)


def della_magprune(tau: torch.Tensor, density: float, epsilon: float, key: int, norm: str | None = None
                   ) -> torch.Tensor:
    """DELLA MagPrune: per row (dim 1; a 1-D tensor is one row) rank |tau| ascending (equal values ranked as
    MergeKit's CPU argsort ranks them), map rank r of n to p = density - epsilon + 2 * epsilon * r / (n - 1),
    keep with probability p (`uniform(key, p.shape) < p`). A one-column row gets p = density."""
    if density >= 1:
        return tau
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: epsilon={epsilon} must keep density +/- epsilon in (0, 1), "
                         f"density={density}")
    rows = tau if tau.dim() >= 2 else tau.reshape(1, -1)
    probs = _della_probs(rows, density, epsilon)
    mask = uniform(key, probs.shape).lt_(probs)  # 1.0 / 0.0 in the draw's buffer: no fresh bool mask per expert
    inverse = probs if norm == "inverse" else None
    del probs
    return rescaled(rows, mask, norm, inverse).reshape(tau.shape)


def _della_probs(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    n = rows.shape[1]
    if n == 1:
        return torch.full_like(rows, density)
    order = torch.argsort(rows.abs(), dim=1)  # MergeKit's own (unstable) call: its ranks for equal values
    positions = torch.arange(n, dtype=torch.float32, device=rows.device).expand_as(rows)
    ranks = torch.empty_like(rows).scatter_(1, order, positions)  # rank of each entry, 0-based
    del order
    # Same operation order as MergeKit: (density - eps) + rank_norm * 2 * eps.
    return ranks.div_(n - 1).mul_(2).mul_(epsilon).add_(density - epsilon)


def sparsify(tau: torch.Tensor, method: str, *, density: float, gamma: float = 0.0, epsilon: float = 0.0,
             norm: str | None = None, key: int | None = None) -> torch.Tensor:
    """Dispatch on MergeKit's sparsification method names. May return `tau` itself (density >= 1)."""
    if method == "magnitude":
        return magnitude(tau, density, norm)
    if method == "magnitude_outliers":
        return magnitude_outliers(tau, density, gamma, norm)
    if method == "random":
        return bernoulli(tau, density, _need(key), norm)
    if method == "della_magprune":
        return della_magprune(tau, density, epsilon, _need(key), norm)
    raise ValueError(f"unknown sparsification {method!r}; known: {', '.join(SPARSIFICATIONS)}")


def _need(key: int | None) -> int:
    if key is None:
        raise ValueError("random sparsification needs a mask key (inputs.mask_key(i))")
    return key
