"""MergeKit's `model+lora` inputs: a PEFT LoRA adapter applied lazily, tensor by tensor, never written out.

MergeKit reads `path_or_id+lora_path_or_id` (a model, then one `+` and an adapter; either may be a local
directory or a hub id, `@revision` allowed) by loading the model, merging the adapter with PEFT's
`merge_and_unload` and saving the result in its LoRA cache. Here nothing is saved: `LoraCheckpoint` is the model
with the adapter applied to each tensor as it is read, with PEFT's arithmetic (peft 0.21, `tuners/lora/layer.py`):

- Linear targets (`*.lora_A.weight`, `*.lora_B.weight`): W' = W + (B @ A) * scale, computed in float32 and
  rounded once to W's dtype (PEFT keeps the adapter in float32 and adds its delta into W in place). GPT-2's
  Conv1D layers store W transposed: the delta is transposed too (PEFT forces fan_in_fan_out for them).
- Embedding targets (`*.lora_embedding_A/B`): W' = W + ((B @ A)^T * scale) rounded to W's dtype first, as
  PEFT's `Embedding.merge` adds it.
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern` and `alpha_pattern` are
  matched against the module name as PEFT's `get_pattern_key` does.
- Any other tensor the adapter holds (`modules_to_save`, the `*.base_layer.weight` PEFT saves for embedding
  targets, saved biases) replaces the model's, cast to its dtype, before a delta is added, as loading does.

The adapter's saved tensors name the modules it changes; `target_modules` is not matched again (a targeted
module without saved tensors keeps PEFT's zero-initialised B: no change). Everything is checked when the
reference is opened, from headers only; LoRA variants PEFT merges differently are refused by name.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import Checkpoint, TensorInfo, _file_tensor_infos, files_hash, hub_reference, sha256_file
from .errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT saves the wrapped model's names under this prefix

# Config options whose adapters PEFT does not merge as W + scale * B @ A (or that change the model otherwise).
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a trained bias in lora_B",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "trainable_token_indices": "trainable token rows",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
# init_lora_weights values that change the base weights when PEFT loads the adapter (or make it a variant).
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "orthogonal", "lora_ga", "mica")
# Model types whose attention/MLP projections are transformers' Conv1D (weight stored as (in, out)).
CONV1D_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_NAMES = {"c_attn", "q_attn", "c_proj", "c_fc"}

_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)")


def split_reference(text: str) -> tuple[str, str]:
    """(model, adapter) of MergeKit's `model+lora`; it splits on every `+`, and so does this."""
    parts = text.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise CheckpointError(f"{text}: a LoRA reference is MODEL+ADAPTER (exactly one '+', both given)")
    return parts[0], parts[1]


def _split_revision(revision: str | None) -> tuple[str | None, str | None]:
    """A pinned `model_commit+adapter_commit` (`LoraCheckpoint.commit`); a plain revision pins the model."""
    if revision is None:
        return None, None
    model, plus, adapter = revision.partition("+")
    return model or None, (adapter or None) if plus else None


def open_lora_checkpoint(text: str, revision: str | None = None, allow_pickle: bool = False) -> LoraCheckpoint:
    model_ref, adapter_ref = split_reference(text)
    model_rev, adapter_rev = _split_revision(revision)
    model = Checkpoint.open(model_ref, revision=model_rev, allow_pickle=allow_pickle)
    adapter = LoraAdapter.open(adapter_ref, adapter_rev, allow_pickle)
    return LoraCheckpoint(model, adapter, text)


# ------------------------------------------------------------------------------------------------ adapter


@dataclass(frozen=True)
class LoraPair:
    """One adapted tensor: the adapter's A and B keys, PEFT's scale, and how the delta is laid out."""

    a: str
    b: str
    scale: float
    transpose: bool  # embeddings and Conv1D: the delta is (B @ A)^T
    embedding: bool  # PEFT rounds an embedding's delta to the weight's dtype before adding it


class LoraAdapter:
    """A PEFT LoRA adapter directory (local, or downloaded from the hub): its config and lazily read tensors."""

    def __init__(self, path: Path, source: str, config: dict[str, Any], infos: dict[str, TensorInfo],
                 pickled: bool, commit: str | None = None, repo_id: str | None = None) -> None:
        self.path = path
        self.source = source
        self.config = config
        self.infos = infos
        self.pickled = pickled
        self.commit = commit
        self.repo_id = repo_id
        self._lock = threading.Lock()
        self._data: Any = None
        self._hash: str | None = None

    @classmethod
    def open(cls, ref: str, revision: str | None = None, allow_pickle: bool = False) -> LoraAdapter:
        path = Path(ref).expanduser()
        commit = repo_id = None
        if not path.exists():
            try:
                repo_id, ref_revision = hub_reference(ref)
            except CheckpointError as e:
                raise CheckpointError(str(e).replace("checkpoint directory", "LoRA adapter directory")) from None
            path, commit = _download_adapter(repo_id, revision or ref_revision)
        elif not path.is_dir():
            raise CheckpointError(f"{ref}: expected a LoRA adapter directory, found a file")
        config = read_adapter_config(path, ref)
        file, pickled = _weights_file(path, ref, allow_pickle)
        return cls(path, ref, config, _tensor_infos(file, pickled, ref), pickled, commit, repo_id)

    @property
    def ref(self) -> str:
        return f"{self.repo_id}@{self.commit}" if self.repo_id else str(self.path)

    @property
    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, *sorted({i.file for i in self.infos.values()})]

    def tensor(self, key: str) -> torch.Tensor:
        with self._lock:
            if self._data is None:
                file = self.infos[key].file
                self._data = (torch.load(file, map_location="cpu", weights_only=True, mmap=True) if self.pickled
                              else safe_open(str(file), framework="pt"))
        return self._data[key] if self.pickled else self._data.get_tensor(key)

    def content_hash(self) -> str:
        """sha256 over the adapter's config and weights (the scale is in the config)."""
        if self._hash is None:
            self._hash = files_hash((f.name, sha256_file(f)) for f in self.files)
        return self._hash

    def close(self) -> None:
        with self._lock:
            self._data = None


def read_adapter_config(path: Path, ref: str) -> dict[str, Any]:
    """adapter_config.json, checked: a plain LoRA adapter PEFT merges as W + scale * B @ A."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{ref}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ref}/{ADAPTER_CONFIG}: invalid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{ref}/{ADAPTER_CONFIG}: peft_type {kind!r} is not LORA; only LoRA adapters apply "
                              f"as model+lora")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{ref}/{ADAPTER_CONFIG}: {key}: {config[key]!r} ({what}) is not supported; "
                                  f"merge the adapter with PEFT's merge_and_unload and give the merged model")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise CheckpointError(f"{ref}/{ADAPTER_CONFIG}: init_lora_weights: {init!r} is not supported (PEFT changes "
                              f"the base weights when it loads such an adapter); convert it to a plain LoRA first")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, int | float):
        raise CheckpointError(f"{ref}/{ADAPTER_CONFIG}: needs a positive integer r and a number lora_alpha "
                              f"(got r={r!r}, lora_alpha={alpha!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"{ref}/{ADAPTER_CONFIG}: {key} must be a mapping")
    return config


def _download_adapter(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The adapter's config and safetensors weights into the HF cache; (snapshot dir, commit)."""
    from .hub import _download

    snapshot = Path(_download(repo_id, ADAPTER_CONFIG, revision)).parent  # resolves the commit
    _download(repo_id, ADAPTER_SAFE, snapshot.name)
    return snapshot, snapshot.name


def _weights_file(path: Path, ref: str, allow_pickle: bool) -> tuple[Path, bool]:
    if (path / ADAPTER_SAFE).is_file():
        return path / ADAPTER_SAFE, False
    if (path / ADAPTER_BIN).is_file():
        if not allow_pickle:
            raise CheckpointError(f"{ref}: only pickle weights ({ADAPTER_BIN}) found; pickle files can run "
                                  f"arbitrary code when loaded. Convert to safetensors, or pass --allow-pickle "
                                  f"(loads with torch.load(weights_only=True))")
        return path / ADAPTER_BIN, True
    raise CheckpointError(f"{ref}: no {ADAPTER_SAFE} (not a PEFT adapter directory)")


def _tensor_infos(file: Path, pickled: bool, ref: str) -> dict[str, TensorInfo]:
    infos = {i.name: i for i in _file_tensor_infos(file, pickled)}  # headers checked as a model's are
    if not infos:
        raise CheckpointError(f"{ref}: {file.name} holds no tensors")
    return infos


# ------------------------------------------------------------------------------------------ applying it


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern key that matches the end of the module name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


class LoraCheckpoint(Checkpoint):
    """A model with a LoRA adapter applied as each tensor is read: the model's names, shapes, dtypes, config and
    tokenizer (its `path`); the content hash covers both. Validated against the model's headers when built."""

    def __init__(self, model: Checkpoint, adapter: LoraAdapter, source: str) -> None:
        super().__init__(model.path, model.tensors, model.config, source, model.pickled)
        self.model = model
        self.adapter = adapter
        if model.commit is not None or adapter.commit is not None:  # pins both for `pinned_revisions`
            self.commit = f"{model.commit or ''}+{adapter.commit or ''}"
        self.pairs: dict[str, LoraPair] = {}
        self.replaced: dict[str, str] = {}  # model tensor -> adapter key that replaces it
        self._plan()

    @property
    def ref(self) -> str:
        return f"{self.model.ref}+{self.adapter.ref}"

    @property
    def files(self) -> list[Path]:
        return [*self.model.files, *self.adapter.files]

    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = files_hash([("model", self.model.content_hash()), ("lora", self.adapter.content_hash())])
        return self._hash

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        key = self.replaced.get(name)
        stored = self.model.read(name) if key is None else self.adapter.tensor(key).to(info.dtype)
        pair = self.pairs.get(name)
        if pair is None:
            return stored
        a = self.adapter.tensor(pair.a).to(torch.float32)
        b = self.adapter.tensor(pair.b).to(torch.float32)
        delta = b @ a
        delta = (delta.T if pair.transpose else delta) * pair.scale  # PEFT's order: transpose(B @ A) * scaling
        if pair.embedding:
            return (stored + delta.to(stored.dtype)).contiguous()
        return (stored.to(torch.float32) + delta).to(stored.dtype).contiguous()

    def close(self) -> None:
        self.model.close()
        self.adapter.close()

    # -- validation ----------------------------------------------------------------------------------
    def _plan(self) -> None:
        modules: dict[str, dict[str, str]] = {}
        for key in self.adapter.infos:
            if not key.startswith(PREFIX):
                raise self._error(f"adapter tensor {key!r} does not start with {PREFIX!r} (not saved by PEFT)")
            rest = key[len(PREFIX):]
            m = _LORA_KEY.fullmatch(rest)
            if m:
                module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                modules.setdefault(module, {})[part] = key
            elif "lora_" in rest:
                raise self._error(f"adapter tensor {key!r} is not a plain LoRA weight (lora_A/lora_B or "
                                  f"lora_embedding_A/B); only plain LoRA is applied")
            else:
                self._plan_replacement(key, rest.replace(".base_layer.", "."))
        for module, parts in modules.items():
            self._plan_pair(module, parts)

    def _plan_replacement(self, key: str, target: str) -> None:
        target = self._target(key, target)
        have, want = self.adapter.infos[key].shape, self.tensors[target].shape
        if have != want:
            raise self._error(f"adapter tensor {key!r} has shape {have}, but {target!r} of the model has {want}")
        self.replaced[target] = key

    def _plan_pair(self, module: str, parts: dict[str, str]) -> None:
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else \
            (parts.get("lora_A"), parts.get("lora_B"))
        if a_key is None or b_key is None or len(parts) != 2:
            raise self._error(f"adapter module {module!r} needs both A and B LoRA tensors, has "
                              f"{sorted(parts)}")
        target = self._target(a_key, module + ".weight")
        info = self.tensors[target]
        if not info.dtype.is_floating_point:
            raise self._error(f"adapter tensor {a_key!r} targets {target!r}, which is not a float tensor")
        cfg = self.adapter.config
        r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        a, b = self.adapter.infos[a_key].shape, self.adapter.infos[b_key].shape
        transpose = embedding or self._conv1d(module)
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise self._error(f"adapter tensors {module}.A/B have shapes {a} and {b}, not rank {r} matrices (r "
                              f"from {'rank_pattern' if r != cfg['r'] else 'r'}); only 2-D LoRA is applied")
        delta = (a[1], b[0]) if transpose else (b[0], a[1])
        if tuple(info.shape) != delta:
            raise self._error(f"adapter tensors {module}.A/B (shapes {a}, {b}) give a delta of shape {delta}, but "
                              f"{target!r} of the model has shape {info.shape}")
        self.pairs[target] = LoraPair(a_key, b_key, scale, transpose, embedding)

    def _target(self, key: str, target: str) -> str:
        """The model tensor an adapter tensor applies to; a checkpoint saved without the head model's prefix
        (GPT-2's `h.0...` for `transformer.h.0...`) matches without the first name component."""
        if target in self.tensors:
            return target
        short = target.partition(".")[2]
        if short in self.tensors:
            return short
        raise self._error(f"adapter tensor {key!r} targets {target!r}, which {self.model.source} does not have")

    def _conv1d(self, module: str) -> bool:
        """PEFT sets fan_in_fan_out for transformers' Conv1D layers (and clears it for Linear ones), whatever
        the config says: the module's type decides, known here from the model type and the layer's name."""
        return self.config.get("model_type") in CONV1D_TYPES and module.rsplit(".", 1)[-1] in CONV1D_NAMES

    def _error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.adapter.source}: {message}")
