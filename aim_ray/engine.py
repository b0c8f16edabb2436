"""The single-process merge core: validate, merge (and relax) one tensor at a time, write shards, commit.

`prepare` checks everything that can be checked from headers and configs before any tensor is read or any
file written. `merge_tensor` is the one per-tensor function both the single-process path and the Ray
workers call, so their outputs are bit-identical. `write_shard` writes one planned shard; the shard plan
depends only on the tensor list and the shard size, never on the number of workers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architectures import front_module, is_vocab_tensor, layer_count_key, num_layers
from .chat_template import resolve_template
from .checkpoint import (
    DEFAULT_SHARD_SIZE,
    Checkpoint,
    OutputDir,
    OutputTensor,
    ShardWriter,
    copy_aux_files,
    parse_dtype,
    plan_shards,
    shard_filename,
    write_index,
)
from .config import InputSlice, MergeConfig, ModelEntry, OutputSlice
from .errors import AimRayError, CheckpointError, ConfigError, IgnoredParameterWarning, StatisticsError
from .methods import fused, get_method, kernels, resolve_params
from .methods.base import MergeMethod, MethodParams, mask_seed
from .plan import ordered_names
from .resume import PROGRESS, Progress
from .slices import (
    TEXT_MODULE,
    Module,
    ParamResolver,
    Slice,
    Source,
    TensorInput,
    TensorPlan,
    check_setting,
    filters,
    is_gradient,
    is_scalar,
    plan_tensors,
)
from .statistics import JobStatistics, check_data
from .vocab import VocabPlan, build_plan

# Buffers some older checkpoints carry; they are recomputed by transformers and never merged.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# A relaxation hook: (tensor name, theta_pre float32, delta float32) -> relaxed weight float32.
RelaxFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MergeJob:
    """Everything a merge needs, validated. Cheap to rebuild from (config, options) in each worker."""

    config: MergeConfig
    method: MergeMethod
    params: MethodParams
    base: Checkpoint
    experts: list[Checkpoint]
    expert_refs: list[str]
    out_dtype: torch.dtype
    outputs: list[OutputTensor]
    vocab_rows: int | None
    tokenizer_src: Path
    vocab: VocabPlan | None = None  # MergeKit's tokenizer section: output vocabulary and row sources
    chat_template: str | None = None  # resolved and parsed; written with the tokenizer
    seed: int = 0
    check_finite: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    notes: list[str] = field(default_factory=list)
    # Precomputed float32 deltas (see `write_delta`): a Tune trial relaxes a cached delta instead of merging.
    delta_source: Checkpoint | None = None
    # Per-output-tensor inputs and parameters (`aim_ray.slices`): set for slices, gradients and filters; None
    # when every output tensor is the same tensor of the base and the experts, with `params` for all.
    plan: dict[str, TensorPlan] | None = None
    out_layers: int | None = None  # output decoder layers when a plan stacks or drops layers
    layer_counts: dict[str, int] = field(default_factory=dict)  # config.json's layer counts a plan changes (dotted)
    # False for a scratch output (a Tune trial model, scored then deleted): no fsync, no re-hash at commit.
    durable: bool = True
    # The experts' statistics of a data-aware method (`aim_ray.statistics`), attached after `prepare` (a
    # worker gets only its shard's, `JobStatistics.restricted`).
    statistics: JobStatistics | None = None

    def input_of(self, name: str, index: int = -1) -> tuple[Checkpoint, str]:
        """(checkpoint, input tensor name) of input `index` (-1: the base) for output tensor `name`."""
        if self.plan is None:
            return (self.base if index < 0 else self.experts[index]), name
        inp = self.plan[name].base if index < 0 else self.plan[name].experts[index]
        return (self.base if inp.index < 0 else self.experts[inp.index]), inp.name

    def params_of(self, name: str) -> MethodParams:
        return self.params if self.plan is None else self.plan[name].params

    @property
    def shards(self) -> list[list[OutputTensor]]:
        return plan_shards(self.outputs, self.shard_size)

    @property
    def n_layers(self) -> int:
        if self.out_layers is not None:
            return self.out_layers
        return num_layers(self.base.config, self.base.names())

    def fingerprint(self) -> str:
        """Identifies this exact merge (inputs, options, shard plan) for safe --resume."""
        import hashlib

        payload = json.dumps({"config": self.config.model_dump(mode="json"), "seed": self.seed,
                              "shard_size": self.shard_size, "dtype": str(self.out_dtype),
                              "inputs": [str(c.path) for c in [self.base, *self.experts]]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- prepare


def prepare(config: MergeConfig, *, seed: int = 0, allow_pickle: bool = False, check_finite: bool = True,
            shard_size: int = DEFAULT_SHARD_SIZE, revisions: Mapping[str, str] | None = None) -> MergeJob:
    """Validate the config against the checkpoints' headers (hub models: remote headers). Reads no tensor
    data. `revisions` pins hub refs to commits (`pinned_revisions` of the driver's job, for the workers)."""
    method = get_method(config.merge_method)
    if config.aim is not None and method.direct:
        raise ConfigError(f"aim: merge_method {method.name} copies tensors (no delta from a base to relax); "
                          f"remove aim:")
    if method.direct and config.models is not None and config.base_model is not None and \
            all(e.model != config.base_model for e in config.models):
        raise ConfigError(f"base_model: merge_method {method.name} takes one model, and MergeKit adds a base_model "
                          f"missing from models as one more; list only the model (no base_model)")
    _check_statistics(config, method)
    if config.models is None or _has_settings(config):
        return _prepare_planned(config, method, seed=seed, allow_pickle=allow_pickle, check_finite=check_finite,
                                shard_size=shard_size, revisions=revisions)
    entries, base_ref = _split_base(config, method)
    pins = revisions or {}
    base = _open(base_ref, "base_model", allow_pickle, pins.get(base_ref))
    experts = [_open(e.model, f"models[{i}]", allow_pickle, pins.get(e.model)) for i, e in enumerate(entries)]
    params = resolve_params(method, [e.parameters for e in entries], config.parameters,
                            has_base=config.base_model is not None)
    refs = [e.model for e in entries]
    for ref, ckpt in zip(refs, experts):
        _check_architecture(base, ckpt, base_ref, ref)
    vocab, tok_src, template = _tokenizer_plan(config, base, experts, refs, base_ref)
    vocab_rows = vocab.rows if vocab is not None else None
    out_dtype = output_dtype(config, base)
    names = [n for n in base.names() if not n.endswith(IGNORED_SUFFIXES)]
    _check_tensor_sets(base, experts, refs, names, vocab_rows)
    outputs = [_output_tensor(base, n, out_dtype, vocab_rows) for n in ordered_names(names, num_layers(base.config,
                                                                                                         names))]
    return MergeJob(config, method, params, base, experts, refs, out_dtype, outputs, vocab_rows, tok_src,
                    vocab, template, seed, check_finite, shard_size)


def _check_statistics(config: MergeConfig, method: MergeMethod) -> None:
    """A data-aware method (regmean, fisher, ...) needs `data:` on every expert entry (files that exist)."""
    if method.statistics is None:
        return
    if config.models is None:
        raise ConfigError(f"merge_method {method.name} reads each model's data: use models:, not slices: or "
                          f"modules:")
    entries, _ = _split_base(config, method)
    check_data(method.name, [e.model for e in entries], [e.data for e in entries])


def _split_base(config: MergeConfig, method: MergeMethod):
    """MergeKit semantics: a `models` entry naming the base model is the base, not an expert (for methods
    that need a base, or take it as a reference: `base_role`). Methods without one merge every listed model
    (linear), plus the base when it is one more input (karcher)."""
    base = config.base_model
    if method.needs_base:
        if base is None:
            raise ConfigError(f"merge_method {method.name!r} needs base_model")
        entries = [e for e in config.models if e.model != base]
        base_ref = base
    else:
        if config.aim is not None and base is None:  # AIM relaxes a delta from a base
            raise ConfigError(f"aim: merge_method {method.name!r} without base_model has no base to relax "
                              f"toward; set base_model (the experts' common base) or remove aim:")
        entries = list(config.models)
        if base is not None and method.base_role == "reference":
            entries = [e for e in entries if e.model != base]
        if base is not None and _base_appended(config, method) and all(e.model != base for e in entries):
            entries.append(ModelEntry(model=base))  # MergeKit appends it to the inputs
        base_ref = base or entries[0].model
    if len(entries) < method.min_experts:
        raise ConfigError(f"merge_method {method.name!r} needs at least {method.min_experts} model(s) besides "
                          f"the base, got {len(entries)}")
    if method.max_experts is not None and len(entries) > method.max_experts:
        raise ConfigError(f"merge_method {method.name!r} takes at most {method.max_experts} model(s) besides "
                          f"the base, got {len(entries)}")
    return entries, base_ref


def _base_appended(config: MergeConfig, method: MergeMethod) -> bool:
    """Whether a base_model missing from `models` is merged as one more model, as MergeKit always does for a
    method that does not use a base: karcher; linear when a global `weight` gives it one (without one MergeKit
    refuses the config, and aim-ray keeps the base only as AIM's reference)."""
    if method.base_role == "input":
        return True
    return method.base_role == "listed" and not method.direct and "weight" in config.parameters


def _scopes(config: MergeConfig) -> list[tuple[str, Mapping[str, Any]]]:
    """Every parameters mapping of the config, with its option path."""
    scopes: list[tuple[str, Mapping[str, Any]]] = [("parameters", config.parameters)]
    for i, e in enumerate(config.models or []):
        scopes.append((f"models[{i}].parameters", e.parameters))
    for g in _groups(config) if config.models is None else []:
        if g.module.name:
            scopes.append((f"{g.where}parameters", g.parameters))
        for i, e in enumerate(g.models or []):
            scopes.append((f"{g.where}models[{i}].parameters", e.parameters))
        for i, sl in enumerate(g.slices or []):
            scopes.append((f"{g.where}slices[{i}].parameters", sl.parameters))
            scopes += [(f"{g.where}slices[{i}].sources[{j}].parameters", src.parameters)
                       for j, src in enumerate(sl.sources)]
    return scopes


def _has_settings(config: MergeConfig) -> bool:
    """Whether any parameter is a gradient or filter list (then parameters are resolved per tensor)."""
    found = False
    for where, scope in _scopes(config):
        for key, setting in scope.items():
            check_setting(setting, f"{where}.{key}")
            found = found or not is_scalar(setting)
    return found


def _prepare_planned(config: MergeConfig, method: MergeMethod, *, seed: int, allow_pickle: bool,
                     check_finite: bool, shard_size: int, revisions: Mapping[str, str] | None) -> MergeJob:
    """`prepare` for slices, modules, gradients and filters: a `TensorPlan` per output tensor."""
    _has_settings(config)  # checks the settings' form
    pins = revisions or {}
    if config.models is not None:
        entries, base_ref = _split_base(config, method)
        refs = [e.model for e in entries]
    else:
        base_ref, refs = _slice_inputs(config, method)
    base = _open(base_ref, "base_model", allow_pickle, pins.get(base_ref))
    experts = [_open(r, _option_of(config, r, i), allow_pickle, pins.get(r)) for i, r in enumerate(refs)]
    for ref, ckpt in zip(refs, experts):
        _check_architecture(base, ckpt, base_ref, ref, layers=config.models is not None)
    ckpts = [base, *experts]
    names_of = [[n for n in c.names() if not n.endswith(IGNORED_SUFFIXES)] for c in ckpts]
    n_base = num_layers(base.config, base.names())
    if config.models is not None:
        base_src = Source(-1, base_ref, 0, {})
        srcs = tuple(Source(i, e.model, 0, e.parameters) for i, e in enumerate(entries))
        modules = [[Slice(base_src, srcs, n_base, {}, has_base=config.base_model is not None)]]
    else:
        modules = [_slices(config, method, g, base_ref, refs, ckpts, names_of) for g in _groups(config)]
        _check_modules(config, modules, names_of[0], base_ref)
    _check_gradients(config, base_ref, n_base)
    resolver = ParamResolver(method, config.parameters)
    plans, counts = plan_tensors(modules, names_of, resolver)
    resolver.emit_warnings()
    vocab, tok_src, template = _tokenizer_plan(config, base, experts, refs, base_ref)
    vocab_rows = vocab.rows if vocab is not None else None
    out_dtype = output_dtype(config, base)
    _check_plan(plans, ckpts, [base_ref, *refs], vocab_rows)
    _check_filters(config, plans)
    own = {m: m.n_layers(base.config, names_of[0]) for m in counts}
    identity = all(p.base == TensorInput(-1, n) for n, p in plans.items()) and counts == own
    if config.aim is not None and not identity:
        raise ConfigError("aim: the slices make output layers that are not the base model's own; AIM relaxes "
                          "toward the base's same tensor: remove aim: or give every layer of the base in order")
    out_layers = next((n for m, n in counts.items() if m.text), n_base)
    outputs = []
    for name in ordered_names(list(plans), out_layers):
        ckpt, in_name = ckpts[plans[name].base.index + 1], plans[name].base.name
        outputs.append(_output_tensor(ckpt, in_name, out_dtype, vocab_rows, out_name=name))
    params = next(iter(plans.values())).params
    return MergeJob(config, method, params, base, experts, refs, out_dtype, outputs, vocab_rows, tok_src, vocab,
                    template, seed, check_finite, shard_size, plan=plans, out_layers=None if identity else out_layers,
                    layer_counts={} if identity else _layer_counts(config, base, counts, own))


@dataclass(frozen=True)
class _Group:
    """The slices (or models) of one output module; `where` prefixes its options in errors."""

    where: str
    module: Module
    slices: list[OutputSlice] | None
    models: list[ModelEntry] | None
    parameters: Mapping[str, Any]


def _groups(config: MergeConfig) -> list[_Group]:
    if config.modules is None:
        return [_Group("", Module(), config.slices, None, {})]
    return [_Group(f"modules.{name}.", Module(name), m.slices, m.models, m.parameters)
            for name, m in config.modules.items()]


def _module_models(config: MergeConfig, method: MergeMethod, models: Sequence[ModelEntry]) -> list[str]:
    """The inputs of a module's `models:` (MergeKit adds a base_model the list lacks, as `_split_base` does)."""
    refs = [e.model for e in models]
    base = config.base_model
    if base is not None and base not in refs and (method.needs_base or method.base_role == "reference"
                                                  or _base_appended(config, method)):
        refs.append(base)
    return refs


def _group_slices(config: MergeConfig, method: MergeMethod, g: _Group, n_layers_of: Callable[[str], int]
                  ) -> list[OutputSlice]:
    """A module's slices; its `models:` as one slice over all of the module's layers of each model."""
    if g.slices is not None:
        return g.slices
    params = {e.model: e.parameters for e in g.models or []}
    return [OutputSlice(sources=[InputSlice(model=r, layer_range=(0, n_layers_of(r)), parameters=params.get(r, {}))
                                 for r in _module_models(config, method, g.models or [])])]


def _check_modules(config: MergeConfig, modules: Sequence[Sequence[Slice]], base_names: Sequence[str],
                   base_ref: str) -> None:
    """With `modules:`, every tensor of the base belongs to one listed module, and every module has tensors
    (MergeKit would silently leave an unlisted module out of the output)."""
    if config.modules is None:
        return
    listed = [sl[0].module for sl in modules]
    for m in listed:
        if not any(m.covers(n) for n in base_names):
            raise ConfigError(f"modules.{m.name}: no tensor of {base_ref} belongs to it (its modules: "
                              f"{', '.join(_module_names(base_names))})")
    for n in base_names:
        owners = [m.name for m in listed if m.covers(n)]
        if not owners:
            name = front_module(n) or TEXT_MODULE
            raise ConfigError(f"modules: tensor {n!r} belongs to module {name!r}, which is not listed; list it "
                              f"(MergeKit would leave it out of the output)")
        if len(owners) > 1:
            raise ConfigError(f"modules: tensor {n!r} belongs to both {owners[0]!r} and {owners[1]!r}")


def _module_names(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(front_module(n) or TEXT_MODULE for n in names))


def _layer_counts(config: MergeConfig, base: Checkpoint, counts: Mapping[Module, int], own: Mapping[Module, int]
                  ) -> dict[str, int]:
    """The output config's layer counts (dotted keys) of the modules whose count the slices changed."""
    out = {}
    for m, n in counts.items():
        if n == own[m]:
            continue
        section = None if m.text else ("audio_config" if "audio" in m.name else "vision_config")
        key = layer_count_key(base.config, section)
        if key is None:
            where = f"modules.{m.name}" if m.name else "slices"
            raise ConfigError(f"{where}: the output has {n} layers but the base's config has no layer count to "
                              f"set for them")
        out[key] = n
    return out


def _option_of(config: MergeConfig, ref: str, index: int) -> str:
    """Where the config names input `ref` (for errors)."""
    for g in _groups(config) if config.models is None else []:
        for i, sl in enumerate(g.slices or []):
            for j, src in enumerate(sl.sources):
                if src.model == ref:
                    return f"{g.where}slices[{i}].sources[{j}]"
        for i, e in enumerate(g.models or []):
            if e.model == ref:
                return f"{g.where}models[{i}]"
    return f"models[{index}]"


def _slice_inputs(config: MergeConfig, method: MergeMethod) -> tuple[str, list[str]]:
    """The job's base ref and the distinct other inputs of a slices or modules config, in order of first
    appearance. A slice's own `base_model` (MergeKit's `slices[i].base_model`) that is not the job's base is
    one of the inputs."""
    if config.aim is not None and config.base_model is None:
        raise ConfigError(f"aim: merge_method {method.name!r} without base_model has no base to relax toward; "
                          f"set base_model or remove aim:")
    seen: list[tuple[OutputSlice | None, str]] = []  # (slice, model); slice None: a module's models
    for g in _groups(config):
        for i, sl in enumerate(g.slices or []):
            if method.needs_base and _slice_base(config, sl) is None:
                raise ConfigError(f"merge_method {method.name!r} needs base_model (globally or as "
                                  f"{g.where}slices[{i}].base_model)")
            seen += [(sl, src.model) for src in sl.sources]
        if g.models is not None:
            if method.needs_base and config.base_model is None:
                raise ConfigError(f"merge_method {method.name!r} needs base_model")
            seen += [(None, r) for r in _module_models(config, method, g.models)]
    base_ref = config.base_model or seen[0][1]
    refs: list[str] = []
    for sl, model in seen:
        is_base = _base_excluded(method) and model == (config.base_model if sl is None else _slice_base(config, sl))
        if not ((model == base_ref and is_base) or model in refs):
            refs.append(model)
    return base_ref, refs


def _slice_base(config: MergeConfig, sl: OutputSlice) -> str | None:
    """The base model of one slice: its own `base_model`, else the global one (MergeKit's ConfigReader)."""
    return sl.base_model or config.base_model


def _base_excluded(method: MergeMethod) -> bool:
    """Whether a configured base is the method's reference, not one more merged input (MergeKit's base policy
    REQUIRED or OPTIONAL; IGNORED methods merge whatever the slice lists)."""
    return method.needs_base or method.base_role == "reference"


def _is_base_source(config: MergeConfig, method: MergeMethod, sl: OutputSlice, ref: str) -> bool:
    """Whether a source of slice `sl` naming `ref` is the slice's base rather than one of its merged models."""
    return _base_excluded(method) and ref == _slice_base(config, sl)


def _check_slice_base(config: MergeConfig, method: MergeMethod, where: str, sl: OutputSlice) -> None:
    """MergeKit: a base the method uses must be one of the slice's sources; a base an IGNORED method would not
    use is ignored (one warning for a slice's own)."""
    base = _slice_base(config, sl)
    if sl.residual_weight is not None:
        warnings.warn(IgnoredParameterWarning(f"{where}.residual_weight: MergeKit accepts and ignores it; "
                                              f"ignored"), stacklevel=4)
    if not _base_excluded(method):
        if sl.base_model is not None:
            warnings.warn(IgnoredParameterWarning(f"{where}.base_model: merge_method {method.name} merges the "
                                                  f"slice's sources and has no base (as in MergeKit); ignored"),
                          stacklevel=4)
        return
    if base is not None and all(s.model != base for s in sl.sources):
        what = f"{where}.base_model" if sl.base_model else "the base_model"
        raise ConfigError(f"{where}.sources: merge_method {method.name!r} needs {what} {base} among the "
                          f"slice's sources")
    if sl.base_model is not None and config.tokenizer_section is not None and sl.base_model != config.base_model:
        raise ConfigError(f"{where}.base_model: a slice base other than the global base_model with a "
                          f"tokenizer section is not supported (the vocabulary's base is the global one)")


def _slices(config: MergeConfig, method: MergeMethod, g: _Group, base_ref: str, refs: Sequence[str],
            ckpts: Sequence[Checkpoint], names_of: Sequence[Sequence[str]]) -> list[Slice]:
    def index(model: str) -> int:
        return -1 if model == base_ref and model not in refs else refs.index(model)

    def n_layers(model: str) -> int:
        i = index(model) + 1
        return g.module.n_layers(ckpts[i].config, names_of[i])

    out = []
    for i, sl in enumerate(_group_slices(config, method, g, n_layers)):
        where = f"{g.where}slices[{i}]"
        _check_slice_base(config, method, where, sl)
        lengths = []
        for j, src in enumerate(sl.sources):
            a, b = src.layer_range
            n = n_layers(src.model)
            if not (0 <= a < b <= n or a == b == n == 0):
                raise ConfigError(f"{where}.sources[{j}].layer_range [{a}, {b}] is outside {src.model} "
                                  f"({n} layers): need 0 <= a < b <= {n}")
            lengths.append(b - a)
        if len(set(lengths)) > 1:
            raise ConfigError(f"{where}.sources: layer ranges cover different numbers of layers ({lengths}); "
                              f"every source of a slice needs the same count")

        def source(src) -> Source:
            return Source(index(src.model), src.model, src.layer_range[0], src.parameters)

        bases = [s for s in sl.sources if _is_base_source(config, method, sl, s.model)]
        merged = [source(s) for s in sl.sources if not _is_base_source(config, method, sl, s.model)]
        listed_base = [s for s in sl.sources if s.model == base_ref]
        base_src = source(bases[0] if bases else (listed_base or sl.sources)[0])
        n = len(merged)
        if n < method.min_experts or (method.max_experts is not None and n > method.max_experts):
            most = "" if method.max_experts is None else f" and at most {method.max_experts}"
            raise ConfigError(f"{where}.sources: merge_method {method.name!r} takes at least {method.min_experts}"
                              f"{most} model(s) besides the base, got {n}")
        out.append(Slice(base_src, tuple(merged), lengths[0], sl.parameters, has_base=bool(bases),
                         module=g.module, module_parameters=g.parameters))
    return out


def _check_gradients(config: MergeConfig, base_ref: str, n_layers: int) -> None:
    if n_layers > 0:
        return
    for where, scope in _scopes(config):
        for key, setting in scope.items():
            if is_gradient(setting):
                raise ConfigError(f"{where}.{key}: a gradient (list of values) needs a model with decoder layers; "
                                  f"{base_ref} has none")


def _check_filters(config: MergeConfig, plans: Mapping[str, TensorPlan]) -> None:
    """A filter that matches no tensor (output or input name) is a typo: refused."""
    names = set(plans)
    for p in plans.values():
        names.update(i.name for i in (p.base, *p.experts))
    for where, scope in _scopes(config):
        for key, setting in scope.items():
            for f in filters(setting):
                if not any(f in n for n in names):
                    raise ConfigError(f"{where}.{key}: filter {f!r} matches no tensor of the merge")


def _check_plan(plans: Mapping[str, TensorPlan], ckpts: Sequence[Checkpoint], refs: Sequence[str],
                vocab_rows: int | None) -> None:
    """Every planned input tensor exists with the output's shape (vocabulary rows aside)."""
    for name, p in plans.items():
        shape = None
        for inp in (p.base, *p.experts):
            ckpt, ref = ckpts[inp.index + 1], refs[inp.index + 1]
            if inp.name not in ckpt.tensors:
                raise CheckpointError(f"{ref}: tensor {inp.name!r} is missing (needed for output {name!r})")
            s = tuple(ckpt.tensors[inp.name].shape)
            if shape is None:
                shape = s
            elif s != shape and not (vocab_rows is not None and is_vocab_tensor(name) and s[1:] == shape[1:]):
                raise CheckpointError(f"{ref}: tensor {inp.name!r} has shape {s}, output {name!r} needs {shape}")


def _open(ref: str, option: str, allow_pickle: bool, revision: str | None = None) -> Checkpoint:
    try:
        return Checkpoint.open(ref, allow_pickle=allow_pickle, revision=revision)
    except CheckpointError as e:
        raise CheckpointError(f"{option}: {e}") from None


def pinned_revisions(job: MergeJob) -> dict[str, str]:
    """The commit each hub ref of the job resolved to: workers that prepare the job again read the same
    weights even if a branch moves meanwhile."""
    return {c.source: c.commit for c in [job.base, *job.experts] if c.commit is not None}


def _check_architecture(base: Checkpoint, other: Checkpoint, base_ref: str, ref: str, layers: bool = True) -> None:
    if base.architecture != other.architecture:
        raise CheckpointError(f"{ref}: architecture {other.architecture} differs from the base's "
                              f"{base.architecture} ({base_ref})")
    if num_layers(base.config) != num_layers(other.config):
        raise CheckpointError(f"{ref}: {num_layers(other.config)} layers differ from the base's "
                              f"{num_layers(base.config)}")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads"):
        if key == "num_hidden_layers" and not layers:  # slices may stack models of other depths
            continue
        if base.config.get(key) != other.config.get(key):
            raise CheckpointError(f"{ref}: config {key}={other.config.get(key)} differs from the base's "
                                  f"{base.config.get(key)}")


def _unique(ckpts: Sequence[Checkpoint], refs: Sequence[str]) -> tuple[list[str], list[Checkpoint]]:
    seen: dict[str, Checkpoint] = {}
    for ref, ckpt in zip(refs, ckpts):
        seen.setdefault(ref, ckpt)
    return list(seen), list(seen.values())


def _tokenizer_plan(config: MergeConfig, base: Checkpoint, experts: Sequence[Checkpoint], refs: Sequence[str],
                    base_ref: str) -> tuple[VocabPlan | None, Path, str | None]:
    """(vocabulary plan, tokenizer folder, chat template) of the output, checked before anything is written."""
    vocab, tok_src = _vocab_plan(config, base, experts, refs, base_ref)
    inputs = _unique([base, *experts], [base_ref, *refs])[1]
    return vocab, tok_src, resolve_template(config.chat_template, [c.path for c in inputs])


def _vocab_plan(config: MergeConfig, base: Checkpoint, experts: Sequence[Checkpoint], refs: Sequence[str],
                base_ref: str) -> tuple[VocabPlan | None, Path]:
    """The vocabulary plan (None: no tokenizer section, vocabularies must be equal) and the tokenizer's folder."""
    section = config.tokenizer_section
    if section is None:
        rows = {ref: stored_vocab_rows(c) for ref, c in zip([base_ref, *refs], [base, *experts])}
        if len(set(rows.values())) > 1:
            odd = next(r for r in refs if rows[r] != rows[base_ref])
            raise CheckpointError(
                f"{odd}: vocabulary has {rows[odd]} rows but the base ({base_ref}) has {rows[base_ref]}; "
                f"set tokenizer_source: base (keep the base vocabulary, drop extra rows) or union (extend; new "
                f"rows come from the experts that have them)")
        return None, base.path
    names, ckpts = _unique([base, *experts], [base_ref, *refs])
    plan = build_plan(section, names, ckpts, base_is_set=config.base_model is not None)
    src = ckpts[names.index(section.source)].path if section.source in names else base.path
    return plan, src


def stored_vocab_rows(ckpt: Checkpoint) -> int | None:
    for name in ckpt.names():
        if is_vocab_tensor(name):
            return ckpt.tensors[name].shape[0]
    return None


def _check_tensor_sets(base: Checkpoint, experts: Sequence[Checkpoint], refs: Sequence[str],
                       names: Sequence[str], vocab_rows: int | None) -> None:
    wanted = set(names)
    for ref, ckpt in zip(refs, experts):
        have = {n for n in ckpt.names() if not n.endswith(IGNORED_SUFFIXES)}
        if missing := sorted(wanted - have):
            raise CheckpointError(f"{ref}: tensor {missing[0]!r} is missing (present in the base)")
        if extra := sorted(have - wanted):
            raise CheckpointError(f"{ref}: has tensor {extra[0]!r} that the base lacks")
        for name in names:
            a, b = base.tensors[name].shape, ckpt.tensors[name].shape
            if a == b:
                continue
            if vocab_rows is not None and is_vocab_tensor(name) and a[1:] == b[1:]:
                continue
            raise CheckpointError(f"{ref}: tensor {name!r} has shape {tuple(b)}, the base has {tuple(a)}")


def output_dtype(config: MergeConfig, base: Checkpoint) -> torch.dtype:
    """MergeKit's rule: out_dtype, else dtype, else the base model's. `dtype` is MergeKit's compute dtype
    too; aim-ray computes in float32 whatever it says (validated even when out_dtype overrides it)."""
    compute = parse_dtype(config.dtype, "dtype") if config.dtype is not None else None
    if config.out_dtype:
        return parse_dtype(config.out_dtype, "out_dtype")
    return compute if compute is not None else model_dtype(base)


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
    floats = [i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _output_tensor(base: Checkpoint, name: str, out_dtype: torch.dtype, vocab_rows: int | None,
                   out_name: str | None = None) -> OutputTensor:
    """Output tensor `out_name` (default `name`) shaped as input tensor `name` of `base`."""
    info = base.tensors[name]
    shape = info.shape
    if vocab_rows is not None and is_vocab_tensor(name):
        shape = (vocab_rows, *shape[1:])
    return OutputTensor(out_name or name, tuple(shape), out_dtype if info.dtype.is_floating_point else info.dtype)


# ------------------------------------------------------------------------------------- per-tensor merge


class CheckpointInputs:
    """`TensorInputs` over memory-mapped checkpoints: reads lazily, aligns vocabulary rows, checks finiteness."""

    def __init__(self, job: MergeJob, name: str) -> None:
        self.job = job
        self.name = name
        self.params = job.params_of(name)
        self.n_experts = len(job.plan[name].experts) if job.plan is not None else len(job.experts)
        self._base: torch.Tensor | None = None
        self._checked: set[int] = set()

    def _read(self, index: int) -> torch.Tensor:
        """index -1 is the base, i >= 0 expert i. Float32, a fresh tensor, in the output vocabulary."""
        ckpt, name = self.job.input_of(self.name, index)
        t = ckpt.read(name).to(torch.float32, copy=True)  # safetensors may hand out one shared tensor
        if self.job.check_finite and index not in self._checked:
            # A NaN/Inf anywhere makes the sum non-finite; the sum is one fast reduction with no bool
            # temporary. Only then is the exact elementwise check run (the sum may just have overflowed).
            if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                raise CheckpointError(f"{self._ref(index)}: tensor {name!r} contains NaN or Inf; pass "
                                      f"--allow-nonfinite to merge anyway")
            self._checked.add(index)
        if self._aligned(index):
            return t
        own = self._plan_model(index)
        return self.job.vocab.permute(own, lambda m: t if m == own else self._stored_of(m))

    def _global(self, index: int) -> int:
        """The job-wide index (-1: the base) of this tensor's input `index` (slices renumber the inputs)."""
        if self.job.plan is None:
            return index
        entry = self.job.plan[self.name]
        return entry.base.index if index < 0 else entry.experts[index].index

    def _plan_model(self, index: int) -> int:
        g = self._global(index)
        return 0 if g < 0 else self.job.vocab.refs.index(self.job.expert_refs[g])

    def _stored_of(self, model: int) -> torch.Tensor:
        """The stored tensor of the plan's model `model` (its rows for default embeddings)."""
        if model == 0:
            return self.job.base.read(self.name)
        return self.job.experts[self.job.expert_refs.index(self.job.vocab.refs[model])].read(self.name)

    def _ref(self, index: int) -> str:
        g = self._global(index)
        return "base_model" if g < 0 else self.job.expert_refs[g]

    def base(self) -> torch.Tensor:
        if self._base is None:
            self._base = self._read(-1)
        return self._base.clone()

    def expert(self, i: int) -> torch.Tensor:
        return self._read(i)

    def task_vector(self, i: int) -> torch.Tensor:
        if self._base is None:
            self._base = self._read(-1)
        return self.expert(i).sub_(self._base)

    def mask_key(self, i: int) -> int:
        return mask_seed(self.job.seed, i, self.name)

    def statistic(self, i: int) -> torch.Tensor | None:
        """Expert i's statistics for this tensor (data-aware methods); None where it has none."""
        if self.job.statistics is None:
            raise StatisticsError(f"merge_method {self.job.method.name} needs the experts' statistics, and "
                                  f"none were collected for this merge")
        _, name = self.job.input_of(self.name, i)
        return self.job.statistics.of(self._global(i), name)

    def statistic_norm(self, i: int) -> float:
        """The L2 norm of expert i's statistics over the whole model (Fisher merging normalises by it)."""
        return self.job.statistics.norm(self._global(i))

    def stored(self, i: int) -> torch.Tensor | None:
        """Tensor i (-1: the base) as stored, memory-mapped; None where vocabulary rows must be aligned."""
        ckpt, name = self.job.input_of(self.name, i)
        return ckpt.read(name) if self._aligned(i) else None

    def verify_finite(self) -> None:
        if self.job.check_finite:
            for index in range(-1, self.n_experts):
                self._read(index)

    def _aligned(self, index: int) -> bool:
        """Whether tensor `index` as stored is already in the output vocabulary."""
        plan = self.job.vocab
        if plan is None or not is_vocab_tensor(self.name):
            return True
        ckpt, name = self.job.input_of(self.name, index)
        return plan.identity(self._plan_model(index), ckpt.tensors[name].shape[0])


def compute_delta(job: MergeJob, inputs: CheckpointInputs) -> torch.Tensor:
    """delta_merged of one tensor in float32: from the cache when the job has one, else the method."""
    if job.delta_source is not None:
        return job.delta_source.read(inputs.name).to(torch.float32)
    return job.method.fn(inputs, inputs.params)


def merge_tensor(job: MergeJob, name: str, relax: RelaxFn | None = None) -> torch.Tensor:
    """Merge one tensor (and relax it with AIM when `relax` is given); returns it in the output dtype."""
    ckpt, in_name = job.input_of(name)
    if not ckpt.tensors[in_name].dtype.is_floating_point:
        return ckpt.read(in_name).clone()  # integer buffers are copied from the base
    inputs = CheckpointInputs(job, name)
    if job.method.direct:  # passthrough: the merged tensor itself, no delta
        return job.method.fn(inputs, inputs.params).to(job.out_dtype)
    delta = compute_delta(job, inputs)
    fast = _apply_fused(job, inputs, delta, relax)
    if fast is not None:
        return fast
    theta_pre = inputs.base()
    merged = relax(name, theta_pre, delta) if relax is not None else theta_pre.add_(delta)
    return merged.to(job.out_dtype)


def _apply_fused(job: MergeJob, inputs: CheckpointInputs, delta: torch.Tensor, relax: RelaxFn | None
                 ) -> torch.Tensor | None:
    """theta_pre + delta (or AIM's theta_pre + factor * delta) in the output dtype, in one pass over the stored
    base, when the relaxation hook exposes its factor (`factor(name, shape)`) and the dtypes allow."""
    factor_of = getattr(relax, "factor", None)
    if not fused.enabled() or (relax is not None and factor_of is None):
        return None
    base = inputs.stored(-1)
    if base is None:
        return None
    factor = factor_of(inputs.name, tuple(delta.shape)) if factor_of is not None else None
    applied = kernels.apply_delta(base, delta, factor, job.out_dtype)
    if applied is None:
        return None
    merged, nonfinite_base = applied
    if nonfinite_base:
        inputs.verify_finite()
    return merged


def write_delta(job: MergeJob, out_dir: Path) -> Path:
    """Write every float tensor's float32 delta_merged as a checkpoint directory (atomically), so many
    relaxations (one per omega) share one merge. The directory opens with `Checkpoint.open`."""
    if job.method.direct:
        raise ConfigError(f"merge_method {job.method.name} copies tensors: it has no delta to cache")
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    names = [o.name for o in job.outputs if o.dtype.is_floating_point]
    plan = [OutputTensor(o.name, o.shape, torch.float32) for o in job.outputs if o.name in set(names)]
    writer = ShardWriter(tmp / "model.safetensors", plan, {"aim_ray_delta_of": job.fingerprint()})
    try:
        for out in plan:
            writer.add(out.name, compute_delta(job, CheckpointInputs(job, out.name)))
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "config.json").write_text(json.dumps(job.base.config))
    os.replace(tmp, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ shard writing


def shard_metadata(job: MergeJob, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"aim_ray_version": __version__, "merge_method": job.method.name, **(extra or {})}


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do


def release_free_heap() -> None:
    """Hand the heap pages freed by the last tensor back to the OS (glibc `malloc_trim`). Without it the
    many differently sized float32 buffers of a merge fragment the heap, and peak RSS crept up with the number
    of experts (+22% from 2 to 16) although the live buffers do not."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_merge_threads = 1


def set_merge_threads(threads: int) -> None:
    """How many tensors this process merges at once (each on one core; the kernels release the GIL).
    Every in-flight tensor holds its own buffers: peak heap grows with this, never with the experts."""
    global _merge_threads
    _merge_threads = max(1, int(threads))


# Merged tensors that wait for their turn in the shard (the big ones are computed first): at most this many
# output bytes beyond the one tensor the writer needs next.
LOOKAHEAD_BYTES = 1 << 30


def merged_in_order(job: MergeJob, names: Sequence[str], relax: RelaxFn | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) in the order of `names`, computed by up to `set_merge_threads` threads, largest
    tensors first (so the embedding and the LM head do not leave one core alone at either end). The order of
    work never changes a result (masks are keyed by tensor, not by order): same bytes for any thread count."""
    threads = min(_merge_threads, len(names))
    if threads <= 1:
        for name in names:
            yield name, merge_tensor(job, name, relax)
        return
    size = {o.name: o.nbytes for o in job.outputs}
    by_size = sorted(names, key=lambda n: -size[n])
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per tensor: no OpenMP teams competing with the other threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix="aim-ray-merge")
    futures: dict[str, Future] = {}  # submitted, not yet handed to the writer

    def refill() -> None:
        running = sum(not f.done() for f in futures.values())
        waiting = sum(size[n] for n in futures)
        for big in by_size:
            if running >= threads:
                return
            if big not in futures and (waiting + size[big] <= LOOKAHEAD_BYTES or running == 0):
                futures[big] = pool.submit(merge_tensor, job, big, relax)
                running, waiting = running + 1, waiting + size[big]

    try:
        for name in names:
            if name not in futures:  # the writer needs it next, whatever the budget says
                futures[name] = pool.submit(merge_tensor, job, name, relax)
            by_size.remove(name)
            refill()
            while not futures[name].done():
                wait([f for f in futures.values() if not f.done()], return_when=FIRST_COMPLETED)
                refill()
            yield name, futures.pop(name).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)


def write_shard(job: MergeJob, work_dir: Path, index: int, relax: RelaxFn | None = None,
                metadata: dict[str, str] | None = None, on_tensor: Callable[[str], None] | None = None) -> str:
    """Write shard `index` of the plan into work_dir; return its sha256. The temporary file is unique to this
    attempt (a writer on a partitioned node and its replacement never share one) and renamed into the shard's
    name atomically when complete."""
    shards = job.shards
    final = work_dir / shard_filename(index, len(shards))
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex}.tmp")
    writer = ShardWriter(tmp, shards[index], shard_metadata(job, metadata))
    try:
        for name, tensor in merged_in_order(job, [out.name for out in shards[index]], relax):
            writer.add(name, tensor)
            del tensor
            release_free_heap()
            if on_tensor is not None:
                on_tensor(name)
        digest = writer.close(durable=job.durable)
    except BaseException:
        writer.abort()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    return digest


# --------------------------------------------------------------------------------------------- finalize


def versions() -> dict[str, str]:
    from importlib.metadata import version  # importing transformers only for its version takes ~0.7 s

    return {"aim_ray": __version__, "torch": torch.__version__, "transformers": version("transformers"),
            "safetensors": version("safetensors"), "python": platform.python_version()}


def finalize(job: MergeJob, work_dir: Path, digests: dict[int, str], report: dict[str, Any]) -> None:
    """Index, config, tokenizer and merge report; the caller then commits the directory."""
    shards = job.shards
    write_index(work_dir, shards, {"aim_ray_version": __version__})
    updates: dict[str, Any] = {"torch_dtype": str(job.out_dtype).removeprefix("torch.")}
    if job.vocab_rows is not None:
        updates.update(_vocab_update(job.base.config, job.vocab_rows))
    for key, n in job.layer_counts.items():  # `num_hidden_layers`, `n_layer`, `text_config.num_hidden_layers` ...
        section, _, leaf = key.rpartition(".")
        if section:
            updates[section] = {**updates.get(section, job.base.config[section]), leaf: n}
        else:
            updates[leaf] = n
    rebuilt = job.vocab is not None or job.chat_template is not None
    copy_aux_files(job.base.path, None if rebuilt else job.tokenizer_src, work_dir, updates)
    if rebuilt:
        write_tokenizer(job, work_dir)
    report = {
        "config": job.config.model_dump(mode="json"),
        "seed": job.seed,
        "versions": versions(),
        "shards": {shard_filename(i, len(shards)): digests[i] for i in sorted(digests)},
        "notes": job.notes,
        **report,
    }
    (work_dir / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")


def write_tokenizer(job: MergeJob, work_dir: Path) -> None:
    """The output tokenizer (MergeKit's: built from the tokenizer section, else the base's reserialized) with
    the chat template, saved by transformers so that it reads it back (`chat_template.jinja`)."""
    from .vocab import load_tokenizer

    tok = job.vocab.tokenizer if job.vocab is not None else load_tokenizer(job.tokenizer_src, "base_model")
    if job.chat_template is not None:
        tok.chat_template = job.chat_template
    tok.save_pretrained(str(work_dir))


def _vocab_update(config: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """The config change for a new vocabulary size: top level, or the language model's `text_config` of a
    multimodal model that keeps it there (LLaVA)."""
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        return {"text_config": {**text, "vocab_size": rows}}
    return {"vocab_size": rows}


def run_merge(job: MergeJob, out: str | os.PathLike | OutputDir, *, overwrite: bool = False, resume: bool = False,
              relax: RelaxFn | None = None, metadata: dict[str, str] | None = None,
              report: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Single-process merge: every shard in order, then finalize and commit atomically. `out` may be an
    `OutputDir` (then its own overwrite/resume settings apply)."""
    output = out if isinstance(out, OutputDir) else OutputDir(out, overwrite=overwrite, resume=resume)
    started = time.time()
    with output.locked():  # before anything is deleted or written
        state = Progress(job, output.prepare(), relax, metadata)
        done = state.load(output.resume)  # a refused resume leaves the work dir as it was
        try:
            bar = _progress_bar(job, done, progress)
            for index in range(len(job.shards)):
                if index not in done:
                    state.record(index, write_shard(job, output.work, index, relax, metadata,
                                                    on_tensor=lambda _: bar.update()))
            bar.close()
            timings = {"merge_seconds": round(time.time() - started, 3)}
            finalize(job, output.work, done, {"timings": timings, "resumed_shards": state.resumed_names(),
                                              **(report or {})})
            return output.commit(state.shard_digests(), scratch=[PROGRESS], durable=job.durable)
        except AimRayError as e:
            # Bad input: a work dir with finished shards is kept for --resume, else discarded. A crash or an
            # interrupt keeps it as it is.
            raise output.abandon(e, len(done)) from None
        finally:
            state.close()


def _progress_bar(job: MergeJob, done: Iterable[int], enabled: bool):
    from tqdm.auto import tqdm

    skipped = sum(len(job.shards[i]) for i in done)
    return tqdm(total=len(job.outputs), initial=skipped, unit="tensor", desc="merging", disable=not enabled)
