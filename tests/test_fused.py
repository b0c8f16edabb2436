"""The fused kernels against the torch reference path: bit for bit (float32, bf16 and f16 storage, heavy ties
at the thresholds), the rank boundaries against torch's own (unstable) sort, the counter-based generator
against a plain Python SplitMix64, and the storage decoders against torch's own conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aim_ray.methods import get_method, resolve_params
from aim_ray.methods import kernels as K
from aim_ray.methods.fused import fused_gta, torch_path
from aim_ray.methods.sparsify import sorted_range_mask

try:
    from tests.inmemory import InMemoryInputs
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from inmemory import InMemoryInputs

FUSED = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
STORAGE = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, n, dtype, seed=0, scale=0.01):
    """bf16/f16 deltas this small take few distinct values: thousands of entries tie at each threshold."""
    g = torch.Generator().manual_seed(seed)
    base = 0.05 * torch.randn(shape, generator=g)
    experts = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return InMemoryInputs("model.layers.1.mlp.up_proj.weight", base, experts, seed=seed, stored_dtype=dtype)


def both_paths(method, inputs, per, shared):
    m = get_method(method)
    params = resolve_params(m, per, shared)
    fused = fused_gta(inputs, params, *_family(method))
    assert fused is not None, "the fused path must apply"
    with torch_path():
        reference = m.fn(inputs, params)
    return fused, reference


def _family(method):
    from aim_ray.methods.task_arithmetic import _FAMILY

    sparsification, consensus, *_ = _FAMILY[method]
    return sparsification, consensus


def expert_params(method, n, density):
    weights = [0.7, -0.4, 1.3, 0.5, 0.9][:n]
    per = [{"weight": w, "density": density} for w in weights]
    if "breadcrumbs" in method:
        for e in per:
            e["gamma"] = 0.05
    return per


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
@pytest.mark.parametrize("method", FUSED)
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_fused_equals_torch_path_bit_for_bit(method, dtype, density):
    inputs = make_inputs((96, 80), 3, dtype)
    shared = {"lambda": 0.8}
    if method.startswith("dare"):
        shared["rescale_norm"] = "inverse"  # l1/l2 sums are float64 here, float32 blocks in torch: below
    fused, reference = both_paths(method, inputs, expert_params(method, 3, density), shared)
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("method", FUSED)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [None, "l1", "l2", "linf", "inverse"])
def test_fused_options_match(method, normalize, rescale):
    inputs = make_inputs((64, 50), 4, torch.bfloat16, seed=3)
    shared = {"normalize": normalize, "lambda": 1.0}
    if rescale is not None:
        shared.update(rescale=True, rescale_norm=rescale)
    else:
        shared["rescale"] = False
    fused, reference = both_paths(method, inputs, expert_params(method, 4, 0.4), shared)
    if rescale in ("l1", "l2"):  # one float64-vs-float32 sum per expert: its scale differs by ~1e-7
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))
    else:
        assert torch.equal(fused, reference)


def test_fused_one_element_and_one_expert():
    for shape in [(1,), (7,), (5000,)]:
        inputs = make_inputs(shape, 1, torch.bfloat16)
        fused, reference = both_paths("ties", inputs, [{"weight": 1.0, "density": 0.5}], {})
        assert torch.equal(fused, reference)


def test_fused_skips_where_it_does_not_apply():
    inputs = make_inputs((16, 8), 2, torch.float32)
    params = resolve_params(get_method("della"), [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 2, {})
    assert fused_gta(inputs, params, "della_magprune", True) is None
    mixed = make_inputs((16, 8), 2, torch.float32)
    mixed._stored[2] = mixed._stored[2].to(torch.bfloat16)  # experts of two storage widths
    params = resolve_params(get_method("ties"), [{"weight": 1.0, "density": 0.5}] * 2, {})
    assert fused_gta(mixed, params, "magnitude", True) is None


# --------------------------------------------------------------------------------------- rank boundaries


def _bounds_mask(a: np.ndarray, bounds: np.ndarray, bits: np.ndarray | None) -> np.ndarray:
    lower, upper, all_edges = bounds
    j = np.arange(a.size)
    marked = np.ones(a.size, bool) if all_edges else ((bits[j >> 3] >> (j & 7)) & 1).astype(bool)
    return ((a > lower) & (a < upper)) | (((a == lower) | (a == upper)) & marked)


@pytest.mark.parametrize("data", ["randn", "duplicates", "special"])
def test_rank_bounds_equal_torch_sort_and_sorted_range_mask(data):
    g = torch.Generator().manual_seed(5)
    w = {"randn": torch.randn(5000, generator=g),
         "duplicates": torch.randint(-3, 4, (4000,), generator=g).float() * 0.25,
         "special": torch.cat([torch.zeros(300), torch.full((50,), -math.inf), torch.full((70,), 1e-40),
                               torch.rand(500, generator=g) - 0.5])}[data]
    w = w[torch.randperm(w.numel(), generator=g)]
    base = K.flat_bits(torch.zeros_like(w))
    tau = K.flat_bits(w)
    a = w.abs().view(torch.int32).numpy().astype(np.int64)
    n = w.numel()
    for descending in (True, False):
        order = torch.argsort(w.abs(), descending=descending)
        for lo, hi in [(0, 0), (0, 1), (0, n // 3), (0, n), (0, n + 5), (n // 5, n // 2), (1, n - 1), (n - 1, n),
                       (n // 2, n // 2), (7, 4)]:
            bounds, bits = K.rank_bounds(base, tau, lo, hi, descending)
            expected = np.zeros(n, bool)
            expected[order[max(lo, 0):min(hi, n)].numpy()] = True
            assert (_bounds_mask(a, bounds, bits) == expected).all(), (lo, hi, descending)
            assert (sorted_range_mask(w.abs(), lo, hi, descending).numpy() == expected).all(), (lo, hi)


def test_compact_edge_bitset_is_the_full_one_at_the_edge_entries():
    """The kernels' compact bitset: one bit per entry whose |tau| is a bound, in position order (also where a
    bound is a NaN, which the sort ties with every other NaN); experts packed one after the other (the
    combine's layout)."""
    g = torch.Generator().manual_seed(9)
    base = K.flat_bits(torch.zeros(6000, dtype=torch.bfloat16))
    taus = [(torch.randint(-3, 4, (6000,), generator=g) * 0.25).to(torch.bfloat16) for _ in range(3)]
    nans = taus[2].view(torch.int16)
    nans[torch.randperm(6000, generator=g)[:80]] = torch.tensor([0x7FC1] * 50 + [0x7FC2] * 30, dtype=torch.int16)
    packed = []
    for tau, (lo, hi, descending) in zip(taus, [(0, 2500, True), (1700, 4100, False), (0, 40, True)], strict=True):
        a = tau.float().abs().view(torch.int32).numpy().astype(np.int64)
        bounds, full = K.rank_bounds(base, K.flat_bits(tau), lo, hi, descending)
        bounds_c, compact = K.rank_bounds(base, K.flat_bits(tau), lo, hi, descending, compact=True)
        assert (bounds == bounds_c).all() and bounds[2] == 0  # these boundaries split groups
        assert (bounds[1] > 0x7F800000) == (tau is taus[2])  # a NaN bound
        edges = np.flatnonzero((a == bounds[0]) | (a == bounds[1]))
        assert compact.size == (edges.size + 7) // 8 < full.size
        expected = (full[edges >> 3] >> (edges & 7)) & 1
        assert (np.unpackbits(compact, bitorder="little")[:edges.size] == expected).all()
        packed.append(compact)
    bits, offsets = K.pack_bitsets([None, packed[0], None, packed[1], packed[2]])
    assert offsets.tolist() == [0, 0, packed[0].size, packed[0].size, packed[0].size + packed[1].size]
    assert bits.tolist() == packed[0].tolist() + packed[1].tolist() + packed[2].tolist()


# -------------------------------------------------------------------------------------- random generator


def _splitmix64(key: int, j: int) -> int:
    mask = (1 << 64) - 1
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_uniform_is_splitmix64_top_24_bits():
    for key in [0, 1, 12345678901234567, (1 << 63) - 1]:
        draws = K.uniform(key, (40,))
        expected = torch.tensor([(_splitmix64(key, j) >> 40) / 2**24 for j in range(40)], dtype=torch.float32)
        assert torch.equal(draws, expected)


def test_uniform_statistics_and_independence():
    a, b = K.uniform(7, (1_000_000,)), K.uniform(8, (1_000_000,))
    assert 0 <= float(a.min()) and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 2e-3 and abs(float((a < 0.3).float().mean()) - 0.3) < 2e-3
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5e-3


# -------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16_bit_pattern_decodes_like_torch(dtype):
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    zeros = torch.zeros_like(patterns)
    inputs = InMemoryInputs("x", zeros, [patterns], stored_dtype=dtype)
    params = resolve_params(get_method("task_arithmetic"), [{"weight": 1.0}], {})
    decoded = fused_gta(inputs, params, None, False)  # tau * 1.0 = pattern - 0
    torch.testing.assert_close(decoded, patterns.float() - 0.0, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------ apply delta


@pytest.mark.parametrize("stored", STORAGE, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("factor", ["none", "column", "element"])
def test_apply_delta_equals_torch(stored, out_dtype, factor):
    g = torch.Generator().manual_seed(11)
    base = (0.05 * torch.randn(70, 33, generator=g)).to(stored)
    delta = 0.01 * torch.randn(70, 33, generator=g)
    # bf16 rounding ties: sums whose low 16 bits are exactly 0x8000, both parities of the kept bit
    delta.view(-1)[:64] = (base.float().view(-1)[:64].view(torch.int32) | 0x8000).view(torch.float32) \
        - base.float().view(-1)[:64]
    f = {"none": None, "column": torch.rand(33, generator=g), "element": torch.rand(70, 33, generator=g)}[factor]
    merged, bad = K.apply_delta(base, delta, f, out_dtype)
    expected = (base.float() + (delta if f is None else f * delta)).to(out_dtype)
    assert bad == 0 and merged.dtype == out_dtype and torch.equal(merged, expected)


def test_apply_delta_counts_nonfinite_base_and_skips_other_dtypes():
    base = torch.tensor([1.0, math.nan, math.inf, -2.0], dtype=torch.bfloat16)
    _, bad = K.apply_delta(base, torch.zeros(4), None, torch.bfloat16)
    assert bad == 2
    assert K.apply_delta(base, torch.zeros(4), None, torch.float16) is None
    assert K.apply_delta(base.to(torch.float64), torch.zeros(4), None, torch.bfloat16) is None
