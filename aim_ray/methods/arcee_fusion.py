"""arcee_fusion (MergeKit semantics): keep the expert's changes only where they matter most, by an outlier
threshold on an importance score. Base a, one expert b, per element:

    kl = sum_row p log(p / q),  p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8   (softmax over the last
         dimension: one KL divergence per row; a 1-D tensor is one row)
    importance = |b - a| * kl(row)
    threshold = median + 1.5 * (q3 - q1) of the importance (Tukey's upper fence),
    delta = (b - a) where importance >= threshold, else 0.

Quartiles, as MergeKit: sort the importance and take the entries at floor(q (n - 1)), q = 0.25, 0.5, 0.75
(float32 product). Past 1M elements MergeKit sorts a sample of 1M entries drawn uniformly with replacement
from torch's global generator; here the sample is drawn by a torch.Generator seeded from (seed, tensor)
(`mask_key`), so a merge is reproducible: the fence is an estimate either way, the same one given the same
sample. Base required, exactly one expert.

Memory: a, b, the importance, and softmax scratch for about 1M elements at a time (rows in chunks); the sort
sees at most 1M entries.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, TensorInputs, register

SOFTMAX_EPS = 1e-8
SAMPLE_SIZE = 1_000_000  # MergeKit's quantile sample
FENCE = 1.5
_CHUNK = 1 << 20


def arcee_fusion_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    base, expert = inputs.base(), inputs.expert(0)
    kl = row_kl(expert, base)
    delta = expert.sub_(base)
    del base
    importance = delta.abs().mul_(kl)
    keep = importance >= fence(importance, inputs.mask_key(0))
    del importance
    return delta.mul_(keep)


def row_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) + eps || softmax(q) + eps) per row of the last dimension, keepdim, float32; rows in
    chunks of about 1M elements (softmax is per row, so the chunks do not change a bit)."""
    if p_logits.dim() < 2:
        return _kl(p_logits, q_logits)
    rows = max(1, _CHUNK // max(1, p_logits.shape[-1]))
    return torch.cat([_kl(p, q) for p, q in zip(p_logits.split(rows), q_logits.split(rows), strict=True)])


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(p_logits, dim=-1).add_(SOFTMAX_EPS)
    q = torch.softmax(q_logits, dim=-1).add_(SOFTMAX_EPS)
    return (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def fence(importance: torch.Tensor, key: int) -> torch.Tensor:
    """median + 1.5 IQR of the importance (of a 1M sample drawn with `key` past 1M elements), float32 0-d."""
    flat = importance.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        generator = torch.Generator().manual_seed(key)
        flat = flat[torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator)]
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()
    q1, median, q3 = torch.sort(flat).values[ranks]
    return median + FENCE * (q3 - q1)


register(MergeMethod(
    name="arcee_fusion",
    fn=arcee_fusion_merge,
    params=(),
    min_experts=1,
    max_experts=1,
    reference="https://arcee.ai",
    doc="the expert's changes where |change| x the rows' softmax KL divergence is an upper outlier",
))
