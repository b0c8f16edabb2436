"""Merge methods, one tensor at a time: the registry, lookup, and parameter resolution.

`resolve_params` turns MergeKit-style parameters (per model under `models[i].parameters`, global under
`parameters`) into a validated `MethodParams`: defaults filled in, unknown names, missing required values,
wrong types and out-of-range values rejected with a message naming the method, the model and the option.
As in MergeKit, a per-model parameter given globally is the default for every model. Values are scalars here:
MergeKit's per-layer gradients and filter lists are evaluated per tensor first (`aim_ray.slices`).

MergeKit reads only the parameters a method declares and ignores the rest of the YAML. So a parameter of
MergeKit's vocabulary (`MERGEKIT_PARAMETERS`) that a MergeKit method does not read here (a per-model `weight`
on slerp, a global parameter under a model) is dropped with one `IgnoredParameterWarning` naming it; a name
no MergeKit method reads is a typo and refused, as is any unknown name for aim-ray's own methods.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, IgnoredParameterWarning
from . import (  # noqa: F401  (registration)
    arcee_fusion,
    consensus,
    fisher,
    iso,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    tsv,
    widen,
)
from .base import REGISTRY, MergeMethod, MethodParams, ParamSpec

__all__ = ["REGISTRY", "MergeMethod", "MethodParams", "ParamSpec", "get_method", "resolve_params"]

_MISSING = object()
# Every parameter some MergeKit method declares (MergeKit 0.1.5's merge_methods registry).
MERGEKIT_PARAMETERS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "filter_wise",
    "normalize_weights", "eps", "r", "alpha", "select_topk", "nuslerp_row_wise", "nuslerp_flatten", "scale",
    "max_iter", "tol",
})


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"merge_method {name!r} is unknown; known methods: {', '.join(sorted(REGISTRY))}"
                          ) from None


def resolve_params(method: MergeMethod | str, per_expert: Sequence[Mapping[str, Any]],
                   shared: Mapping[str, Any], expert_names: Sequence[str] | None = None,
                   has_base: bool = True) -> MethodParams:
    """Validated parameters for `method` with len(per_expert) experts (`expert_names` only label errors);
    `has_base`: whether the config names a base_model (`MethodParams.has_base`)."""
    m = get_method(method) if isinstance(method, str) else method
    per_expert = [dict(p or {}) for p in per_expert]
    shared = dict(shared or {})
    labels = [f"models[{i}]" + (f" ({expert_names[i]})" if expert_names else "")
              for i in range(len(per_expert))]
    _check_count(m, len(per_expert))
    _drop_ignored(m, per_expert, shared, labels)
    _check_names(m, per_expert, shared, labels)
    shared_values = {p.name: _resolve(m, p, shared.get(p.name, _MISSING), "parameters")
                     for p in m.params if not p.per_expert}
    experts = tuple(
        {p.name: _resolve(m, p, values.get(p.name, shared.get(p.name, _MISSING)), label)
         for p in m.params if p.per_expert}
        for values, label in zip(per_expert, labels, strict=True)
    )
    params = MethodParams(per_expert=experts, shared=shared_values, has_base=has_base)
    for check in m.extra_checks:
        try:
            check(params)
        except ConfigError as e:
            raise ConfigError(f"merge_method {m.name}: {e}") from None
    return params


def _check_count(m: MergeMethod, n: int) -> None:
    if n < m.min_experts:
        raise ConfigError(f"merge_method {m.name} needs at least {m.min_experts} model(s) besides the base, "
                          f"got {n}")
    if m.max_experts is not None and n > m.max_experts:
        raise ConfigError(f"merge_method {m.name} takes at most {m.max_experts} model(s) besides the base, "
                          f"got {n}")


def _check_names(m: MergeMethod, per_expert: list[dict], shared: dict, labels: list[str]) -> None:
    known = ", ".join(p.name for p in m.params) or "(none)"
    for key in shared:
        if m.param(key) is None:
            raise ConfigError(f"merge_method {m.name}: unknown parameter {key!r} in parameters; "
                              f"{m.name} accepts: {known}")
    for values, label in zip(per_expert, labels, strict=True):
        for key in values:
            spec = m.param(key)
            if spec is None:
                raise ConfigError(f"merge_method {m.name}: unknown parameter {key!r} for {label}; "
                                  f"{m.name} accepts: {known}")
            if not spec.per_expert:
                raise ConfigError(f"merge_method {m.name}: {key!r} ({label}) is a global parameter; "
                                  f"put it under the top-level parameters")


def _drop_ignored(m: MergeMethod, per_expert: list[dict], shared: dict, labels: list[str]) -> None:
    """Remove (in place) the MergeKit parameters that MergeKit would ignore for `m`, one warning per name."""
    if not m.mergekit:
        return
    ignored: dict[str, list[str]] = {}
    for values, where in [(shared, "parameters"), *zip(per_expert, labels, strict=True)]:
        for key in [k for k in values if k in MERGEKIT_PARAMETERS]:
            spec = m.param(key)
            if spec is None or (where != "parameters" and not spec.per_expert):
                ignored.setdefault(key, []).append(where)
                del values[key]
    for key, places in ignored.items():
        why = (f"{m.name} does not use it" if m.param(key) is None
               else "a global parameter, read only under the top-level parameters")
        warnings.warn(f"merge_method {m.name}: parameter {key!r} ({', '.join(places)}) is ignored: {why} "
                      f"(MergeKit ignores it too)", IgnoredParameterWarning, stacklevel=3)


def _resolve(m: MergeMethod, spec: ParamSpec, value: Any, where: str) -> Any:
    prefix = f"merge_method {m.name}: {where}: parameter {spec.name!r}"
    if value is _MISSING:
        if spec.required:
            raise ConfigError(f"{prefix} is required (no default)")
        return spec.default
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{prefix} = {value!r}: expected a single scalar value here (gradients and filters "
                          f"are evaluated per tensor by the engine)")
    value = _coerce(spec, value, prefix)
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{prefix} = {value!r}: must be one of {', '.join(map(str, spec.choices))}")
    _check_range(spec, value, prefix)
    return value


def _coerce(spec: ParamSpec, value: Any, prefix: str) -> Any:
    kind = spec.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{prefix} = {value!r}: must be a finite number")
            return float(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{prefix} = {value!r}: expected {_KIND_NAMES.get(kind, kind.__name__)}, "
                      f"got {type(value).__name__}")


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_range(spec: ParamSpec, value: Any, prefix: str) -> None:
    if spec.kind not in (int, float):
        return
    low_ok = spec.low is None or (value > spec.low if spec.low_open else value >= spec.low)
    high_ok = spec.high is None or (value < spec.high if spec.high_open else value <= spec.high)
    if not (low_ok and high_ok):
        lo = "-inf" if spec.low is None else spec.low
        hi = "inf" if spec.high is None else spec.high
        interval = f"{'(' if spec.low_open or spec.low is None else '['}{lo}, {hi}" \
                   f"{')' if spec.high_open or spec.high is None else ']'}"
        raise ConfigError(f"{prefix} = {value!r}: must be in {interval}")
