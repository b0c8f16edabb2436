"""The fused fast path of the generalized task-arithmetic family (see `kernels.py`).

`fused_gta` returns the same delta as `gta_merge`'s torch path (bit for bit, but for the float64 rescale
sums) or None when it does not apply: DELLA (per-row argsort), inputs without stored tensors (a vocabulary
that must be aligned), inputs of mixed storage formats, or `AIM_RAY_FUSED=0` in the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from . import kernels as K
from . import sparsify
from .base import MethodParams, TensorInputs

FUSED_SPARSIFICATIONS = (None, "magnitude", "magnitude_outliers", "random")
_NORMS = {"l1": K.NORM_L1, "l2": K.NORM_L2, "linf": K.NORM_LINF}
_RESCALE_EPS = np.float32(sparsify._RESCALE_EPS)  # compared in float32, as torch compares it
_NO_BITS = np.zeros(1, np.uint8)  # the bitset argument of an expert that needs none (never read)
_enabled = os.environ.get("AIM_RAY_FUSED", "1") != "0"


@contextmanager
def torch_path() -> Iterator[None]:
    """Run the plain torch path instead (tests and benchmarks compare the two)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def enabled() -> bool:
    return _enabled


def fused_gta(inputs: TensorInputs, params: MethodParams, sparsification: str | None, consensus: bool
              ) -> torch.Tensor | None:
    if not _enabled or sparsification not in FUSED_SPARSIFICATIONS:
        return None
    views = _stored_views(inputs)
    if views is None:
        return None
    shape, base, experts = views
    n = base.size
    count = len(experts)
    modes = np.zeros(count, np.int64)
    bounds = np.tile(np.array(K.EMPTY, np.int64), (count, 1))
    edge_bits: list[np.ndarray | None] = [None] * count
    keys = np.zeros(count, np.uint64)
    probs = np.ones(count, np.float32)
    scales = np.ones(count, np.float32)
    divide = np.zeros(count, np.bool_)
    weights = np.array([params.expert(i, "weight") for i in range(count)], np.float32)
    norm = params.shared["rescale_norm"] if params.shared["rescale"] else None
    for i, expert in enumerate(experts):
        p = params.per_expert[i]
        density = p.get("density", 1.0)
        if sparsification is None or density >= 1:
            continue  # MODE_DENSE: tau itself (sparsify returns it unscaled)
        if sparsification == "random":
            modes[i], keys[i], probs[i] = K.MODE_RANDOM, np.uint64(inputs.mask_key(i)), np.float32(density)
        else:
            modes[i] = K.MODE_RANK
            bounds[i], edge_bits[i] = K.rank_bounds(
                base, expert, *_rank_range(sparsification, n, density, p.get("gamma", 0.0)), compact=True)
        own = edge_bits[i] if edge_bits[i] is not None else _NO_BITS
        scales[i], divide[i] = _rescale(base, expert, norm, modes[i], bounds[i], own, keys[i], probs[i], density)
    lam = float(params.shared["lambda"])
    out = np.empty(n, np.float32)
    addresses = np.array([e.ctypes.data for e in experts], np.int64)  # `experts` keeps them alive
    bits, offsets = K.pack_bitsets(edge_bits)
    del edge_bits
    bad = K._combine(base, addresses, modes, bounds, bits, offsets, keys, probs, scales, divide, weights, consensus,
                     bool(params.shared["normalize"]), _weight_sum(params, count), np.float32(lam), lam != 1, out)
    if bad:
        verify = getattr(inputs, "verify_finite", None)
        if verify is not None:
            verify()  # names the input holding NaN/Inf (or passes: an overflow of finite values)
    return torch.from_numpy(out).view(shape)


def _stored_views(inputs: TensorInputs):
    """(shape, base view, expert views) of the stored tensors, or None when the fused path cannot read them."""
    stored = getattr(inputs, "stored", None)
    if stored is None:
        return None
    tensors = [stored(i) for i in range(-1, inputs.n_experts)]
    if any(t is None for t in tensors):
        return None
    views = [K.flat_bits(t) for t in tensors]
    if any(v is None for v in views):
        return None
    base, experts = views[0], views[1:]
    if len({e.dtype for e in views}) != 1:
        return None  # one storage format for all (the kernels see the experts as base-typed arrays)
    return tuple(tensors[0].shape), base, experts


def _rank_range(sparsification: str, n: int, density: float, gamma: float) -> tuple[int, int, bool]:
    """sparsify.magnitude / magnitude_outliers as (lo, hi, descending): the kept positions of the sort."""
    if sparsification == "magnitude":
        return 0, max(1, int(density * n)), True
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    return n_bot, n_bot + target, False


def _rescale(base, expert, norm: str | None, mode: int, bounds: np.ndarray, bits: np.ndarray, key, prob,
             density: float
             ) -> tuple[np.float32, bool]:
    """(scale, divide) as sparsify.rescaled applies them: masked / scale or masked * scale."""
    if norm is None:
        return np.float32(1.0), False
    if norm == "inverse":
        return np.float32(density), True
    before, after = K._kept_norms(base, expert, mode, bounds, bits, key, prob, _NORMS[norm])
    before, after = np.float32(before), np.float32(after)
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return np.float32(1.0), False
    return np.float32(before / after), False


def _weight_sum(params: MethodParams, count: int) -> np.float32:
    """sum_i w_i as the torch path sums it (float32), 1 when ~0."""
    total = torch.tensor([float(params.expert(i, "weight")) for i in range(count)], dtype=torch.float32).sum()
    return np.float32(1.0) if total.abs() < 1e-8 else np.float32(total.item())
