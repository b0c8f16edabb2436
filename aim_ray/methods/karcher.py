"""karcher (MergeKit semantics): the Karcher (Riemannian) mean of the models' directions on the unit sphere,
scaled by their mean norm. Each whole tensor is one vector x_i, taken as it is (not a task vector).

The inputs are every listed model, plus the base_model when the config names one (MergeKit's BasePolicy
IGNORED: the base is merged as one more model; `base_role="input"`), each with weight a_i = 1 / N.
n_i = |x_i|, u_i = x_i / n_i; models with n_i <= tol are left out of the mean (all of them: the result is 0),
their weights renormalized over the rest (b_i). Then, with tol = 1e-5 and max_iter = 10:

    m = sum_i b_i u_i / |.|   (the first model's u where that norm is below tol)
    repeat max_iter times:
        d_i = clamp(m . u_i, -1, 1); theta_i = acos(d_i)
        T = sum_i b_i theta_i / sin(theta_i) (u_i - d_i m), over the i with theta_i >= tol
        stop if |T| < tol; m = cos|T| m + sin|T| T / |T|; m = m / |m| where |m| > tol
    merged = (sum_i a_i n_i) m      (every model's norm, the left-out ones included); one model: itself

Memory: every m and T is a combination of the u_i, so the iteration runs on coefficients c (m = sum_j c_j u_j)
and the N x N Gram matrix of the models (float64): m . u_i = (G c)_i, |T|^2 = t' G t. Then
merged = sum_j (scale c_j / n_j) x_j. Both G and that sum go over the stored tensors in slices, summed in
float64: G in slices of every model at a time, 2M float64 elements in all (each model's slice shrinks as N
grows), the sum one 1M-element slice at a time; so memory does not grow with N where MergeKit holds all N
tensors and their unit vectors; each model's stored bytes are read twice. Where a stored tensor
cannot be used as is (vocabulary rows to align), G takes pairs of full tensors (N (N + 1) / 2 reads, two
alive) and the sum a float64 accumulator. The result is the exact one rounded once to float32; MergeKit's
float32 iteration rounds more (~2 ulp of the largest weights: 1e-6 at magnitude 4).
"""

from __future__ import annotations

import math

import torch

from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register

_SLICE = 1 << 20  # elements per slice of the sum and of the pairwise Gram
_GRAM_SCRATCH = 1 << 21  # float64 elements of the sliced Gram's scratch, all models together: flat in N
_GRAM_MIN_SLICE = 1 << 14  # elements of each model per Gram slice, at least


def karcher_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    if inputs.n_experts == 1:
        return inputs.expert(0).sub_(inputs.base())
    flat = _stored_flat(inputs)
    gram = _sliced_gram(flat) if flat is not None else _pairwise_gram(inputs)
    coefficients = karcher_coefficients(gram, int(params.shared["max_iter"]), float(params.shared["tol"]))
    base = inputs.base()
    merged = _sliced_sum(flat, coefficients) if flat is not None else _full_sum(inputs, coefficients)
    return merged.view(base.shape).sub_(base)


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """k_j with merged = sum_j k_j x_j, from the Gram matrix of the x_j (float64)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    n = len(norms)
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    g = gram[valid][:, valid] / torch.outer(norms[valid], norms[valid])  # Gram matrix of the unit vectors
    b = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
    length = _length(b, g)
    if length < tol:  # the weighted mean of the directions vanishes: start from the first model's
        c = torch.zeros_like(b)
        c[0] = 1.0
    else:
        c = b / length
    for _ in range(max_iter):
        dots = (g @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        on = theta >= tol
        step = torch.where(on, b * theta / torch.where(on, torch.sin(theta), 1.0), 0.0)
        t = step - c * float(step @ dots)  # sum_i step_i (u_i - dots_i m)
        t_norm = _length(t, g)
        if t_norm < tol:
            break
        c = math.cos(t_norm) * c + (math.sin(t_norm) / t_norm) * t
        length = _length(c, g)
        if length > tol:
            c = c / length
    scale = float(norms.sum()) / n
    out = [0.0] * n
    for j, i in enumerate(valid):
        out[i] = scale * float(c[j]) / float(norms[i])
    return out


def _length(c: torch.Tensor, g: torch.Tensor) -> float:
    """|sum_j c_j u_j| from the unit vectors' Gram matrix g."""
    return math.sqrt(max(float(c @ g @ c), 0.0))


def _stored_flat(inputs: TensorInputs) -> list[torch.Tensor] | None:
    """Every model's stored tensor, flat (memory-mapped, not copied), or None where one is not usable as is."""
    stored = getattr(inputs, "stored", None)
    if stored is None:
        return None
    flat = []
    for i in range(inputs.n_experts):
        t = stored(i)
        if t is None:
            return None
        flat.append(t.reshape(-1))
    return flat


def _slices(numel: int) -> range:
    return range(0, numel, _SLICE)


def _sliced_gram(flat: list[torch.Tensor]) -> torch.Tensor:
    n, numel = len(flat), flat[0].numel()
    step = min(max(_GRAM_MIN_SLICE, _GRAM_SCRATCH // n), numel)
    gram = torch.zeros(n, n, dtype=torch.float64)
    x = torch.empty(n, step, dtype=torch.float64)  # one buffer for every slice: no list of N slices and stack
    for s in range(0, numel, step):
        width = min(step, numel - s)
        for row, f in zip(x, flat, strict=True):
            row[:width].copy_(f[s:s + width])
        gram += x[:, :width] @ x[:, :width].T
    return gram


def _pairwise_gram(inputs: TensorInputs) -> torch.Tensor:
    n = inputs.n_experts
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        x = inputs.expert(i).reshape(-1)
        for j in range(i + 1):
            y = x if j == i else inputs.expert(j).reshape(-1)
            gram[i, j] = gram[j, i] = sum(float(x[s:s + _SLICE].double() @ y[s:s + _SLICE].double())
                                          for s in _slices(x.numel()))
            del y
    return gram


def _sliced_sum(flat: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """sum_j k_j x_j, float64 per slice, rounded once to float32."""
    out = torch.empty(flat[0].numel(), dtype=torch.float32)
    for s in _slices(out.numel()):
        acc = torch.zeros(min(_SLICE, out.numel() - s), dtype=torch.float64)
        for f, k in zip(flat, coefficients, strict=True):
            if k != 0.0:
                acc.add_(f[s:s + _SLICE].double(), alpha=k)
        out[s:s + _SLICE] = acc
    return out


def _full_sum(inputs: TensorInputs, coefficients: list[float]) -> torch.Tensor:
    acc = None
    for i, k in enumerate(coefficients):
        if k == 0.0:
            continue
        x = inputs.expert(i).reshape(-1)
        acc = torch.zeros(x.numel(), dtype=torch.float64) if acc is None else acc
        for s in _slices(x.numel()):
            acc[s:s + _SLICE].add_(x[s:s + _SLICE].double(), alpha=k)
        del x
    return acc.to(torch.float32) if acc is not None else torch.zeros(inputs.base().numel())


register(MergeMethod(
    name="karcher",
    fn=karcher_merge,
    params=(
        ParamSpec("max_iter", per_expert=False, default=10, low=0, kind=int),
        ParamSpec("tol", per_expert=False, default=1e-5, low=0.0),
    ),
    needs_base=False,
    base_role="input",
    reference="https://arxiv.org/abs/2603.04972",
    doc="Karcher mean of the models' directions on the sphere, scaled by their mean norm",
))
