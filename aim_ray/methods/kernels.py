"""Fused CPU kernels (numba) for the generalized task-arithmetic family: the fast path of `gta_merge`.

The plain torch path of `task_arithmetic.py` makes ~20 passes over full-size float32 buffers per expert
(convert, subtract, abs, compare, mask, scale, clamp, accumulate...). These kernels read each input tensor in
its stored dtype (bf16 / f16 / f32 bits, memory-mapped) and compute tau = expert - base on the fly:

- rank trimming (TIES `magnitude`, breadcrumbs `magnitude_outliers`) finds each expert's boundary keys
  with a two-level radix select on the bits of |tau|: one pass histograms the high 16 bits, a second collects
  the low bits and positions of the few entries in the boundaries' buckets. Where a boundary splits a group
  of equal |tau|, `stdsort` replays MergeKit's (torch's CPU) sort around it and a bitset marks the kept
  entries of the boundary groups, exactly as `sparsify.sorted_range_mask` does. The combine pass gets that
  bitset compact: one bit per boundary-group entry, in position order (on bf16 inputs 1-3% of the entries
  tie at a boundary), so what each expert holds until the combine is O(ties / 8) bytes, not O(n / 8);
- random trimming (DARE) draws its mask from a counter-based generator (`uniform24`), so a second pass
  redraws the same mask without storing it, and any slice of a tensor can be drawn independently;
- one combine pass walks the tensor in cache-sized chunks, streams over the experts and accumulates the
  (sign-consensus) sums in the chunk, so no full-size buffer but the output is ever written.

Element arithmetic is the torch path's, operation for operation in float32, so the results are bit-identical
to it, except the L1/L2 rescale sums, which are accumulated sequentially in float64 here (torch sums float32
in blocks): a relative difference of ~1e-7 in one scale factor per expert and tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import stdsort

MODE_DENSE, MODE_RANK, MODE_RANDOM = 0, 1, 2
NORM_L1, NORM_L2, NORM_LINF = 1, 2, 3

ABS_MASK = 0x7FFFFFFF
NONFINITE = 0x7F800000  # |tau| bits at or above this: Inf or NaN
# A rank set (lower, upper, all_edges): entry j with |tau| bits a is kept iff lower < a < upper, or a is
# lower or upper (an edge entry) and (all_edges or the expert's edge bitset marks it). The kernels read the
# compact bitset: bit c for the c-th edge entry in position order (see `rank_bounds`). EMPTY keeps nothing,
# ALL all.
EMPTY = (-1, -1, 1)
ALL = (-1, 1 << 32, 1)
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


@intrinsic
def _as_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@njit(inline="always")
def _like(base, address):
    """The array at `address` with base's shape and dtype. The experts reach the kernels as an array of
    addresses: a numba typed List of arrays costs ~0.4 s of compilation in every new process."""
    return carray(_as_pointer(address), base.shape, base.dtype)


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


def _decode(x):
    """Stored bits -> float32. The storage format is the bits' type (see `flat_bits`), so the dispatch
    happens once at compile time: uint16 = bf16, int16 = f16, uint32 = f32."""


def _decode_bf16(x):
    return _bits_as_f32(np.uint32(x) << np.uint32(16))


def _decode_f16(x):
    return _bits_as_f32(_half_bits(np.uint32(np.uint16(x))))


def _decode_f32(x):
    return _bits_as_f32(x)


@overload(_decode)
def _decode_overload(x):
    return {types.uint16: _decode_bf16, types.int16: _decode_f16, types.uint32: _decode_f32}.get(x)


@njit(inline="always")
def _tau_bits(base, expert, j):
    """(tau_j, |tau_j| float bits)."""
    t = _decode(expert[j]) - _decode(base[j])
    return t, _f32_as_bits(t) & np.uint32(ABS_MASK)


@njit(inline="always")
def uniform24(key, j):
    """Uniform float32 in [0, 1) on a 2**-24 grid: output j of SplitMix64 seeded with `key`, top 24 bits."""
    z = np.uint64(key) + (np.uint64(j) + np.uint64(1)) * np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float32(z >> np.uint64(40)) * np.float32(5.9604645e-08)


@njit(inline="always")
def _bit(bits, c):
    return (bits[c >> 3] >> (c & 7)) & 1


# ------------------------------------------------------------------------------------------- the kernels


@njit(nogil=True, cache=True)
def _fill_uniform(key, out):
    for j in range(out.size):
        out[j] = uniform24(key, j)


@njit(nogil=True, cache=True)
def _abs_histogram(base, expert, hist):
    """hist[b] = number of entries whose |tau| float bits have b as their high 16 bits."""
    for j in range(base.size):
        hist[_tau_bits(base, expert, j)[1] >> np.uint32(16)] += 1


@njit(nogil=True, cache=True)
def _collect_buckets(base, expert, first, second, cursors, lows, where):
    """The low 16 bits and the positions of the entries in the high-16-bit buckets `first` and `second` (-1:
    none), into lows and where from cursors[0] (first) and cursors[1] (second) on."""
    low_mask = np.uint32(0xFFFF)
    for j in range(base.size):
        a = _tau_bits(base, expert, j)[1]
        high = np.int64(a >> np.uint32(16))
        if high == first:
            lows[cursors[0]] = a & low_mask
            where[cursors[0]] = j
            cursors[0] += 1
        elif high == second:
            lows[cursors[1]] = a & low_mask
            where[cursors[1]] = j
            cursors[1] += 1


@njit(nogil=True, cache=True)
def _kept_norms(base, expert, mode, bounds, bits, key, prob, norm):
    """(norm of tau, norm of the kept entries), accumulated in float64, for rescaling."""
    before = 0.0
    after = 0.0
    lower, upper, all_edges = bounds[0], bounds[1], bounds[2] != 0
    c = 0  # edge entries so far: the index into the compact bitset
    for j in range(base.size):
        t, a = _tau_bits(base, expert, j)
        if mode == MODE_RANDOM:
            keep = uniform24(key, j) < prob
        else:
            a = np.int64(a)
            if a == lower or a == upper:  # an edge entry: its bit is read only here
                keep = all_edges or _bit(bits, c) != 0
                c += 1
            else:
                keep = lower < a < upper
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
def _combine(base, experts, modes, bounds, bits, offsets, keys, probs, scales, divide, weights, consensus, normalize,
             div, lam, apply_lambda, out):
    """delta = lambda * normalize(sum_i w_i * rescale(mask_i * tau_i)), with sign consensus or not, chunk by
    chunk. `experts`: the addresses of the experts' arrays (same shape and dtype as base). Returns the number
    of non-finite tau entries met (Inf/NaN inputs, or an overflow). `bits`: the experts' compact edge bitsets
    one after the other, expert i's from byte offsets[i] (see `pack_bitsets`).

    Every branch on the mode or an option sits outside the element loops, which stay simple enough for
    LLVM to vectorize."""
    n = base.size
    pos = np.empty(CHUNK, np.float32)
    neg = np.empty(CHUNK, np.float32)
    wpos = np.empty(CHUNK, np.float32)
    wneg = np.empty(CHUNK, np.float32)
    signed = np.empty(CHUNK, np.float32)  # sum_i D_i in expert order: the majority sign, as MergeKit's sum
    theta = np.empty(CHUNK, np.float32)
    d = np.empty(CHUNK, np.float32)
    flag = np.empty(CHUNK, np.uint8)  # a chunk's edge entries (|tau| equal to a bound)
    cursors = np.zeros(experts.size, np.int64)  # each expert's edge entries before the chunk
    zero = np.float32(0.0)
    bad = 0
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        # -0.0 + x == x for every x: the first expert's term is taken exactly (torch's path copies it).
        first = zero if consensus else np.float32(-0.0)
        chunk = base[start:start + size]
        for k in range(size):
            theta[k] = _decode(chunk[k])
            pos[k] = first
            neg[k] = zero
            wpos[k] = zero
            wneg[k] = zero
            signed[k] = zero
        for i in range(experts.size):
            chunk = _like(base, experts[i])[start:start + size]  # a slice indexed from 0: see _apply_delta
            bad += _contribution(chunk, theta, start, size, modes[i], bounds[i], bits, offsets[i], cursors, i, flag,
                                 keys[i], probs[i], scales[i], divide[i], weights[i], d)
            w = weights[i]
            if consensus:
                for k in range(size):
                    x = d[k]
                    signed[k] += x
                    pos[k] += max(x, zero)
                    neg[k] += min(x, zero)
                    wpos[k] += w if x > zero else zero
                    wneg[k] += w if x < zero else zero
            else:
                for k in range(size):
                    pos[k] += d[k]
        if consensus:
            for k in range(size):
                positive = signed[k] >= zero
                mixed = pos[k] if positive else neg[k]
                if normalize:
                    total = wpos[k] if positive else wneg[k]
                    mixed = mixed / (total if total != zero else np.float32(1.0))
                out[start + k] = mixed * lam if apply_lambda else mixed
        else:
            for k in range(size):
                mixed = pos[k] / div if normalize else pos[k]
                out[start + k] = mixed * lam if apply_lambda else mixed
    return bad


@njit(inline="always")
def _contribution(expert, theta, start, size, mode, bounds, bits, offset, cursors, i, flag, key, prob, scale, divide,
                  weight, d):
    """d[:size] = weight * rescale(mask * tau) of expert i over the chunk `expert` (entries start.. of the
    tensor); returns its non-finite count. Its compact edge bits start at bits[offset], cursors[i] of them
    belong to the chunks before."""
    bad = 0
    if mode == MODE_DENSE:
        for k in range(size):
            t = _decode(expert[k]) - theta[k]
            bad += (_f32_as_bits(t) & np.uint32(ABS_MASK)) >= np.uint32(NONFINITE)
            d[k] = t
    elif mode == MODE_RANK:
        # All entries equal to the bounds kept: one branch-free loop (LLVM vectorizes it). Else a vectorized
        # loop keeps those strictly inside and flags the edge entries, and a short one walks their bits.
        lower, upper = np.int64(bounds[0]), np.int64(bounds[1])
        if bounds[2] != 0:
            for k in range(size):
                t = _decode(expert[k]) - theta[k]
                a = np.int64(_f32_as_bits(t) & np.uint32(ABS_MASK))
                bad += a >= NONFINITE
                d[k] = t * np.float32((a >= lower) & (a <= upper))
        else:
            for k in range(size):
                t = _decode(expert[k]) - theta[k]
                a = np.int64(_f32_as_bits(t) & np.uint32(ABS_MASK))
                bad += a >= NONFINITE
                flag[k] = (a == lower) | (a == upper)
                d[k] = t * np.float32((a > lower) & (a < upper))
            c = offset * 8 + cursors[i]
            for k in range(size):  # the few edge entries (a predictable branch): those their bit keeps
                if flag[k]:
                    if _bit(bits, c):
                        d[k] = (_decode(expert[k]) - theta[k]) * np.float32(1.0)
                    c += 1
            cursors[i] = c - offset * 8
    else:
        for k in range(size):
            t = _decode(expert[k]) - theta[k]
            bad += (_f32_as_bits(t) & np.uint32(ABS_MASK)) >= np.uint32(NONFINITE)
            d[k] = t * np.float32(uniform24(key, start + k) < prob)
    if divide:
        for k in range(size):
            d[k] = d[k] / scale
    elif scale != np.float32(1.0):
        for k in range(size):
            d[k] = d[k] * scale
    for k in range(size):
        d[k] = d[k] * weight
    return bad


def _store(out, j, value):
    """Write a float32 into an output array: float32 as is, uint16 as bf16 (torch's rounding)."""


def _store_bf16(out, j, value):
    """Round to nearest, ties to even, as c10::BFloat16 (NaN -> 0x7FC0); branch-free, so it vectorizes."""
    bits = _f32_as_bits(value)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(ABS_MASK)) > np.uint32(NONFINITE)
    out[j] = np.uint16(np.uint32(0x7FC0) if nan else rounded)


def _store_f32(out, j, value):
    out[j] = value


@overload(_store)
def _store_overload(out, j, value):
    return {types.uint16: _store_bf16, types.float32: _store_f32}.get(out.dtype)


@njit(nogil=True, cache=True)
def _apply_delta(base, delta, factor, period, out):
    """out = theta_pre + delta (period 0) or theta_pre + factor[j % period] * delta, in out's format. Returns
    the number of non-finite base entries."""
    bad = 0
    if period == 0:
        for j in range(base.size):
            theta = _decode(base[j])
            bad += (_f32_as_bits(theta) & np.uint32(ABS_MASK)) >= np.uint32(NONFINITE)
            _store(out, j, theta + delta[j])
    else:
        for row in range(base.size // period):
            # Row slices index from 0: numba then needs no negative-index fix-up and LLVM vectorizes (10x).
            start = row * period
            b, d, o = base[start:start + period], delta[start:start + period], out[start:start + period]
            for c in range(period):
                theta = _decode(b[c])
                bad += (_f32_as_bits(theta) & np.uint32(ABS_MASK)) >= np.uint32(NONFINITE)
                _store(o, c, theta + factor[c] * d[c])
    return bad


# ----------------------------------------------------------------------------------------- Python side


def uniform(key: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The float32 uniforms `uniform24(key, j)` for flat indices j, shaped: the masks' random draw."""
    out = np.empty(int(np.prod(shape, dtype=np.int64)), np.float32)
    _fill_uniform(np.uint64(key), out)
    return torch.from_numpy(out).view(tuple(shape))


_BITS = {torch.float32: (torch.int32, np.uint32), torch.bfloat16: (torch.int16, np.uint16),
         torch.float16: (torch.int16, np.int16)}  # the kernels' `_decode` tells the formats apart by type


def flat_bits(t: torch.Tensor) -> np.ndarray | None:
    """A flat view of a stored tensor's bits, typed by format (bf16: uint16, f16: int16, f32: uint32); None
    for other dtypes. No copy for contiguous tensors (memory-mapped ones stay in the page cache)."""
    if t.dtype not in _BITS:
        return None
    same_width, bits = _BITS[t.dtype]
    return t.detach().reshape(-1).view(same_width).numpy().view(bits)


FLIP_SMALLEST = ABS_MASK


def select_bucket(counts: np.ndarray, count: int) -> tuple[int, int]:
    """The bucket holding the count-th largest key (counts[b]: keys in bucket b, larger b = larger keys),
    and how many entries to take from it. Serves the torch path's `sparsify.kth_largest` too."""
    at_or_above = np.cumsum(counts[::-1])[::-1]
    bucket = int(np.flatnonzero(at_or_above >= count)[-1])
    return bucket, count - int(at_or_above[bucket] - counts[bucket])


@njit(nogil=True, cache=True)
def _pack_abs(base, expert, descending, out):
    """The packed `stdsort` entries of |tau|."""
    for j in range(base.size):
        out[j] = stdsort.entry(_tau_bits(base, expert, j)[1], j, descending)


def rank_bounds(base: np.ndarray, expert: np.ndarray, lo: int, hi: int, descending: bool, compact: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The rank set (see EMPTY) of the entries at positions [lo, hi) of torch's CPU argsort of |tau| =
    |expert - base| (descending or not), as 3 int64, and the edge bitset when one is needed (else None): bit j
    for entry j, or with `compact` what the kernels read, bit c for the c-th edge entry in position order."""
    n = base.size
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo or (lo == 0 and hi == n):
        return np.array(EMPTY if hi <= lo else ALL, np.int64), None
    hist = np.zeros(1 << 15, np.int64)
    _abs_histogram(base, expert, hist)
    keys, positions = _rank_keys(base, expert, hist, [hi, lo + 1], descending)
    (last, take, group), (first, before, _) = keys
    bounds = np.array([min(first, last), max(first, last), 1], np.int64)
    if take == group and before == 1:
        return bounds, None  # neither boundary splits a group of equal |tau|
    bounds[2] = 0
    v = np.empty(n, np.int64)
    _pack_abs(base, expert, descending, v)
    bits = np.zeros((n + 7) // 8, np.uint8)
    stdsort.mark(stdsort.replay(v, lo, hi), lo, hi, first, last, descending, bits)
    del v
    if not compact:
        return bounds, bits
    edges = positions(first, last)  # the edge entries, from the bucket pass: no pass over the tensor
    return bounds, np.packbits((bits[edges >> 3] >> (edges & 7)) & 1, bitorder="little")


def pack_bitsets(bitsets: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """The experts' compact edge bitsets (None: none needed) one after the other, and the byte offset of each:
    `_combine`'s bits and offsets."""
    sizes = np.array([0 if b is None else b.size for b in bitsets], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    out = np.zeros(int(sizes.sum()), np.uint8)
    for b, o in zip(bitsets, offsets, strict=True):
        if b is not None:
            out[o:o + b.size] = b
    return out, offsets


def _rank_keys(base: np.ndarray, expert: np.ndarray, hist: np.ndarray, ranks: list[int], descending: bool
               ) -> tuple[list[tuple[int, int, int]], Callable[[int, int], np.ndarray]]:
    """For each rank r (1 <= r <= n) in sort order: (|tau| bits of the r-th entry, how many entries of that
    value the first r hold, how many entries have that value); and `positions(x, y)`: the positions, in
    ascending order, of the entries whose |tau| bits are x or y, two of those values."""
    flip = 0 if descending else FLIP_SMALLEST
    found = [select_bucket(hist if descending else hist[::-1], r) for r in ranks]
    buckets = sorted({b if descending else 0x7FFF - b for b, _ in found}) + [-1]
    sizes = [int(hist[b]) if b >= 0 else 0 for b in buckets[:2]]
    offsets = np.array([0, sizes[0], sizes[0] + sizes[1]], np.int64)
    lows = np.empty(int(offsets[-1]), np.int64)
    where = np.empty(int(offsets[-1]), np.int64)
    _collect_buckets(base, expert, buckets[0], buckets[1], offsets[:2].copy(), lows, where)
    out = []
    for bucket, take in found:
        q = buckets.index(bucket if descending else 0x7FFF - bucket)
        low = lows[offsets[q]:offsets[q + 1]]
        counts = np.bincount(low if descending else 0xFFFF - low, minlength=1 << 16)
        sub, take = select_bucket(counts, take)
        out.append((((bucket << 16) | sub) ^ flip, take, int(counts[sub])))

    def positions(x: int, y: int) -> np.ndarray:
        parts = []
        for q, bucket in enumerate(buckets[:2]):
            if bucket >= 0:
                bits = (bucket << 16) | lows[offsets[q]:offsets[q + 1]]
                parts.append(where[offsets[q]:offsets[q + 1]][(bits == x) | (bits == y)])
        return np.sort(np.concatenate(parts), kind="stable")  # two ascending runs: one merge

    return out, positions


_OUT = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.float32, np.float32)}


def apply_delta(base: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor | None, out_dtype: torch.dtype
                ) -> tuple[torch.Tensor, int] | None:
    """(theta_pre + delta or theta_pre + factor * delta in out_dtype, count of non-finite base entries) from
    the stored base, in one pass; bit-identical to torch's `(base.float() + factor * delta).to(out_dtype)`
    for finite values. `factor`: per column (the last dimension) or per element. None when it does not
    apply (another dtype)."""
    bits = flat_bits(base)
    if bits is None or out_dtype not in _OUT or delta.dtype != torch.float32 or delta.shape != base.shape:
        return None
    out_torch, out_np = _OUT[out_dtype]
    out = torch.empty(base.shape, dtype=out_torch)
    flat_delta = delta.reshape(-1).numpy()
    if factor is None:
        f, period = np.ones(1, np.float32), 0
    else:
        f = factor.to(torch.float32).reshape(-1).contiguous().numpy()
        period = f.size  # per column: the last dimension; per element: the whole tensor (one row)
    bad = _apply_delta(bits, flat_delta, f, period, out.reshape(-1).numpy().view(out_np))
    return out.view(out_dtype), int(bad)
