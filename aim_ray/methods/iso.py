"""iso_c and iso_cts (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", https://arxiv.org/abs/2502.04959), as the authors' code (danielm1405/iso-merging,
`src/utils/iso.py`) computes them.

Per 2-D tensor (not an embedding, see `subspace`), with T experts, r = min(rows, cols) and
M = sum_t w_t tau_t = U S V^T (thin SVD):

iso_c:   delta = alpha * mean(S) U V^T       (the spectrum of the task-arithmetic sum made flat; mean over all r)

iso_cts: common subspace: the top c singular triplets of M, where c0 = int(r * common_space_fraction),
         c = r - round((r - c0) / T) * T (Python's round, as the authors'; one T less when that would exceed r),
         so that d = (r - c) / T directions are left for each task;
         task-specific: per task, R_t = w_t tau_t - U_c U_c^T w_t tau_t (its part outside the common column
         space), and R_t's top d singular triplets;
         U = [U_c, U_1d .. U_Td], V likewise, s = [S_c, S_1d .. S_Td] (r values in all);
         delta = alpha * mean(s) polar(U) polar(V)^T            (polar(A) = P Q^T of A = P S Q^T)

Singular directions that are numerically zero (of M, of each R_t judged against |w_t tau_t|_F, or of the
concatenations) are dropped and count as singular value 0 in the mean (`subspace.rank`): the authors' code
gives them the mean singular value, which for a rank-deficient M (low-rank experts, e.g. LoRA) adds LAPACK's
arbitrary completion of the basis at full weight. Other tensors: (alpha / T) sum_t w_t tau_t (the authors
average them). alpha: 1.0 by default; the authors choose it on validation data in (0, 3] (1.5 in the
FusionBench examples for CLIP ViTs). common_space_fraction: 0.8, the authors' default. `weight` (default 1)
scales expert t's task vector before the merge.

Memory: iso_c reads each expert once and keeps the running sum. iso_cts reads each expert twice (the sum, then
the residuals) and keeps the common triplets plus d per task (r columns of U and rows of V in all: about two
task vectors' worth, whatever T); never two task vectors at once. SVDs in float32 (torch.linalg.svd, thin),
on one thread (`subspace.one_thread`).
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register
from .subspace import (
    averaged,
    decomposed,
    frobenius,
    one_thread,
    orthogonal_sum,
    rank,
    streamed_sum,
    truncated_svd,
    weighted_task_vector,
)
from .tsv import ALPHA, WEIGHT


def iso_c_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n, alpha = inputs.n_experts, float(params.shared["alpha"])
    total = streamed_sum(inputs, params)
    if not decomposed(inputs.name, total):
        return averaged(total, n, alpha)
    shape = tuple(total.shape)
    with one_thread():
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = rank(s, shape, frobenius(total))
        del total
        iso = float(s[:keep].sum()) / min(shape)
        return u[:, :keep].matmul(vh[:keep]).mul_(alpha * iso)


def common_and_task_dims(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(c, d): the common subspace's size and each task's, c + n d = r (the authors' rounding)."""
    total = round((r - int(r * fraction)) / n) * n
    if total > r:
        total -= n
    return r - total, total // n


def iso_cts_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n, alpha = inputs.n_experts, float(params.shared["alpha"])
    total = streamed_sum(inputs, params)
    if not decomposed(inputs.name, total):
        return averaged(total, n, alpha)
    shape = tuple(total.shape)
    common, per_task = common_and_task_dims(min(shape), n, float(params.shared["common_space_fraction"]))
    with one_thread():
        u_c, s_c, vh_c = truncated_svd(total, common)
        del total
        us, ss, vhs = [u_c], [s_c], [vh_c]
        for i in range(n if per_task else 0):
            tau = weighted_task_vector(inputs, params, i)
            scale = frobenius(tau)
            tau.sub_(u_c.matmul(u_c.T.matmul(tau)))  # the part outside the common column space
            u, s, vh = truncated_svd(tau, per_task, scale)
            del tau
            us.append(u)
            ss.append(s)
            vhs.append(vh)
        iso = float(torch.cat(ss).sum()) / min(shape)
        delta = orthogonal_sum(us, alpha * iso, vhs, shape)
    return delta


register(MergeMethod(
    name="iso_c",
    mergekit=False,
    fn=iso_c_merge,
    params=(WEIGHT, ALPHA),
    reference="https://arxiv.org/abs/2502.04959",
    doc="Iso-C: the task-arithmetic sum with a flat (isotropic) singular spectrum, times alpha",
))

register(MergeMethod(
    name="iso_cts",
    mergekit=False,
    fn=iso_cts_merge,
    params=(WEIGHT, ALPHA, ParamSpec("common_space_fraction", per_expert=False, default=0.8, low=0.0, high=1.0,
                                     low_open=True, high_open=True)),
    reference="https://arxiv.org/abs/2502.04959",
    doc="Iso-CTS: Iso-C on the sum's top subspace plus each task's top directions outside it, orthogonalised",
))
