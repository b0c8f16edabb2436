"""Fused CPU kernels (numba) for the generalized task-arithmetic family: the fast path of `gta_merge`.

The plain torch path of `task_arithmetic.py` makes ~20 passes over full-size float32 buffers per expert
(convert, subtract, abs, compare, mask, scale, clamp, accumulate...). These kernels read each input tensor in
its stored dtype (bf16 / f16 / f32 bits, memory-mapped) and compute tau = expert - base on the fly:

- rank trimming (TIES `magnitude`, breadcrumbs `magnitude_outliers`) finds each expert's exact threshold
  with a two-level radix select on the bits of |tau|: one pass histograms the high 16 bits, a second collects
  the (low bits, index) of the few entries in the threshold's bucket; ties at the threshold are resolved by
  flat index, exactly as `sparsify.rank_mask` (a stable sort) does;
- random trimming (DARE) draws its mask from a counter-based generator (`uniform24`), so a second pass
  redraws the same mask without storing it, and any slice of a tensor can be drawn independently;
- one combine pass walks the tensor in cache-sized chunks, streams over the experts and accumulates the
  (sign-consensus) sums in the chunk, so no full-size buffer but the output is ever written.

Element arithmetic is the torch path's, operation for operation in float32, so the results are bit-identical
to it, except the L1/L2 rescale sums, which are accumulated sequentially in float64 here (torch sums float32
in blocks): a relative difference of ~1e-7 in one scale factor per expert and tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

FMT_F32, FMT_BF16, FMT_F16 = 0, 1, 2
STORAGE_FORMATS = {torch.float32: FMT_F32, torch.bfloat16: FMT_BF16, torch.float16: FMT_F16}

MODE_DENSE, MODE_RANK, MODE_RANDOM = 0, 1, 2
NORM_NONE, NORM_L1, NORM_L2, NORM_LINF = 0, 1, 2, 3

ABS_MASK = 0x7FFFFFFF
NONFINITE = 0x7F800000  # |tau| bits at or above this: Inf or NaN
# A rank boundary (flip, threshold, cutoff): entry j with |tau| bits a is in the set iff key = a ^ flip
# satisfies key > threshold or (key == threshold and j < cutoff). flip 0 selects the largest |tau|,
# ABS_MASK the smallest (key = ABS_MASK - a). These two are the empty and the full set.
EMPTY = (0, 0xFFFFFFFF, 0)
CHUNK = 4096  # elements per combine chunk: the accumulators stay in L1/L2

_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment


@intrinsic
def _bits_as_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit(inline="always")
def _half_bits(h):
    """IEEE half -> float32 bits, exactly (subnormals, Inf and NaN included)."""
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:
        if mantissa == 0:
            return sign
        return sign | _f32_as_bits(np.float32(mantissa) * np.float32(5.9604645e-08))  # mantissa * 2**-24
    if exponent == 31:
        return sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    return sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))


@njit(inline="always")
def _load(raw, j, fmt):
    """Element j of a stored tensor (bits as uint16 / uint32) as float32."""
    x = np.uint32(raw[j])
    if fmt == FMT_BF16:
        return _bits_as_f32(x << np.uint32(16))
    if fmt == FMT_F16:
        return _bits_as_f32(_half_bits(x))
    return _bits_as_f32(x)


@njit(inline="always")
def uniform24(key, j):
    """Uniform float32 in [0, 1) on a 2**-24 grid: output j of SplitMix64 seeded with `key`, top 24 bits."""
    z = np.uint64(key) + (np.uint64(j) + np.uint64(1)) * np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float32(z >> np.uint64(40)) * np.float32(5.9604645e-08)


@njit(inline="always")
def _member(a, j, flip, threshold, cutoff):
    key = a ^ flip
    return (key > threshold) | ((key == threshold) & (j < cutoff))


@njit(inline="always")
def _kept(a, j, bounds):
    """In the first set of `bounds` (6 values: two boundaries) and not in the second."""
    inner = _member(a, j, bounds[3], bounds[4], bounds[5])
    return _member(a, j, bounds[0], bounds[1], bounds[2]) & (not inner)


# ------------------------------------------------------------------------------------------- the kernels


@njit(nogil=True, cache=True)
def _fill_uniform(key, out):
    for j in range(out.size):
        out[j] = uniform24(key, j)


@njit(nogil=True, cache=True)
def _abs_histogram(base, fb, expert, fe, hist):
    """hist[b] = number of entries whose |tau| float bits have b as their high 16 bits."""
    for j in range(base.size):
        a = _f32_as_bits(_load(expert, j, fe) - _load(base, j, fb)) & np.uint32(ABS_MASK)
        hist[a >> np.uint32(16)] += 1


@njit(nogil=True, cache=True)
def _collect_buckets(base, fb, expert, fe, buckets, cursors, lows, indices):
    """The low 16 bits and flat index of the entries in each high-16-bit bucket of `buckets`, in index
    order: bucket q's go to lows / indices from cursors[q] on (slots sized by the histogram)."""
    nb = buckets.size
    for j in range(base.size):
        a = _f32_as_bits(_load(expert, j, fe) - _load(base, j, fb)) & np.uint32(ABS_MASK)
        high = a >> np.uint32(16)
        for q in range(nb):
            if high == buckets[q]:
                lows[cursors[q]] = a & np.uint32(0xFFFF)
                indices[cursors[q]] = j
                cursors[q] += 1


@njit(nogil=True, cache=True)
def _kept_norms(base, fb, expert, fe, mode, bounds, key, prob, norm):
    """(norm of tau, norm of the kept entries), accumulated in float64, for rescaling."""
    before = 0.0
    after = 0.0
    for j in range(base.size):
        t = _load(expert, j, fe) - _load(base, j, fb)
        if mode == MODE_RANDOM:
            keep = uniform24(key, j) < prob
        else:
            keep = _kept(_f32_as_bits(t) & np.uint32(ABS_MASK), j, bounds)
        v = abs(np.float64(t))
        if norm == NORM_L2:
            v = v * v
        if norm == NORM_LINF:
            before = max(before, v)
            if keep:
                after = max(after, v)
        else:
            before += v
            if keep:
                after += v
    if norm == NORM_L2:
        return np.sqrt(before), np.sqrt(after)
    return before, after


@njit(nogil=True, cache=True)
def _combine(base, fb, experts, fe, modes, bounds, keys, probs, scales, divide, weights, consensus, normalize,
             div, lam, apply_lambda, out):
    """delta = lambda * normalize(sum_i w_i * rescale(mask_i * tau_i)), with sign consensus or not, chunk by
    chunk. Returns the number of non-finite tau entries met (Inf/NaN inputs, or an overflow)."""
    n = base.size
    pos = np.empty(CHUNK, np.float32)
    neg = np.empty(CHUNK, np.float32)
    wpos = np.empty(CHUNK, np.float32)
    wneg = np.empty(CHUNK, np.float32)
    theta = np.empty(CHUNK, np.float32)
    zero = np.float32(0.0)
    bad = 0
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        for k in range(size):
            theta[k] = _load(base, start + k, fb)
            # -0.0 + d == d for every d: the first expert's term is taken exactly (torch's path copies it).
            pos[k] = zero if consensus else np.float32(-0.0)
            neg[k] = zero
            wpos[k] = zero
            wneg[k] = zero
        for i in range(len(experts)):
            expert = experts[i]
            mode = modes[i]
            w = weights[i]
            for k in range(size):
                j = start + k
                t = _load(expert, j, fe) - theta[k]
                a = _f32_as_bits(t) & np.uint32(ABS_MASK)
                bad += a >= np.uint32(NONFINITE)
                if mode == MODE_DENSE:
                    d = t * w
                else:
                    if mode == MODE_RANK:
                        keep = _kept(a, j, bounds[i])
                    else:
                        keep = uniform24(keys[i], j) < probs[i]
                    m = t * np.float32(keep)
                    m = m / scales[i] if divide[i] else m * scales[i]
                    d = m * w
                if consensus:
                    pos[k] += max(d, zero)
                    neg[k] += min(d, zero)
                    wpos[k] += w if d > zero else zero
                    wneg[k] += w if d < zero else zero
                else:
                    pos[k] += d
        for k in range(size):
            if consensus:
                if pos[k] + neg[k] >= zero:
                    mixed, total = pos[k], wpos[k]
                else:
                    mixed, total = neg[k], wneg[k]
                if normalize:
                    mixed = mixed / (total if total != zero else np.float32(1.0))
            else:
                mixed = pos[k] / div if normalize else pos[k]
            out[start + k] = mixed * lam if apply_lambda else mixed
    return bad


# ----------------------------------------------------------------------------------------- Python side


def uniform(key: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The float32 uniforms `uniform24(key, j)` for flat indices j, shaped: the masks' random draw."""
    out = np.empty(int(np.prod(shape, dtype=np.int64)), np.float32)
    _fill_uniform(np.uint64(key), out)
    return torch.from_numpy(out).view(tuple(shape))


def flat_bits(t: torch.Tensor) -> tuple[np.ndarray, int] | None:
    """A flat view of a stored tensor's bits (uint16 for bf16/f16, uint32 for f32) and its format; None for
    other dtypes. No copy for contiguous tensors (memory-mapped ones stay in the page cache)."""
    fmt = STORAGE_FORMATS.get(t.dtype)
    if fmt is None:
        return None
    flat = t.detach().reshape(-1)
    if fmt == FMT_F32:
        return flat.view(torch.int32).numpy().view(np.uint32), fmt
    return flat.view(torch.int16).numpy().view(np.uint16), fmt


FLIP_SMALLEST = ABS_MASK


def _select_bucket(counts: np.ndarray, count: int) -> tuple[int, int]:
    """The bucket holding the count-th largest key, and how many entries to take from it."""
    at_or_above = np.cumsum(counts[::-1])[::-1]
    bucket = int(np.flatnonzero(at_or_above >= count)[-1])
    return bucket, count - int(at_or_above[bucket] - counts[bucket])


def rank_bounds(base: tuple[np.ndarray, int], expert: tuple[np.ndarray, int],
                sets: list[tuple[int, bool]]) -> np.ndarray:
    """Boundaries (flip, threshold, cutoff) of up to two rank sets of |tau| = |expert - base|: each set is
    (count, largest) = the `count` largest (or smallest) entries, lower flat index first at equal values
    (the first `count` of a stable sort). Returns 6 int64: the first set, then the second (or EMPTY)."""
    (b, fb), (e, fe) = base, expert
    n = b.size
    hist = np.zeros(1 << 15, np.int64)
    _abs_histogram(b, fb, e, fe, hist)
    resolved: list[tuple[int, int, int] | None] = []
    pending = []  # (set index, flip, bucket in key space, bucket in |tau| space, to take)
    for s, (count, largest) in enumerate(sets):
        flip = 0 if largest else FLIP_SMALLEST
        if count <= 0:
            resolved.append(EMPTY)
        elif count >= n:
            resolved.append((flip, 0, n))
        else:
            resolved.append(None)
            bucket, take = _select_bucket(hist if largest else hist[::-1], count)
            pending.append((s, flip, bucket, bucket if largest else 0x7FFF - bucket, take))
    if pending:
        buckets = sorted({p[3] for p in pending})
        sizes = np.array([hist[q] for q in buckets], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        lows = np.empty(int(offsets[-1]), np.int64)
        indices = np.empty(int(offsets[-1]), np.int64)
        _collect_buckets(b, fb, e, fe, np.array(buckets, np.int64), offsets[:-1].copy(), lows, indices)
        for s, flip, bucket, bucket_abs, take in pending:
            q = buckets.index(bucket_abs)
            low = lows[offsets[q]:offsets[q + 1]]
            low_key = low if flip == 0 else 0xFFFF - low
            sub, take = _select_bucket(np.bincount(low_key, minlength=1 << 16), take)
            ties = indices[offsets[q]:offsets[q + 1]][low_key == sub]
            resolved[s] = (flip, (bucket << 16) | sub, int(ties[take - 1]) + 1)
    while len(resolved) < 2:
        resolved.append(EMPTY)
    return np.array([*resolved[0], *resolved[1]], np.int64)
