"""`stdsort` replays torch's CPU sort: the full replay equals `torch.argsort` (descending and ascending) entry
for entry on inputs full of equal values, the heapsort fallback included (an adversarial input), and the
boundary replay puts the same entries on each side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aim_ray.methods import stdsort


def tied(n: int, levels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n,), generator=g).float() * 0.37


def bf16_like(n: int, seed: int) -> torch.Tensor:
    """|x| of bf16 values as float32: 256 mantissas per octave, so thousands of equal values."""
    g = torch.Generator().manual_seed(seed)
    return (0.01 * torch.randn(n, generator=g)).bfloat16().float().abs()


CASES = [(1, 1), (2, 1), (16, 3), (17, 3), (18, 2), (33, 5), (100, 1), (1000, 7), (4097, 50), (65_536, 3),
         (250_000, 1000)]


@pytest.mark.parametrize("n,levels", CASES)
@pytest.mark.parametrize("descending", [True, False])
def test_full_replay_equals_torch_argsort(n, levels, descending):
    for w in (tied(n, levels, n), bf16_like(n, n + 1)):
        assert torch.equal(stdsort.argsort(w, descending), torch.argsort(w, descending=descending))


def test_full_replay_with_zeros_infinities_and_nans():
    w = tied(3000, 4, 1)
    w[::7] = 0.0
    w[::11] = torch.inf
    w[::13] = torch.nan  # torch's comparators put NaN above +Inf, all NaNs equal
    for descending in (True, False):
        assert torch.equal(stdsort.argsort(w, descending), torch.argsort(w, descending=descending))


@pytest.mark.parametrize("descending", [True, False])
def test_boundary_replay_splits_like_torch(descending):
    w = bf16_like(200_000, 9)
    bits = w.view(torch.int32).numpy()
    full = torch.argsort(w, descending=descending).numpy()
    n = w.numel()
    for lo, hi in [(0, 1), (0, n // 10), (n // 4, n // 2), (3, n - 3), (n // 2, n // 2 + 1), (0, n)]:
        order = stdsort.order_at(bits, lo, hi, descending)
        for a, b in [(0, lo), (lo, hi), (hi, n)]:
            assert np.array_equal(np.sort(order[a:b]), np.sort(full[a:b])), (lo, hi, a, b)


def test_unstable_order_differs_from_a_stable_sort():
    """The point of the replay: on equal values torch's sort is not the stable order."""
    w = bf16_like(50_000, 3)
    assert not torch.equal(torch.argsort(w, descending=True), torch.argsort(w, descending=True, stable=True))


def _quicksort_killer(n: int) -> np.ndarray:
    """McIlroy's adversary ("A killer adversary for quicksort", 1999) run against the quicksort phase of
    libstdc++'s std::sort (median of three moved to the front, unguarded partition): values that make
    every pivot a bad one, so the real std::sort reaches its depth limit and heapsorts."""
    gas = n
    val = [gas] * n
    solid, candidate = 0, 0

    def less(x: int, y: int) -> bool:
        nonlocal solid, candidate
        if val[x] == gas and val[y] == gas:
            val[x if x == candidate else y], solid = solid, solid + 1
        if val[x] == gas:
            candidate = x
        elif val[y] == gas:
            candidate = y
        return val[x] < val[y]

    a = list(range(n))
    stack = [(0, n)]
    while stack:
        first, last = stack.pop()
        if last - first <= stdsort.THRESHOLD:
            continue
        b, m, c = first + 1, first + (last - first) // 2, last - 1
        if less(a[b], a[m]):
            median = m if less(a[m], a[c]) else (c if less(a[b], a[c]) else b)
        else:
            median = b if less(a[b], a[c]) else (c if less(a[m], a[c]) else m)
        a[first], a[median] = a[median], a[first]
        lo, hi = first + 1, last
        while True:
            while less(a[lo], a[first]):
                lo += 1
            hi -= 1
            while less(a[first], a[hi]):
                hi -= 1
            if lo >= hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        stack += [(lo, last), (first, lo)]
    return np.array([v if v != gas else n + i for i, v in enumerate(val)])


@pytest.mark.parametrize("descending,div", [(False, 2), (True, 2), (True, 3)])
def test_heapsort_fallback_equals_torch_argsort(descending, div):
    """Adversarial input with equal values (killer values // div): torch heapsorts large partitions, and
    the replay still gives its exact order."""
    w = torch.from_numpy((_quicksort_killer(3000) // div).astype(np.float32))
    v = stdsort.pack(w.view(torch.int32).numpy(), descending)
    assert stdsort._introsort(v, 0, 0, True) > 100  # entries that went through the heapsort
    assert torch.equal(torch.from_numpy(v & 0xFFFFFFFF), torch.argsort(w, descending=descending))
