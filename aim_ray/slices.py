"""MergeKit's slices, gradients and filters: which input tensors make each output tensor, with which parameters.

A config with `slices:` (or a `models:` config whose parameters use gradients or filters) gets a per-output-tensor
`TensorPlan`. MergeKit's semantics (mergekit.plan / mergekit.config / mergekit.parameter_resolver):

- `models:` is one slice over all layers. Output layer i of a slice is input layer `a + offset` of each source.
  Embeddings come from the first slice's sources, the final norm and lm_head from the last slice's.
- A slice's own `base_model` replaces the global one for its tensors (MergeKit's ConfigReader.base_model): the
  embeddings follow the first slice's, the final norm and lm_head the last slice's.
- `modules:` (multimodal models): each module (`text_decoder`, `vision_tower`, ...) has its own slices or models,
  with layers numbered inside it (`Module`); without `modules:` layers are found by pattern (`layers.N`, `h.N`,
  ... under any prefix, `architectures.split_layer`) and the front ends go with the embeddings.
- A parameter is looked up in the source's parameters (matching model), then the slice's, then the module's,
  then the global ones; a filter list that matches nothing falls through to the next scope.
- A gradient `[v0, ..., vn]` is interpolated linearly at t = offset / (layers in the slice - 1) (t = 1 for a
  one-layer slice, t = 0 for the embeddings, norm and head).
- `{filter: s, value: v}` applies where `s` is a substring of the tensor name (shared parameters are matched
  against the output tensor's name, per-model ones against that model's input tensor name).

The plan depends only on the config and the checkpoints' headers, never on the number of workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .architectures import front_module, is_front, is_head, num_layers, split_layer
from .errors import ConfigError
from .methods import MethodParams, resolve_params
from .methods.base import MergeMethod

MISSING: Any = object()  # a setting that resolves to nothing here (filters that do not match)
_SCALARS = (bool, int, float, str)


# ------------------------------------------------------------------------------------------- settings


def check_setting(setting: Any, where: str) -> None:
    """Refuse a value that is none of: scalar, list of scalars, {filter, value}, list of {filter, value}."""
    if isinstance(setting, _SCALARS) or _scalar_list(setting):
        return
    conds = setting if isinstance(setting, list) else [setting]
    for cond in conds:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise ConfigError(f"{where}: expected a value, a list of values (gradient) or a list of "
                              f"{{filter, value}}, got {setting!r}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise ConfigError(f"{where}: filter must be a string, got {cond['filter']!r}")
        if not (isinstance(cond["value"], _SCALARS) or _scalar_list(cond["value"])):
            raise ConfigError(f"{where}: value must be a value or a list of values, got {cond['value']!r}")


def _scalar_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(e, _SCALARS) for e in v)


def is_scalar(setting: Any) -> bool:
    return isinstance(setting, _SCALARS) or setting is None


def filters(setting: Any) -> list[str]:
    conds = setting if isinstance(setting, list) else [setting]
    return [c["filter"] for c in conds if isinstance(c, dict) and c.get("filter") not in (None, "*")]


def is_gradient(setting: Any) -> bool:
    conds = setting if isinstance(setting, list) and not _scalar_list(setting) else [setting]
    values = [c["value"] if isinstance(c, dict) else c for c in conds]
    return any(isinstance(v, list) and len(v) > 1 for v in values)


def evaluate(tensor_name: str, setting: Any, t: float) -> Any:
    """The value of one setting for one tensor at relative layer position t (MergeKit's evaluate_setting)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return setting
    if not setting:
        return MISSING
    if _scalar_list(setting):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(tensor_name, cond["value"], t)
    return MISSING


def _evaluated(scope: Mapping[str, Any] | None, tensor_name: str, t: float) -> dict[str, Any]:
    out = {}
    for key, setting in (scope or {}).items():
        value = evaluate(tensor_name, setting, t)
        if value is not MISSING:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TensorInput:
    """Input tensor `name` of checkpoint `index` (-1: the job's base, i >= 0: its expert i)."""

    index: int
    name: str


@dataclass(frozen=True)
class TensorPlan:
    base: TensorInput  # theta_pre (for passthrough: the one source)
    experts: tuple[TensorInput, ...]
    params: MethodParams


TEXT_MODULE = "text_decoder"  # MergeKit's name for a multimodal model's language model


@dataclass(frozen=True)
class Module:
    """The tensors one output module covers (MergeKit's `modules:`): "" (or MergeKit's `default`) the whole model
    (`models:` / `slices:`; front ends go with the embeddings), `text_decoder` everything outside the multimodal
    front ends, any other name the front end of that name (`vision_tower`, `multi_modal_projector`, ...), with
    layers numbered inside it."""

    name: str = ""

    @property
    def text(self) -> bool:
        """Whether this is the language model (its layers by `architectures.layer_index`, front ends aside)."""
        return self.name in ("", "default", TEXT_MODULE)

    def covers(self, tensor: str) -> bool:
        if self.name in ("", "default"):
            return True
        front = front_module(tensor)
        return front is None if self.name == TEXT_MODULE else front == self.name

    def layer_of(self, tensor: str) -> tuple[str, int, str] | None:
        """(stem, index, suffix) of one of this module's layer tensors, else None (pre and post tensors)."""
        if self.text and is_front(tensor):
            return None
        return split_layer(tensor)

    def is_post(self, tensor: str) -> bool:
        """After the layers (final norm, head: from the last slice); front ends have none."""
        return self.text and is_head(tensor)

    def n_layers(self, config: Mapping[str, Any], names: Sequence[str]) -> int:
        if self.text:
            return num_layers(config, names)
        indices = [layer[1] for n in names if self.covers(n) and (layer := self.layer_of(n)) is not None]
        return max(indices) + 1 if indices else 0


@dataclass(frozen=True)
class Source:
    """One model of an output slice: the input index, its first layer, its own parameters."""

    index: int
    ref: str
    start: int
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class Slice:
    base: Source
    experts: tuple[Source, ...]
    n_layers: int
    parameters: Mapping[str, Any]
    has_base: bool = True  # whether the slice has a base (its own base_model or the global one; `MethodParams`)
    module: Module = Module()
    module_parameters: Mapping[str, Any] = field(default_factory=dict)  # between the slice's and the global ones


def layer_tensors(module: Module, names: Sequence[str], layer: int) -> list[tuple[str, str]]:
    """(stem, suffix) of the module's tensors of one layer, in checkpoint order."""
    out = []
    for n in names:
        if module.covers(n) and (split := module.layer_of(n)) is not None and split[1] == layer:
            out.append((split[0], split[2]))
    return out


def non_layer_names(module: Module, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(pre, post): the module's tensors outside its layers, before them (embeddings, front ends) and after."""
    rest = [n for n in names if module.covers(n) and module.layer_of(n) is None]
    return [n for n in rest if not module.is_post(n)], [n for n in rest if module.is_post(n)]


class ParamResolver:
    """Per-tensor `MethodParams` with MergeKit's precedence (source > slice > global). Identical resolved values
    share one MethodParams; the warnings of `resolve_params` (ignored parameters) are emitted once each."""

    def __init__(self, method: MergeMethod, global_params: Mapping[str, Any]) -> None:
        self.method = method
        self.global_params = global_params
        self._memo: dict[str, MethodParams] = {}
        self.warned: dict[str, Warning] = {}

    def resolve(self, sl: Slice, inputs: Sequence[str], out_name: str, t: float) -> MethodParams:
        """`inputs`: each expert's input tensor name (as in sl.experts)."""
        m = self.method
        shared = {**_evaluated(self.global_params, out_name, t), **_evaluated(sl.module_parameters, out_name, t),
                  **_evaluated(sl.parameters, out_name, t)}
        per_expert = []
        for src, in_name in zip(sl.experts, inputs, strict=True):
            own = _evaluated(src.parameters, in_name, t)
            for spec in m.params:
                if spec.per_expert and spec.name not in own:
                    for scope in (sl.parameters, sl.module_parameters, self.global_params):
                        if spec.name in scope and (v := evaluate(in_name, scope[spec.name], t)) is not MISSING:
                            own[spec.name] = v
                            break
            per_expert.append(own)
        # Per-model parameters were looked up above on each model's own input name; the shared mapping (output name)
        # must not be their fallback.
        shared = {k: v for k, v in shared.items() if not ((spec := m.param(k)) is not None and spec.per_expert)}
        key = repr((per_expert, sorted(shared.items()), [s.ref for s in sl.experts], sl.has_base))
        if key not in self._memo:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    self._memo[key] = resolve_params(m, per_expert, shared, [s.ref for s in sl.experts],
                                                     has_base=sl.has_base)
                except ConfigError as e:
                    raise ConfigError(f"{e} (tensor {out_name})") from None
            for w in caught:
                self.warned.setdefault(str(w.message), w.message)
        return self._memo[key]

    def emit_warnings(self) -> None:
        for message in self.warned.values():
            warnings.warn(message, stacklevel=4)


def plan_tensors(modules: Sequence[Sequence[Slice]], names_of: Sequence[Sequence[str]], resolver: ParamResolver
                 ) -> tuple[dict[str, TensorPlan], dict[Module, int]]:
    """Every output tensor's plan (per module: its pre tensors, layers, post tensors) and each module's output
    layer count. `modules` holds each module's slices; `names_of[i + 1]` lists input i's tensor names (i = -1:
    the base)."""
    plans: dict[str, TensorPlan] = {}

    def add(sl: Slice, out_name: str, in_names: Sequence[str], t: float) -> None:
        params = resolver.resolve(sl, in_names[1:], out_name, t)
        plans[out_name] = TensorPlan(TensorInput(sl.base.index, in_names[0]),
                                     tuple(TensorInput(s.index, n) for s, n in zip(sl.experts, in_names[1:])), params)

    counts: dict[Module, int] = {}
    for slices in modules:
        module = slices[0].module
        pre, _ = non_layer_names(module, names_of[slices[0].base.index + 1])
        for n in pre:
            add(slices[0], n, [n] * (1 + len(slices[0].experts)), 0.0)
        out_layer = 0
        for sl in slices:
            for offset in range(sl.n_layers):
                t = offset / (sl.n_layers - 1) if sl.n_layers > 1 else 1.0
                for stem, suffix in layer_tensors(module, names_of[sl.base.index + 1], sl.base.start + offset):
                    ins = [f"{stem}{src.start + offset}.{suffix}" for src in (sl.base, *sl.experts)]
                    add(sl, f"{stem}{out_layer}.{suffix}", ins, t)
                out_layer += 1
        _, post = non_layer_names(module, names_of[slices[-1].base.index + 1])
        for n in post:
            add(slices[-1], n, [n] * (1 + len(slices[-1].experts)), 0.0)
        counts[module] = out_layer
    return plans, counts
