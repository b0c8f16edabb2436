"""multislerp (MergeKit semantics): barycentric interpolation of any number of experts on the hypersphere.

With a base_model the vectors are the task vectors, v_i = tau_i; without one, the weights v_i = theta_i.
Each whole tensor is one vector. Weights w_i (required) are divided by their sum (normalize_weights, default
true; a zero sum is refused). With n_i = |v_i| and u_i = v_i / (n_i + eps) (eps = 1e-8, added, not a floor):

    m = sum_i w_i u_i;  if |m| < eps: two experts fall back to w_0 v_0 + w_1 v_1; more are an error
    merged = (m / |m|) * sum_i w_i n_i      (+ the base with one)
    one expert: merged = theta_0 (the expert itself)

MergeKit then maps the weighted mean of the tangent vectors t_i = u_i - (u_i . m') m' (m' = m / |m|) back to
the sphere: T = sum_i w_i t_i, merged = (m' cos|T| + T sin|T| / |T|) * sum_i w_i n_i, with |T| + eps for |T|.
In exact arithmetic T = m - (m . m') m' = 0 and this is m' itself; in float32 T is rounding noise (~1e-7
relative) that MergeKit's result carries, 2-3 ulp on weights of magnitude 10. To give MergeKit's float32
numbers, T is computed all the same, in a second streaming pass.

Memory: two streaming passes over the experts, one expert read at a time; besides it m', T and two float32
temporaries, whatever the number of experts (MergeKit stacks them all). The antipodal fallback re-reads the
two experts.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import MergeMethod, MethodParams, ParamSpec, TensorInputs, register
from .linear import nonzero_weight_sum


def multislerp_merge(inputs: TensorInputs, params: MethodParams) -> torch.Tensor:
    n = inputs.n_experts
    if n == 1:
        return inputs.expert(0).sub_(inputs.base())
    eps = float(params.shared["eps"])
    weights = _weights(params)
    read = inputs.task_vector if params.has_base else inputs.expert
    mean, norms = None, []
    for i in range(n):
        v = read(i)
        norms.append(torch.linalg.vector_norm(v))
        mean = _accumulate(mean, v.div_(norms[-1] + eps), weights[i])
        del v
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        del mean
        return _antipodal(inputs, params, weights, read)
    mean.div_(mean_norm)
    tangent = None
    for i in range(n):
        unit = read(i).div_(norms[i] + eps)
        tangent = _accumulate(tangent, unit.sub_(mean * (unit * mean).sum()), weights[i])
        del unit
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    merged = mean.mul_(torch.cos(tangent_norm)).add_(tangent.mul_(torch.sin(tangent_norm) / tangent_norm))
    del tangent
    merged.mul_((torch.stack(norms) * weights).sum())  # the weighted mean norm: float32, MergeKit's order
    return merged if params.has_base else merged.sub_(inputs.base())


def _accumulate(total: torch.Tensor | None, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """total + weight * v (v scaled in place), summed in expert order as MergeKit's stacked sum."""
    v.mul_(weight)
    return v if total is None else total.add_(v)


def _weights(params: MethodParams) -> torch.Tensor:
    weights = torch.tensor([float(e["weight"]) for e in params.per_expert], dtype=torch.float32)
    return weights / weights.sum() if params.shared["normalize_weights"] else weights


def _antipodal(inputs: TensorInputs, params: MethodParams, weights: torch.Tensor, read) -> torch.Tensor:
    if inputs.n_experts != 2:
        raise ConfigError(f"multislerp: tensor {inputs.name}: the weighted sum of the experts' unit vectors is "
                          f"zero (antipodal vectors whose weights cancel); change the weights")
    merged = read(0).mul_(float(weights[0])).add_(read(1).mul_(float(weights[1])))
    return merged if params.has_base else merged.sub_(inputs.base())


register(MergeMethod(
    name="multislerp",
    fn=multislerp_merge,
    params=(
        ParamSpec("weight", per_expert=True, required=True),
        ParamSpec("normalize_weights", per_expert=False, default=True, kind=bool),
        ParamSpec("eps", per_expert=False, default=1e-8, low=0.0, low_open=True),
    ),
    needs_base=False,
    base_role="reference",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    doc="weighted mean of the experts' directions on the hypersphere, scaled to their weighted mean norm",
    extra_checks=(nonzero_weight_sum("normalize_weights"),),
))
