"""Shared pieces of the SVD merges (tsv, iso_c, iso_cts): which tensors get an SVD, the task-arithmetic rule for
the others, numerical rank, the polar factor, and a fixed thread count for LAPACK.

Which tensors: every 2-D tensor except embeddings (`architectures.is_embedding`: token, position, patch
embeddings) is a linear map and gets the method's SVD merge. The authors' code (ViT image encoders) decomposes
every 2-D tensor but `text_projection` and averages everything else; a token embedding has no counterpart
there. An embedding is a lookup table, not a linear map: its rows are unrelated tokens, and re-orthogonalising
its singular vectors would spread one token's change over every row, moving the rows of tokens no expert
changed. So embeddings take the averaging rule (the LLM ports of Iso-C skip `embed_tokens` too); `lm_head`
is a linear map and is decomposed.

The averaging rule (the authors' rule for every non-matrix tensor, then scaled by alpha like everything else):
delta = (alpha / T) * sum_t w_t tau_t, summed in expert order in float32, `w_t` the per-model `weight`
(default 1: the authors' plain mean).

Numerical rank: the authors' code keeps singular directions whatever their singular value. Where a matrix is
rank-deficient those directions are whatever LAPACK completes the basis with, and Iso-C / Iso-CTS give them the
full (mean) singular value: the result would depend on the LAPACK build. Here a singular direction of a matrix
M (m x n) counts only when its singular value exceeds `max(m, n) * eps_float32 * |M|_F` (numpy's `matrix_rank`
rule, on the Frobenius norm); the others are dropped, i.e. count as singular value 0. The polar factor of a
rank-deficient concatenation is likewise the partial isometry over its nonzero singular values. Wherever the
authors' result is well defined (full rank), this is the same result.

Threads: MKL's SVD returns different bits on different thread counts (measured: 576 x 576 float32, 1 vs 2
threads), so the SVDs run on one thread (`one_thread`): the same bytes with any `--threads` / `--workers`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..architectures import is_embedding
from .base import MethodParams, TensorInputs

EPS = float(torch.finfo(torch.float32).eps)


def weighted_task_vector(inputs: TensorInputs, params: MethodParams, i: int) -> torch.Tensor:
    """w_i * tau_i, a fresh float32 tensor."""
    tau = inputs.task_vector(i)
    weight = float(params.expert(i, "weight"))
    return tau if weight == 1.0 else tau.mul_(weight)


def decomposed(name: str, tensor: torch.Tensor) -> bool:
    """Whether the SVD merge applies: a 2-D tensor that is not an embedding (see the module docstring)."""
    return tensor.dim() == 2 and not is_embedding(name)


def averaged(total: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """The rule for the other tensors, from total = sum_t w_t tau_t (in expert order): (alpha / T) total."""
    return total.mul_(alpha / n)


def streamed_sum(inputs: TensorInputs, params: MethodParams, first: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w_t tau_t in expert order; `first`: w_0 tau_0 when already read."""
    total = weighted_task_vector(inputs, params, 0) if first is None else first
    for i in range(1, inputs.n_experts):
        total.add_(weighted_task_vector(inputs, params, i))
    return total


def rank(singular_values: torch.Tensor, shape: tuple[int, ...], scale: float) -> int:
    """How many leading singular values (descending) of a matrix of `shape` count as nonzero, `scale` being
    the Frobenius norm of the matrix they describe."""
    tolerance = max(shape) * EPS * scale
    return int((singular_values > tolerance).sum())


def frobenius(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of a = P S Q^T (thin SVD), over the nonzero singular values only."""
    if a.numel() == 0:
        return torch.zeros_like(a)
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    keep = rank(s, tuple(a.shape), float(s[0]))
    return p[:, :keep] @ qh[:keep]


def truncated_svd(m: torch.Tensor, k: int, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top min(k, rank) singular triplets of m (u: [rows, k'], s: [k'], vh: [k', cols]), copied out of the
    full factors so that those can be freed. `scale`: the Frobenius norm the rank is judged against (m's
    own by default)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = min(k, rank(s, tuple(m.shape), frobenius(m) if scale is None else scale))
    return u[:, :keep].clone(), s[:keep].clone(), vh[:keep].clone()


def orthogonal_sum(us: list[torch.Tensor], s: torch.Tensor | float, vhs: list[torch.Tensor],
                   shape: tuple[int, ...]) -> torch.Tensor:
    """polar([U_1 .. U_T]) diag(s) polar([Vh_1; ..; Vh_T]): the concatenated singular vectors made orthonormal,
    with the concatenated singular values `s` (a tensor) or one value for all (a float). A zero matrix of
    `shape` when nothing is left. Flipping the sign of a (u, v) pair, or rotating the vectors of equal
    singular values, leaves the result unchanged (polar(A D) = polar(A) D for orthogonal D)."""
    u_cat, vh_cat = torch.cat(us, dim=1), torch.cat(vhs, dim=0)
    if u_cat.shape[1] == 0:
        return torch.zeros(shape, dtype=torch.float32)
    left, right = polar(u_cat), polar(vh_cat)
    if isinstance(s, torch.Tensor):
        return (left * s).matmul(right)
    return left.matmul(right).mul_(s)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch (MKL) on one thread meanwhile: LAPACK's bits depend on the thread count. The merge threads already
    run with one torch thread; a lone tensor (one merge thread) may not, and nothing else runs then."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
