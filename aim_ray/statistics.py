"""Expert statistics for the data-aware merges, collected on each expert's own data by the calibration stages.

- `gram` (RegMean): per `nn.Linear`, the mean over tokens of `x^T x` of its input `x`, `[in, in]` float32.
  Modules that read the same input tensor (q/k/v, gate/up) share one matrix: it is stored once, under the
  first module that read it, and the others are `aliases` of it.
- `fisher` (Fisher merging): the diagonal empirical Fisher of every floating-point parameter (embeddings and
  biases too): the mean over blocks of the squared gradient of the block's mean next-token log-likelihood.
  A tied embedding is two Parameters in the stages (embedding and head, possibly on different workers): its
  Fisher is the sum of the two squared gradients, i.e. the cross term `2 g_embed g_head` of the exact
  `(g_embed + g_head)^2` is left out, so that no stage needs another stage's gradient.
- `mask` (Localize-and-Stitch with trained masks): per localized parameter a bool mask trained on the expert's
  data over the base (`aim_ray.localize`). It depends on the base too, and on the training hyperparameters:
  both are in its settings, hence in its cache key.

Like the AIM scales, each model's statistics are an artifact (safetensors + provenance), cached under
`$AIM_RAY_CACHE/statistics/<key>.safetensors`, the key being the sha256 of the model's content hash, the data
settings, the compute dtype and the kind. Collecting them for N experts costs N pipeline passes (the driver
runs them one after another on the same workers); each stage only ever holds its own layer range.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from . import __version__
from .architectures import input_embedding
from .calibration import (
    SHUFFLE_SEED,
    InputRecorder,
    SensitivityStage,
    StageRunner,
    backprop_blocks,
    calibration_stages,
    dataset_fingerprint,
    iter_micro_batches,
    load_calibration_blocks,
    load_tokenizer,
    next_token_loss,
    resolve_compute,
    tokenizer_fingerprint,
)
from .checkpoint import TOKENIZER_FILES, Checkpoint, cache_dir, parse_dtype
from .config import CalibrationConfig
from .errors import CalibrationError, StatisticsError
from .localize import MaskTraining, mask_training, train_masks
from .scales import open_checkpoint, save_atomically

if TYPE_CHECKING:
    from .engine import MergeJob

STATISTIC_KINDS = ("gram", "fisher", "mask")
FORMAT = "aim-ray-statistics/1"


# ------------------------------------------------------------------------------------------- recorders


class GramRecorder(InputRecorder):
    """`sum over tokens of x^T x` (float32) of every Linear's input, and the token counts. A module whose input
    is the very tensor the module before it read (q/k/v, gate/up) records nothing: it is an alias."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.aliases: dict[str, str] = {}  # module -> the module whose (identical) input it recorded
        self._last: tuple[torch.Tensor, str] | None = None  # held: its memory cannot be reused meanwhile
        super().__init__(modules)

    @staticmethod
    def records(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def add(self, name: str, x: torch.Tensor) -> None:
        if self._last is not None and self._last[0] is x:
            self.aliases[name] = self._last[1]
            return
        self._last = (x, name)
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self._accumulate(name, flat.T @ flat, flat.shape[0])

    def remove(self) -> None:
        self._last = None
        super().remove()


class FisherStage(SensitivityStage):
    """Sum over blocks of the squared gradient of the block's mean next-token log-likelihood, for every
    floating-point parameter of one stage. The same stage-by-stage backward as the sensitivity scales."""

    @staticmethod
    def _parameters(runner: StageRunner) -> dict[str, nn.Parameter]:
        return runner.trainable_parameters()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return next_token_loss(logits, labels)

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        g = grad.float()
        self.sums[name].addcmul_(g, g)

    def scales(self) -> dict[str, torch.Tensor]:
        """The Fisher sums (not yet averaged); `finish_fisher` divides by the blocks."""
        square = self.loss_scale * self.loss_scale
        return {name: (s / square if square != 1.0 else s).cpu() for name, s in self.sums.items()}


def start_stage(runner: StageRunner, kind: str) -> Any:
    """The recording object of `kind` over `runner` (gram: the runner itself, recording; fisher: a stage)."""
    if kind == "gram":
        runner.start_recording(GramRecorder)
        return runner
    if kind == "fisher":
        return FisherStage(runner)
    raise StatisticsError(f"statistics kind {kind!r} has no stage of its own here (gram, fisher; masks: "
                          f"localize.MaskStage)")


def finish_fisher(ckpt: Checkpoint, sums: Mapping[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """Mean over blocks, keyed by the checkpoint's tensor names: a tied head that is not stored adds its
    Fisher to the embedding's (see the module docstring)."""
    fisher = {name: s / n_blocks for name, s in sums.items()}
    stored = set(ckpt.names())
    for name in [n for n in fisher if n not in stored]:
        embedding = input_embedding(ckpt.names())
        if name.endswith("lm_head.weight") and embedding in fisher:
            fisher[embedding] = fisher[embedding] + fisher.pop(name)
        else:
            raise StatisticsError(f"{ckpt.path}: the Fisher has parameter {name!r}, which the checkpoint does "
                                  f"not store")
    return fisher


# ------------------------------------------------------------------------------------------- collection


def collect_statistics(model: str | os.PathLike | Checkpoint, blocks: torch.Tensor, kind: str,
                       layer_ranges: Sequence[tuple[int, int]] | None = None, micro_batch: int = 4,
                       dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, aliases) of `kind` for `model` on `blocks`, running its stages one after another in process
    (the Ray pipeline computes the same per stage)."""
    ckpt = open_checkpoint(model)
    ranges = calibration_stages(ckpt, layer_ranges)
    last = len(ranges) - 1
    stages = [start_stage(StageRunner(ckpt, a, b, k == 0, k == last, dtype, device), kind)
              for k, (a, b) in enumerate(ranges)]
    if kind == "gram":
        for batch in tqdm(iter_micro_batches(blocks, micro_batch), desc=f"gram {ckpt.path.name}", unit="batch",
                          total=-(-blocks.shape[0] // micro_batch), disable=None, leave=False):
            x = batch
            for runner in stages:
                x = runner.forward(x)
        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        for runner in stages:
            aliases.update(runner.recorder.aliases)
            tensors.update(runner.stop_recording() or {})
        return tensors, aliases
    backprop_blocks(stages, blocks, f"fisher {ckpt.path.name}", labels=True)
    sums: dict[str, torch.Tensor] = {}
    for stage in stages:
        sums.update(stage.scales())
    return finish_fisher(ckpt, sums, blocks.shape[0]), {}


# --------------------------------------------------------------------------------------------- artifact


@dataclass
class ModelStatistics:
    """One model's statistics of one kind on one dataset, with the provenance needed to reuse them."""

    tensors: dict[str, torch.Tensor]
    kind: str
    model: str
    content_hash: str
    settings: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)
    n_blocks: int = 0
    norm: float | None = None  # L2 norm over every tensor (Fisher merging normalises by it); computed if None
    aim_ray_version: str = __version__

    def __post_init__(self) -> None:
        if self.kind not in STATISTIC_KINDS:
            raise StatisticsError(f"statistics kind must be one of {STATISTIC_KINDS}, got {self.kind!r}")
        for name, t in self.tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise StatisticsError(f"{self.model}: {self.kind} statistics of {name!r} are not finite "
                                      f"(overflow? use dtype float32 or bfloat16)")
        if self.norm is None:
            squares = sum(float(torch.sum(t.double() ** 2)) for _, t in sorted(self.tensors.items()))
            self.norm = squares ** 0.5

    def of(self, tensor: str) -> torch.Tensor | None:
        """The statistics a merge uses for checkpoint tensor `tensor` (None: the method's fallback)."""
        if self.kind in ("fisher", "mask"):  # keyed by tensor name
            return self.tensors.get(tensor)
        if not tensor.endswith(".weight"):
            return None
        module = tensor.removesuffix(".weight")
        return self.tensors.get(self.aliases.get(module, module))

    def keys_for(self, tensors: Sequence[str]) -> set[str]:
        keys = set()
        for t in tensors:
            if self.kind in ("fisher", "mask"):
                keys.add(t)
            elif t.endswith(".weight"):
                module = t.removesuffix(".weight")
                keys.add(self.aliases.get(module, module))
        return keys & set(self.tensors)

    def restricted(self, tensors: Sequence[str]) -> ModelStatistics:
        """The same statistics holding only what `tensors` need (what one shard's writer receives)."""
        keys = self.keys_for(tensors)
        return ModelStatistics({k: self.tensors[k] for k in sorted(keys)}, self.kind, self.model,
                               self.content_hash, self.settings,
                               {m: c for m, c in self.aliases.items() if c in keys}, self.n_blocks,
                               self.norm, self.aim_ray_version)

    def fingerprint(self) -> str:
        payload = json.dumps({"kind": self.kind, "content_hash": self.content_hash, "settings": self.settings},
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "kind": self.kind, "model": self.model, "content_hash": self.content_hash,
                "settings": json.dumps(self.settings, sort_keys=True, default=str),
                "aliases": json.dumps(self.aliases, sort_keys=True), "n_blocks": str(self.n_blocks),
                "norm": repr(self.norm), "aim_ray_version": self.aim_ray_version}

    def save(self, path: str | os.PathLike) -> Path:
        return save_atomically(path, self.tensors, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelStatistics:
        path = Path(path).expanduser()
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:  # noqa: BLE001 - any safetensors failure is a bad artifact
            raise StatisticsError(f"{path}: not a readable statistics file ({e})") from None
        if meta.get("format") != FORMAT:
            raise StatisticsError(f"{path}: not an aim-ray statistics artifact (format {meta.get('format')!r})")
        return cls(tensors=tensors, kind=meta["kind"], model=meta["model"], content_hash=meta["content_hash"],
                   settings=json.loads(meta["settings"]), aliases=json.loads(meta["aliases"]),
                   n_blocks=int(meta["n_blocks"]), norm=float(meta["norm"]),
                   aim_ray_version=meta["aim_ray_version"])


@dataclass
class JobStatistics:
    """The statistics a data-aware merge uses: one `ModelStatistics` per expert (in `models` order)."""

    kind: str
    experts: list[ModelStatistics]

    def of(self, expert: int, tensor: str) -> torch.Tensor | None:
        return self.experts[expert].of(tensor)

    def norm(self, expert: int) -> float:
        return float(self.experts[expert].norm)

    def restricted(self, tensors: Sequence[str]) -> JobStatistics:
        return JobStatistics(self.kind, [s.restricted(tensors) for s in self.experts])

    def fingerprint(self) -> str:
        return hashlib.sha256("|".join(s.fingerprint() for s in self.experts).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "experts": [{"model": s.model, "n_blocks": s.n_blocks, **s.settings}
                                               for s in self.experts]}


# ------------------------------------------------------------------------------------------------ cache


def data_settings(data: CalibrationConfig, tokenizer_path: Path, dtype: str) -> dict[str, Any]:
    """What changes a model's statistics besides its weights and the kind (not the device, nor micro_batch)."""
    return {"dataset": dataset_fingerprint(str(data.dataset), data.split), "n_samples": data.n_samples,
            "block_size": data.block_size, "n_blocks": data.n_blocks, "dtype": str(parse_dtype(dtype)),
            "tokenizer": tokenizer_fingerprint(tokenizer_path), "shuffle_seed": SHUFFLE_SEED}


def statistics_cache_path(ckpt: Checkpoint, settings: Mapping[str, Any], kind: str,
                          root: str | os.PathLike | None = None) -> Path:
    payload = json.dumps({"model": ckpt.content_hash(), "settings": dict(settings), "kind": kind},
                         sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()
    base = Path(root).expanduser() if root is not None else Path(cache_dir()).expanduser() / "statistics"
    return base / f"{key}.safetensors"


def tokenizer_dir(model: Checkpoint, base: Checkpoint) -> Path:
    """The model's own tokenizer, else the base's (experts often ship without one)."""
    return model.path if any((model.path / f).is_file() for f in TOKENIZER_FILES) else base.path


def data_blocks(data: CalibrationConfig, tokenizer_path: Path, label: str) -> torch.Tensor:
    try:
        return load_calibration_blocks(load_tokenizer(tokenizer_path), data.dataset, data.n_samples,
                                       data.block_size, data.n_blocks, data.split)
    except CalibrationError as e:
        raise StatisticsError(f"{label}: data: {e}") from None


class Collector(Protocol):
    """Computes a model's statistics: in this process (`InProcess`) or on the Ray pipeline (the driver's)."""

    def dtype(self, data: CalibrationConfig) -> str:
        """The resolved compute dtype for `data` (part of the cache key)."""
        ...

    def collect(self, model: Checkpoint, blocks: torch.Tensor, kind: str, data: CalibrationConfig, dtype: str,
                base: Checkpoint | None = None, training: MaskTraining | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """`base` and `training`: kind "mask" only (the masks are trained over the base)."""
        ...


class InProcess:
    """The whole model as one stage in this process (the single-process merge)."""

    def dtype(self, data: CalibrationConfig) -> str:
        return resolve_compute(data.device, data.dtype)[1]

    def collect(self, model: Checkpoint, blocks: torch.Tensor, kind: str, data: CalibrationConfig, dtype: str,
                base: Checkpoint | None = None, training: MaskTraining | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        device, _ = resolve_compute(data.device, dtype)
        if kind == "mask":
            return train_masks(base, model, blocks, training, None, dtype, device), {}
        return collect_statistics(model, blocks, kind, None, data.micro_batch, dtype, device)


def model_statistics(model: Checkpoint, base: Checkpoint, data: CalibrationConfig, kind: str, label: str,
                     collector: Collector | None = None, cache_root: str | os.PathLike | None = None,
                     training: MaskTraining | None = None) -> ModelStatistics:
    """`model`'s statistics of `kind` on `data`, from the cache or collected and cached. Kind "mask" needs
    `training`; its key also holds the base's content hash and the training hyperparameters."""
    collector = collector or InProcess()
    dtype = collector.dtype(data)
    tok = tokenizer_dir(model, base)
    settings = data_settings(data, tok, dtype)
    if kind == "mask":
        if training is None:
            raise StatisticsError("mask statistics need their training hyperparameters")
        settings.update(base=base.content_hash(), training=training.settings())
    path = statistics_cache_path(model, settings, kind, cache_root)
    if path.exists():
        return ModelStatistics.load(path)
    blocks = data_blocks(data, tok, label)
    tensors, aliases = collector.collect(model, blocks, kind, data, dtype, base=base, training=training)
    stats = ModelStatistics(tensors, kind, model.source, model.content_hash(), settings, aliases,
                            int(blocks.shape[0]))
    stats.save(path)
    return stats


def job_statistics(job: MergeJob, collector: Collector | None = None,
                   cache_root: str | os.PathLike | None = None) -> JobStatistics | None:
    """The statistics `job.method` reads, one artifact per expert on its own `data:` (cached), or None for a
    method that reads none. `collector` computes a missing artifact (default: in this process)."""
    kind = job.method.statistics
    if kind is None:
        return None
    data_of = {}
    for entry in job.config.models or []:
        data_of.setdefault(entry.model, entry.data)
    experts = [model_statistics(ckpt, job.base, data_of[ref], kind, f"models entry {ref!r}", collector,
                                cache_root, mask_training(job, i) if kind == "mask" else None)
               for i, (ref, ckpt) in enumerate(zip(job.expert_refs, job.experts, strict=True))]
    return JobStatistics(kind, experts)


def attach_statistics(job: MergeJob, collector: Collector | None = None,
                      cache_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Collect (or load) the statistics `job` needs into `job.statistics`; the report section (timed)."""
    import time

    started = time.perf_counter()
    job.statistics = job_statistics(job, collector, cache_root)
    if job.statistics is None:
        return {}
    return {"statistics": {**job.statistics.describe(), "seconds": round(time.perf_counter() - started, 3)}}


def check_data(method: str, refs: Sequence[str], datas: Sequence[CalibrationConfig | None]) -> None:
    """A data-aware method needs `data` on every model, and a local data file must exist: one-line errors
    before anything is computed or written."""
    for ref, data in zip(refs, datas, strict=True):
        if data is None:
            raise StatisticsError(f"merge_method {method} needs data: models entry {ref!r} has no `data:` "
                                  f"(a dataset id or a local .jsonl/.json/.txt/.parquet file)")
        path = Path(data.dataset).expanduser()
        looks_local = data.dataset.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES
        if looks_local and not path.exists():
            raise StatisticsError(f"models entry {ref!r}: data file {data.dataset} not found")


LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
