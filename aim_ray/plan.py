"""Planning: which layer each tensor belongs to, and contiguous layer ranges balanced by bytes.

The unit of placement is a *block*: the embeddings (block 0), each decoder layer (blocks 1..L) and the head
(final norm + lm_head, block L+1). Workers own contiguous runs of blocks, so a pipeline stage can run its
layers on hidden states handed over by the previous stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .architectures import is_head, layer_index
from .errors import CheckpointError


def block_of(name: str, n_layers: int) -> int:
    """0 for embeddings (and multimodal front ends, and any other tensor outside the layers), 1 + i for decoder
    layer i, n_layers + 1 for the final norm and the output head. Names are matched by pattern
    (`architectures`), so any family that numbers its layers `layers.N`, `h.N`, `blocks.N`, ... plans."""
    layer = layer_index(name)
    if layer is not None:
        if layer >= n_layers:
            raise CheckpointError(f"tensor {name!r} names layer {layer}, but the config has {n_layers} "
                                  f"layers")
        return 1 + layer
    return n_layers + 1 if is_head(name) else 0


def ordered_names(names: Iterable[str], n_layers: int) -> list[str]:
    """Tensor names in block order (stable within a block): the canonical output order."""
    indexed = list(enumerate(names))
    return [n for _, n in sorted(indexed, key=lambda p: (block_of(p[1], n_layers), p[0]))]


@dataclass(frozen=True)
class LayerRange:
    """Blocks [start, end) owned by one worker; decoder layers [start-1, end-1) clipped to the model."""

    worker: int
    start: int
    end: int
    n_layers: int
    nbytes: int

    @property
    def has_embed(self) -> bool:
        return self.start == 0

    @property
    def has_head(self) -> bool:
        return self.end == self.n_layers + 2

    @property
    def layers(self) -> range:
        return range(max(self.start - 1, 0), min(self.end - 1, self.n_layers))

    def describe(self) -> str:
        parts = (["embed"] if self.has_embed else []) + (
            [f"layers {self.layers.start}-{self.layers.stop - 1}"] if len(self.layers) else []
        ) + (["head"] if self.has_head else [])
        return ", ".join(parts)


def block_bytes(sizes: Mapping[str, int], n_layers: int) -> list[int]:
    out = [0] * (n_layers + 2)
    for name, nbytes in sizes.items():
        out[block_of(name, n_layers)] += nbytes
    return out


def split_ranges(weights: Sequence[int], k: int) -> list[tuple[int, int]]:
    """Split a sequence into k contiguous non-empty parts minimising the largest part's sum (exact DP)."""
    n = len(weights)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} blocks into {k} ranges")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[j][i]: minimal max-part over the first i blocks in j parts; cut[j][i]: start of the last part.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                cost = max(best[j - 1][s], prefix[i] - prefix[s])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, s
    bounds, i = [], n
    for j in range(k, 0, -1):
        bounds.append((cut[j][i], i))
        i = cut[j][i]
    return bounds[::-1]


def plan_ranges(sizes: Mapping[str, int], n_layers: int, k: int) -> list[LayerRange]:
    """K contiguous block ranges balanced by bytes (embeddings in the first, head in the last)."""
    per_block = block_bytes(sizes, n_layers)
    if k > len(per_block):
        raise CheckpointError(f"--workers {k} is more than the model's {len(per_block)} blocks "
                              f"({n_layers} layers + embeddings + head)")
    return [LayerRange(w, a, b, n_layers, sum(per_block[a:b])) for w, (a, b) in
            enumerate(split_ranges(per_block, k))]


# ------------------------------------------------------------------------------------ distributed plan


def assign_shards(shard_bytes: Sequence[int], k: int) -> list[range]:
    """Contiguous runs of shard indices for k workers, balanced by bytes. Workers beyond the number of
    shards get an empty run (the shard plan never depends on k, so neither do the output files)."""
    if k < 1:
        raise ValueError(f"need at least one worker, got {k}")
    n = len(shard_bytes)
    if n == 0:
        return [range(0) for _ in range(k)]
    parts = [range(a, b) for a, b in split_ranges(shard_bytes, min(k, n))]
    return parts + [range(n, n) for _ in range(k - len(parts))]


def calibration_memory(weight_bytes: int, tokens: int, hidden: int, intermediate: int, vocab: int,
                       has_head: bool, act_bytes: int = 4) -> int:
    """Rough peak bytes of one calibration stage: its weights, one micro-batch's activations (residual,
    attention and MLP intermediates; SDPA keeps no T x T matrix) and, for the last stage, float32 logits."""
    activations = tokens * (6 * hidden + 3 * intermediate) * act_bytes
    return weight_bytes + activations + (tokens * vocab * 4 if has_head else 0)


def merge_memory(largest_numel: int, buffers: int = 6) -> int:
    """Rough peak heap of merging one tensor: a few float32 buffers (base, delta accumulators, the current
    task vector, a mask, the relaxed result). Inputs are memory-mapped; N does not count."""
    return largest_numel * 4 * buffers


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker owns: a layer range (calibration stage) and a run of output shards (merge)."""

    range: LayerRange
    shards: range
    shard_bytes: int
    calib_bytes: int
    merge_bytes: int


@dataclass(frozen=True)
class ServicePlan:
    workers: list[WorkerPlan]
    n_shards: int
    total_bytes: int
    placement: str
    bundle: Mapping[str, float]

    def describe(self) -> str:
        """A printable table: one row per worker (sizes in decimal units)."""
        lines = [f"{len(self.workers)} worker(s), placement {self.placement}, one bundle each "
                 f"{dict(self.bundle)}; {self.n_shards} output shard(s), {_gb(self.total_bytes)} in total",
                 "| worker | blocks | owns | weights | calib memory | shards | shard size | merge memory |",
                 "|---|---|---|---|---|---|---|---|"]
        for w in self.workers:
            shards = f"{w.shards.start + 1}-{w.shards.stop}" if len(w.shards) else "-"
            calib = _gb(w.calib_bytes) if w.calib_bytes else "-"
            lines.append(f"| {w.range.worker} | [{w.range.start}, {w.range.end}) | {w.range.describe()} | "
                         f"{_gb(w.range.nbytes)} | {calib} | {shards} | {_gb(w.shard_bytes)} | "
                         f"{_gb(w.merge_bytes)} |")
        idle = sum(1 for w in self.workers if not len(w.shards))
        if idle:
            lines.append(f"note: {idle} worker(s) get no shard; a lower --shard-size gives more merge "
                         f"parallelism")
        return "\n".join(lines)


def _gb(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"
