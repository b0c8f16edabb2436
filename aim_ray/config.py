"""Validated configs (pydantic). The merge config is MergeKit's YAML schema plus an `aim:` section.

    merge_method: ties
    base_model: meta-llama/Llama-2-13b-hf
    models:
      - model: WizardLMTeam/WizardLM-13B-V1.2
        parameters: {weight: 1.0, density: 0.5}     # a value may be a gradient [0.3, 0.7] or filtered
    parameters: {normalize: true}                     # [{filter: mlp, value: 0.5}, {value: 0.3}]
    # or, instead of models: slices: [{sources: [{model, layer_range: [a, b], parameters}], parameters}]
    # or modules: {text_decoder: {slices: [...]}, vision_tower: {models: [...]}, ...}
    dtype: float32            # MergeKit's compute dtype (aim-ray always computes in float32) and output dtype
    out_dtype: bfloat16       # the output dtype: out_dtype, else dtype, else the base model's
    tokenizer_source: base    # or tokenizer: {source, tokens, pad_to_multiple_of}; chat_template: auto|NAME|JINJA
    aim:
      omega: 0.4
      scales: scales.safetensors          # or:
      calibration: {dataset: mit-han-lab/pile-val-backup, n_samples: 256, block_size: 512,
                    device: auto, dtype: auto}     # auto: cuda + bfloat16 with a GPU, else cpu + float32
      kind: activation                    # or sensitivity

Everything is checked here or in `engine.prepare` before a tensor is read or a file written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError

DEFAULT_CALIBRATION_DATASET = "mit-han-lab/pile-val-backup"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str  # a directory or hub id (org/name[@rev]), or MergeKit's MODEL+LORA (`aim_ray.lora`)
    parameters: dict[str, Any] = Field(default_factory=dict)
    # The model's own data, for the data-aware methods (regmean, fisher, trained localize_stitch): the
    # calibration loader's settings, or just a dataset id / local file.
    data: CalibrationConfig | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v: Any) -> Any:
        return {"dataset": v} if isinstance(v, str) else v


class InputSlice(_Strict):
    """One source of an output slice: layers [a, b) of `model` (MergeKit's InputSliceDefinition)."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class OutputSlice(_Strict):
    """Output layers made from one layer range of each source (MergeKit's OutputSliceDefinition). `base_model`
    overrides the global one for this slice; `residual_weight` is accepted and ignored, as MergeKit does."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class OutputModule(_Strict):
    """One module of a multimodal model (MergeKit's OutputModuleDefinition): its own slices or models."""

    slices: list[OutputSlice] | None = Field(None, min_length=1)
    models: list[ModelEntry] | None = Field(None, min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("models", mode="before")
    @classmethod
    def _models_list(cls, v: Any) -> Any:
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _one_form(self) -> OutputModule:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of models or slices")
        return self


class CalibrationConfig(_Strict):
    dataset: str = DEFAULT_CALIBRATION_DATASET
    split: str = "validation"
    n_samples: int = Field(256, gt=0)
    block_size: int = Field(512, gt=0)
    n_blocks: int | None = Field(None, gt=0)
    micro_batch: int = Field(4, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (`calibration.resolve_compute`)
    dtype: str = "auto"  # compute dtype: auto | float32 | bfloat16 | float16; the scales accumulate in float32

    @field_validator("device", "dtype")
    @classmethod
    def _compute(cls, v: str, info: ValidationInfo) -> str:
        from .calibration import check_device, check_dtype
        from .errors import CalibrationError

        try:
            return check_device(v) if info.field_name == "device" else check_dtype(v)
        except CalibrationError as e:
            raise ValueError(str(e)) from None


class AimConfig(_Strict):
    omega: float = Field(0.4, ge=0.0, le=1.0)
    kind: Literal["activation", "sensitivity"] = "activation"
    scales: str | None = None
    calibration: CalibrationConfig | None = None
    force: bool = False  # accept scales computed for another base (content hash mismatch)

    @model_validator(mode="after")
    def _one_source(self) -> AimConfig:
        if self.scales is not None and self.calibration is not None:
            raise ValueError("give either aim.scales or aim.calibration, not both")
        return self

    def calibration_or_default(self) -> CalibrationConfig:
        return self.calibration or CalibrationConfig()


class ZeroEmbedding(_Strict):
    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """The row of `token` (or `token_id`) in `model`'s own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class TokenEmbeddingConfig(_Strict):
    """MergeKit's `tokenizer.tokens.<token>`: where its embedding row comes from; `force` uses that source for
    every model even where the model has the token."""

    source: ZeroEmbedding | ModelTokenEmbedding | str | None = None
    force: bool = False


class TokenizerConfig(_Strict):
    source: str = "union"  # base | union | <one of the merged models>
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = Field(None, min_length=1)
    slices: list[OutputSlice] | None = Field(None, min_length=1)  # instead of models (`aim_ray.slices`)
    modules: dict[str, OutputModule] | None = Field(None, min_length=1)  # per module (`aim_ray.slices.Module`)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None  # MergeKit's newer form: tokenizer: {source, tokens, pad_to_multiple_of}
    chat_template: str | None = None  # auto | a built-in name (chat_template.BUILTIN) | a Jinja template
    aim: AimConfig | None = None
    name: str | None = None  # free-form label (MergeKit ignores unknown top-level keys; we do not)

    @field_validator("models", mode="before")
    @classmethod
    def _models_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @model_validator(mode="after")
    def _one_form_each(self) -> MergeConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both")
        if sum(x is not None for x in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("give exactly one of models, slices or modules")
        return self

    @property
    def tokenizer_section(self) -> TokenizerConfig | None:
        """`tokenizer:`, or the legacy `tokenizer_source: X` as `tokenizer: {source: X}`."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerConfig(source=self.tokenizer_source) if self.tokenizer_source is not None else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_config(model: type[BaseModel], data: Any, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a MergeKit-schema YAML; relative model paths are resolved against the YAML's folder."""
    path = Path(path)
    config = parse_config(MergeConfig, read_yaml(path), str(path))
    return resolve_relative_paths(config, path.parent)


def _resolve(ref: str | None, root: Path) -> str | None:
    if ref is not None and "+" in ref and not (root / ref).exists() and not Path(ref).exists():
        return "+".join(_resolve(part, root) or part for part in ref.split("+"))  # MergeKit's model+lora
    if ref is None or Path(ref).is_absolute():
        return ref
    candidate = root / ref
    return str(candidate.resolve()) if candidate.exists() else ref


def resolve_relative_paths(config: MergeConfig, root: Path) -> MergeConfig:
    update: dict[str, Any] = {"base_model": _resolve(config.base_model, root)}
    if config.models is not None:
        update["models"] = [m.model_copy(update={"model": _resolve(m.model, root)}) for m in config.models]
    if config.slices is not None:
        update["slices"] = [_resolve_slice(s, root) for s in config.slices]
    if config.modules is not None:
        update["modules"] = {name: m.model_copy(update={
            "slices": None if m.slices is None else [_resolve_slice(s, root) for s in m.slices],
            "models": None if m.models is None else [e.model_copy(update={"model": _resolve(e.model, root)})
                                                     for e in m.models]}) for name, m in config.modules.items()}
    if config.tokenizer is not None:
        update["tokenizer"] = _resolve_tokenizer(config.tokenizer, root)
    elif config.tokenizer_source not in (None, "base", "union"):
        update["tokenizer_source"] = _resolve(config.tokenizer_source, root)
    if config.aim is not None and config.aim.scales is not None:
        update["aim"] = config.aim.model_copy(update={"scales": _resolve(config.aim.scales, root)})
    return config.model_copy(update=update)


def _resolve_slice(sl: OutputSlice, root: Path) -> OutputSlice:
    sources = [src.model_copy(update={"model": _resolve(src.model, root)}) for src in sl.sources]
    return sl.model_copy(update={"sources": sources, "base_model": _resolve(sl.base_model, root)})


def _resolve_tokenizer(tok: TokenizerConfig, root: Path) -> TokenizerConfig:
    def source(src: Any) -> Any:
        if isinstance(src, str):
            return _resolve(src, root)
        if isinstance(src, ModelTokenEmbedding):
            return src.model_copy(update={"model": _resolve(src.model, root)})
        return src

    update: dict[str, Any] = {}
    if tok.source not in ("base", "union"):
        update["source"] = _resolve(tok.source, root)
    if tok.tokens:
        update["tokens"] = {t: e.model_copy(update={"source": source(e.source)}) for t, e in tok.tokens.items()}
    return tok.model_copy(update=update)


class EvalConfig(_Strict):
    """How trials are scored (lm-evaluation-harness through long-lived evaluation actors)."""

    suite: str = "toy"  # paper | toy | comma-separated lm-eval task names
    backend: Literal["hf", "vllm"] = "hf"
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_actors: int | None = Field(None, gt=0)  # evaluation actors serving trials at once; default one per GPU
    timeout_s: float = Field(3600.0, gt=0)  # one model's evaluation (a hung actor fails the trial, not the sweep)
    cache_scores: bool = True  # a trial model with the bytes of one scored before reuses its scores
    tensor_parallel_size: int = Field(1, gt=0)
    allow_code_execution: bool = False
    include_path: str | None = None  # extra lm-eval task YAMLs
    # general-ability tasks (each one of the evaluated tasks): every trial reports MergeBench's forgetting on
    # them against the base model (`metrics.forgetting`); empty: no forgetting columns
    general_tasks: list[str] = Field(default_factory=list)

    @field_validator("general_tasks")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class TuneSweepConfig(_Strict):
    """`aim-ray tune` config: a grid over merge methods (and their parameters) x omega.

        base_model: ...
        models: [{model: ..., parameters: {weight: 1.0, density: 0.5}}, ...]
        methods: [ties, dare_ties, task_arithmetic]
        method_grid: {density: [0.5, 0.7]}      # optional, applied to every expert
        omegas: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        calibration: {n_samples: 256, block_size: 512}
        eval: {suite: paper, backend: vllm, num_gpus: 1, general_tasks: [mmlu]}
    """

    base_model: str
    models: list[ModelEntry] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    method_grid: dict[str, list[Any]] = Field(default_factory=dict)
    omegas: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], min_length=1)
    kind: Literal["activation", "sensitivity"] = "activation"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    scales: str | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tokenizer_source: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    search: Literal["grid", "optuna"] = "grid"
    num_samples: int = Field(16, gt=0)  # optuna trials
    max_concurrent_trials: int | None = Field(None, gt=0)
    trial_cpus: float = Field(1.0, gt=0)  # CPUs a trial reserves (relax + write; scoring runs on the eval actors)
    expert_for_task: dict[str, str] | None = None  # task -> model, for normalised performance
    storage: str | None = None  # shared dir for scales, deltas, trial models, results (`--storage` overrides)

    @field_validator("models", mode="before")
    @classmethod
    def _models_list(cls, v: Any) -> Any:
        return MergeConfig._models_list(v)

    @field_validator("omegas")
    @classmethod
    def _omegas_in_range(cls, v: list[float]) -> list[float]:
        bad = [w for w in v if not 0.0 <= w <= 1.0]
        if bad:
            raise ValueError(f"every omega must be in [0, 1], got {bad}")
        return sorted(set(v))

    @field_validator("method_grid")
    @classmethod
    def _grid_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"method_grid.{empty[0]} is empty")
        return v


def load_tune_config(path: str | Path) -> TuneSweepConfig:
    path = Path(path)
    config = parse_config(TuneSweepConfig, read_yaml(path), str(path))
    models = [m.model_copy(update={"model": _resolve(m.model, path.parent)}) for m in config.models]
    return config.model_copy(update={"models": models, "base_model": _resolve(config.base_model, path.parent),
                                     "scales": _resolve(config.scales, path.parent),
                                     "storage": _storage_path(config.storage, path.parent)})


def _storage_path(storage: str | None, root: Path) -> str | None:
    """A sweep's storage named in its config: relative to the config's directory (it need not exist yet)."""
    if storage is None or Path(storage).expanduser().is_absolute():
        return storage
    return str((root / storage).absolute())
