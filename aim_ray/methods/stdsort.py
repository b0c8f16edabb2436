"""Which entries tie-breaking keeps, as MergeKit's trims keep them on CPU.

MergeKit trims with `torch.argsort(w, descending=True)[:k]` (TIES) and `torch.sort(w).indices[lo:hi]`
(breadcrumbs) on a flat float32 tensor. PyTorch's CPU sort of a float tensor with stable=False is libstdc++'s
`std::sort` of (value, index) pairs: an introsort (median-of-three pivot, unguarded Hoare partition, heapsort
below a depth of 2*floor(log2 n), insertion sort of the final runs of at most 16). Unstable: which of equal
values end up first depends on the whole input. `order_at` replays that algorithm's moves, but only inside
the partitions that straddle a boundary of interest (a quickselect, O(n) expected), because only there can
they change which entries land on which side. `tests/test_stdsort.py` checks the replay of the full sort
against `torch.argsort` itself, so a PyTorch build that sorts otherwise (x86-simd-sort) fails loudly.

Entries are packed as int64 `(key << 32) | index`: a comparison of keys is `x < (y & HIGH)`, and one move
carries both.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

THRESHOLD = 16  # libstdc++'s _S_threshold: runs this short are left to the final insertion sort
BLOCK = 128  # entries a partition scan classifies at a time
HIGH = np.int64(-1 << 32)
KEY_LIMIT = 0x7F800001  # |w| bits above this are NaNs, all equal to each other (and above +Inf) for the sort
KEY_FLIP = 0x7FFFFFFF  # descending order = ascending order of KEY_FLIP - key


@njit(inline="always")
def _less(x, y):
    return x < (y & HIGH)


@njit(nogil=True, cache=True)
def _insertion_sort(v, first, last):
    """Stable: an entry moves left only past strictly greater keys."""
    for i in range(first + 1, last):
        x = v[i]
        j = i
        while j > first and _less(x, v[j - 1]):
            v[j] = v[j - 1]
            j -= 1
        v[j] = x


@njit(nogil=True, cache=True)
def _partition_pivot(v, first, last, stops):
    """Median of (first+1, mid, last-1) moved to first, then libstdc++'s unguarded Hoare partition of
    [first+1, last): the i-th entry from the left not below the pivot swaps with the i-th from the right not
    above it, until they cross; returns the cut.

    Same swaps, found block by block without a branch per entry (BlockQuicksort): positions between the two
    scans still hold their original entries, so stops found ahead are valid while they stay short of the
    other side's last stop, where the sequential scan would stop anyway."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    if _less(v[a], v[b]):
        m = b if _less(v[b], v[c]) else (c if _less(v[a], v[c]) else a)
    else:
        m = a if _less(v[a], v[c]) else (c if _less(v[b], v[c]) else b)
    v[first], v[m] = v[m], v[first]
    key = v[first] & HIGH
    left, right = stops[0], stops[1]
    lo, hi = first + 1, last - 1  # next positions the left / right scans will look at
    n_left = i_left = n_right = i_right = 0
    high_stop = last  # where the right scan last stopped (and swapped)
    while True:
        if i_left == n_left:
            count = min(BLOCK, high_stop - lo)
            if count <= 0:
                return high_stop  # the left scan meets the entry it swapped there: >= pivot
            n_left = i_left = 0
            for t in range(count):
                left[n_left] = lo + t
                n_left += v[lo + t] >= key
            lo += count
            continue
        stop = left[i_left]
        if stop >= high_stop:
            return high_stop
        if i_right == n_right:
            count = min(BLOCK, hi - stop)
            if count <= 0:
                return stop  # no entry <= pivot above the left stop: the scans cross
            n_right = i_right = 0
            for t in range(count):
                right[n_right] = hi - t
                n_right += (v[hi - t] & HIGH) <= key
            hi -= count
            continue
        other = right[i_right]
        if other <= stop:
            return stop
        v[stop], v[other] = v[other], v[stop]
        high_stop = other
        i_left += 1
        i_right += 1


@njit(nogil=True, cache=True)
def _sift(v, first, hole, length, x):
    """libstdc++ __adjust_heap then __push_heap: the hole goes down to a leaf, then x climbs back up."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _less(v[first + child], v[first + child - 1]):
            child -= 1
        v[first + hole] = v[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        v[first + hole] = v[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and _less(v[first + parent], x):
        v[first + hole] = v[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    v[first + hole] = x


@njit(nogil=True, cache=True)
def _heap_sort(v, first, last):
    """std::partial_sort(first, last, last): make_heap, then pop the maximum to the back, repeatedly."""
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _sift(v, first, parent, length, v[first + parent])
        if parent == 0:
            break
        parent -= 1
    while length > 1:
        length -= 1
        x = v[first + length]
        v[first + length] = v[first]
        _sift(v, first, 0, length, x)


@njit(nogil=True, cache=True)
def _introsort(v, lo, hi, full):
    """Arrange v as std::sort would, within every partition that holds position lo or hi strictly inside
    (all of them when `full`); a partition that does not keeps its entries on their side of both. Returns
    how many entries went through the heapsort fallback (tests drive it with an adversarial input)."""
    n = v.size
    heaped = 0
    if n < 2:
        return heaped
    depth0 = 0  # 2 * floor(log2 n), libstdc++'s depth limit
    m = n
    while m > 1:
        m >>= 1
        depth0 += 2
    stack = np.empty((2 * depth0 + 4, 3), np.int64)
    stops = np.empty((2, BLOCK), np.int64)
    stack[0] = (0, n, depth0)
    top = 1
    while top > 0:
        top -= 1
        first, last, depth = stack[top, 0], stack[top, 1], stack[top, 2]
        if not (full or first < lo < last or first < hi < last):
            continue
        if last - first <= THRESHOLD:
            _insertion_sort(v, first, last)  # the final insertion sort never crosses a partition's edge
            continue
        if depth == 0:
            _heap_sort(v, first, last)
            heaped += last - first
            continue
        cut = _partition_pivot(v, first, last, stops)
        stack[top] = (cut, last, depth - 1)
        stack[top + 1] = (first, cut, depth - 1)
        top += 2
    return heaped


@njit(inline="always")
def entry(a, j, descending):
    """The packed sort entry of flat index j with |w| bits a (non-negative float32 bits)."""
    key = min(np.int64(a), KEY_LIMIT)
    if descending:
        key = KEY_FLIP - key
    return (key << 32) | np.int64(j)


@njit(nogil=True, cache=True)
def _pack(bits, descending, out):
    for j in range(bits.size):
        out[j] = entry(bits[j], j, descending)


@njit(nogil=True, cache=True)
def mark(v, lo, hi, first, last, descending, out):
    """Set bit j of the bitset `out` for each entry j at positions [lo, hi) of v whose |w| bits are `first`
    or `last` (the only ones a bitset must tell apart)."""
    edge_a, edge_b = entry(first, 0, descending) & HIGH, entry(last, 0, descending) & HIGH
    for p in range(lo, hi):
        key = v[p] & HIGH
        if key == edge_a or key == edge_b:
            j = v[p] & 0xFFFFFFFF
            out[j >> 3] |= np.uint8(1 << (j & 7))


def pack(bits: np.ndarray, descending: bool) -> np.ndarray:
    """The packed entries of non-negative float32 bit patterns `bits` (int32), keys in sort order."""
    out = np.empty(bits.size, np.int64)
    _pack(bits, descending, out)
    return out


def replay(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Replay std::sort on packed entries in place, at the boundaries lo and hi; returns v."""
    _introsort(v, lo, hi, False)
    return v


def order_at(bits: np.ndarray, lo: int, hi: int, descending: bool) -> np.ndarray:
    """Flat indices in an order whose slices [:lo], [lo:hi] and [hi:] hold, as sets, the same entries as
    those of `torch.argsort(w, descending=descending)` (CPU, float32), where `bits` are w's int32 bits."""
    v = replay(pack(bits, descending), lo, hi)
    np.bitwise_and(v, 0xFFFFFFFF, out=v)  # in place: the indices
    return v


def argsort(w: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """The full replay: torch.argsort(w, descending) of a flat non-negative float32 CPU tensor."""
    v = pack(w.reshape(-1).contiguous().view(torch.int32).numpy(), descending)
    _introsort(v, 0, 0, True)
    return torch.from_numpy(v & 0xFFFFFFFF)
