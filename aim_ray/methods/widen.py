"""widen (Yu et al. 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained LLMs via Weight
Disentanglement", https://arxiv.org/abs/2408.03092), following the authors' MergeLM implementation.

2-D weights, per input column j (an `embed_tokens` tensor is transposed: each token row is a column):
  magnitude m = ||W[:, j]||_2; per expert i: magnitude difference |m_i - m_pre| and direction difference
  1 - cos(W_i[:, j], W_pre[:, j]) (torch.cosine_similarity; a zero column has cos 0);
  within each expert, rank the differences over columns (stable ascending argsort), significance =
  rank / n_columns; score = softmax over experts (dim 0) of the significance, but columns whose significance
  exceeds mean_over_columns * above_average_value_ratio get score = score_calibration_value;
  weight = 0.5 * (magnitude score + direction score); delta[:, j] = sum_i weight_i[j] * tau_i[:, j].
Other tensors (1-D norms and biases; anything not 2-D, flattened): the same scoring elementwise, with
|tau_i| ranked within each expert as the significance.

Streaming: pass 1 reads each expert once for the per-column statistics ([N, n_columns]: small); pass 2
accumulates the score-weighted task vectors. Elementwise tensors keep [N, numel] statistics, which is small
for the 1-D tensors of an LLM.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register


def significance(diffs: torch.Tensor) -> torch.Tensor:
    """[N, C] differences -> rank / C within each row (stable ascending sort)."""
    n_cols = diffs.shape[1]
    order = torch.argsort(diffs, dim=1, stable=True)
    ranks = torch.arange(n_cols, dtype=torch.float32, device=diffs.device).div_(n_cols).expand_as(diffs)
    return torch.empty_like(diffs).scatter_(1, order, ranks)


def importance(sig: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Softmax over experts; entries above ratio * their expert's mean significance get `calibration`."""
    scores = torch.softmax(sig, dim=0)
    above = sig > sig.mean(dim=1, keepdim=True) * ratio
    return scores.masked_fill_(above, calibration)


def widen_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    ratio = float(params.shared["above_average_value_ratio"])
    calibration = float(params.shared["score_calibration_value"])
    base = inputs.base()
    if base.dim() != 2:
        return _widen_elementwise(inputs, ratio, calibration)
    col_dim = 1 if "embed_tokens" in inputs.name else 0  # the dim reduced over to get one value per column
    base_mag = torch.linalg.vector_norm(base, dim=col_dim)
    mag_diff, dir_diff = [], []
    for i in range(inputs.n_experts):
        expert = inputs.expert(i)
        mag_diff.append((torch.linalg.vector_norm(expert, dim=col_dim) - base_mag).abs_())
        dir_diff.append(1.0 - torch.cosine_similarity(expert, base, dim=col_dim))
        del expert
    del base
    scores = 0.5 * (importance(significance(torch.stack(mag_diff)), ratio, calibration)
                    + importance(significance(torch.stack(dir_diff)), ratio, calibration))
    delta = None
    for i in range(inputs.n_experts):
        weighted = inputs.task_vector(i).mul_(scores[i].unsqueeze(col_dim))
        delta = weighted if delta is None else delta.add_(weighted)
        del weighted
    return delta


def _widen_elementwise(inputs: TensorInputs, ratio: float, calibration: float) -> torch.Tensor:
    diffs = torch.stack([inputs.task_vector(i).reshape(-1).abs_() for i in range(inputs.n_experts)])
    scores = importance(significance(diffs), ratio, calibration)
    del diffs
    delta = None
    for i in range(inputs.n_experts):
        tau = inputs.task_vector(i)
        weighted = tau.mul_(scores[i].view(tau.shape))
        delta = weighted if delta is None else delta.add_(weighted)
        del tau, weighted
    return delta


register(MergeMethod(
    name="widen",
    mergekit=False,
    fn=widen_merge,
    params=(
        ParamSpec("above_average_value_ratio", per_expert=False, default=1.0),
        ParamSpec("score_calibration_value", per_expert=False, default=1.0),
    ),
    reference="https://arxiv.org/abs/2408.03092",
    doc="weight disentanglement: per-column magnitude/direction changes, ranked and softmaxed over experts",
))
