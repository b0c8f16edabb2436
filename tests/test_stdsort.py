"""`stdsort` replays torch's CPU sort: the full replay equals `torch.argsort` (descending and ascending) entry
for entry on inputs full of equal values, and the boundary replay puts the same entries on each side."""

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
