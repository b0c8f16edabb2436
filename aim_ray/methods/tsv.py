"""tsv: Task Singular Vectors merge, TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task
Interference in Model Merging", https://arxiv.org/abs/2412.00081), as the authors' code computes it
(`compute_and_sum_svd_mem_reduction`: the orthogonalisation variant).

Per 2-D tensor (not an embedding, see `subspace`), with T experts and r = min(rows, cols):
    w_t tau_t = U_t S_t V_t^T (thin SVD); keep its top k = max(1, r // T) singular triplets
    U = [U_1k .. U_Tk], S = [S_1k .. S_Tk], V = [V_1k .. V_Tk]         (concatenated)
    delta = alpha * polar(U) diag(S) polar(V)^T                         (polar(A) = P Q^T of A = P S Q^T)
The authors take k = int(r * (1 / T)) (0 when T > r, dropping the matrix); r // T is the same floor without the
float rounding, and at least 1. Singular directions of w_t tau_t that are numerically zero are not kept
(`subspace.rank`), nor those of a rank-deficient concatenation (`subspace.polar`): the authors' code leaves
them to LAPACK's arbitrary basis completion. Other tensors: (alpha / T) sum_t w_t tau_t (the authors average
them). alpha: 1.0 by default (the paper's setting; the authors' scripts also search it in (0, 3] on
validation data). `weight` (default 1) scales expert t's task vector before the merge.

Memory: the method needs every task's singular vectors at once, so it cannot combine experts one by one, but
it streams them: each task vector is read once, decomposed, and only its k kept triplets stay (T k <= r
columns of U and rows of V in all: about two task vectors' worth, whatever T); never two task vectors at once.
SVDs in float32 (torch.linalg.svd, thin), on one thread (`subspace.one_thread`).
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register
from .subspace import (
    averaged,
    decomposed,
    one_thread,
    orthogonal_sum,
    streamed_sum,
    truncated_svd,
    weighted_task_vector,
)


def tsv_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n, alpha = inputs.n_experts, float(params.shared["alpha"])
    first = weighted_task_vector(inputs, params, 0)
    if not decomposed(inputs.name, first):
        return averaged(streamed_sum(inputs, params, first), n, alpha)
    shape = tuple(first.shape)
    k = max(1, min(shape) // n)
    us, ss, vhs = [], [], []
    with one_thread():
        for i in range(n):
            tau = first if i == 0 else weighted_task_vector(inputs, params, i)
            first = None
            u, s, vh = truncated_svd(tau, k)
            del tau
            us.append(u)
            ss.append(s)
            vhs.append(vh)
        delta = orthogonal_sum(us, torch.cat(ss), vhs, shape)
    return delta.mul_(alpha) if alpha != 1.0 else delta


ALPHA = ParamSpec("alpha", per_expert=False, default=1.0, low=0.0, low_open=True)
WEIGHT = ParamSpec("weight", per_expert=True, default=1.0)

register(MergeMethod(
    name="tsv",
    mergekit=False,
    fn=tsv_merge,
    params=(WEIGHT, ALPHA),
    reference="https://arxiv.org/abs/2412.00081",
    doc="TSV-M: each task's top 1/T singular vectors, concatenated and orthogonalised (polar), times alpha",
))
