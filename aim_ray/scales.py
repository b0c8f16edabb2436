"""The scales artifact: per-module AIM scales computed once on the base model, reused by every merge.

A `Scales` holds raw (not yet normalised) float32 scales, keyed by

- `kind="activation"`: the full HF *module* name (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`),
  value = mean over all calibration tokens of |input| per input channel, shape `[in_features]`;
- `kind="sensitivity"`: the full HF *parameter* name (`model.layers.0.self_attn.q_proj.weight`), value =
  accumulated |dL/dtheta|, the parameter's shape.

Normalisation (`A = s / max(s)`) happens at relaxation time (`aim_ray.aim`), so the artifact keeps the
measured values. `dtype` is the compute dtype of the calibration (the scales are float32 whatever it was:
they accumulate in float32) and `device` the device kind it ran on (cpu, cuda; absent in older artifacts).
It is stored as safetensors with string metadata (base model, content hash, calibration
settings), and cached under `$AIM_RAY_CACHE/scales/<key>.safetensors` (default `~/.cache/aim-ray`) where the
key is the sha256 of the base content hash, the calibration settings and the kind: the same calibration is
never computed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__, architectures
from .checkpoint import Checkpoint
from .checkpoint import cache_dir as _cache_root
from .errors import CheckpointError, ScalesError

KINDS = ("activation", "sensitivity")
FORMAT = "aim-ray-scales/1"
_INT_FIELDS = ("n_samples", "block_size", "n_blocks", "n_tokens")
_STR_FIELDS = ("kind", "base_model", "content_hash", "dataset", "dtype", "aim_ray_version")


def open_checkpoint(base: str | os.PathLike | Checkpoint) -> Checkpoint:
    """A `Checkpoint` from a path / hub id, or the given one unchanged."""
    return base if isinstance(base, Checkpoint) else Checkpoint.open(base)


def is_embedding(name: str) -> bool:
    """Embedding tensors/modules (token, position, patch embeddings of any family: `model.embed_tokens`,
    GPT-2's `wte`/`wpe`, ...): never relaxed, never calibrated."""
    return architectures.is_embedding(name)


def has_tied_embeddings(checkpoint: Checkpoint) -> bool:
    """The embedding is the head: config says tied and the embedding is stored. A stored `lm_head.weight` does
    not untie it (transformers ties the head to the embedding on load and ignores the stored head), so the
    embedding is relaxed with the head's scales whether or not the head is stored too."""
    return checkpoint.tie_word_embeddings and architectures.input_embedding(checkpoint.names()) is not None


def expected_shapes(checkpoint: Checkpoint, kind: str) -> dict[str, tuple[int, ...]]:
    """The scale entries (name -> shape) a complete artifact of `kind` has for this checkpoint."""
    out: dict[str, tuple[int, ...]] = {}
    for name in checkpoint.names():
        if not name.endswith(".weight") or is_embedding(name):
            continue  # biases, buffers and embeddings are not relaxed
        shape = checkpoint.info(name).shape
        axis = architectures.input_axis(name, checkpoint.config)  # GPT-2's Conv1D: input channels are dim 0
        out[_key(name, kind)] = (shape[axis],) if kind == "activation" else shape
    if has_tied_embeddings(checkpoint):  # the head exists as a module, its weight is the embedding
        embedding = architectures.input_embedding(checkpoint.names())
        shape = checkpoint.info(embedding).shape
        out[_key(architectures.tied_head(embedding) + ".weight", kind)] = (
            (shape[-1],) if kind == "activation" else shape)
    return out


def _key(param_name: str, kind: str) -> str:
    return param_name.removesuffix(".weight") if kind == "activation" else param_name


@dataclass
class Scales:
    """Raw AIM scales plus the provenance needed to reuse them safely."""

    tensors: dict[str, torch.Tensor]
    kind: str
    base_model: str
    content_hash: str
    dataset: str
    n_samples: int
    block_size: int
    n_blocks: int
    dtype: str
    revision: str | None = None
    device: str | None = None
    n_tokens: int = 0
    aim_ray_version: str = __version__
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScalesError(f"scales kind must be one of {KINDS}, got {self.kind!r}")
        self.tensors = {name: _checked(name, t) for name, t in self.tensors.items()}

    # -- mapping access -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.tensors.get(name, default)

    # -- persistence ----------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        meta = {f: str(getattr(self, f)) for f in _STR_FIELDS + _INT_FIELDS}
        meta["format"] = FORMAT
        for optional in ("revision", "device"):
            if getattr(self, optional) is not None:
                meta[optional] = getattr(self, optional)
        if self.extra:
            meta["extra"] = json.dumps(self.extra, sort_keys=True)
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        return save_atomically(path, self.tensors, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scales:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ScalesError(f"{path}: scales file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:  # noqa: BLE001 - any safetensors failure is a bad artifact
            raise ScalesError(f"{path}: not a readable safetensors scales file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ScalesError(f"{path}: not an aim-ray scales artifact "
                              f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})")
        try:
            kwargs: dict[str, Any] = {f: meta[f] for f in _STR_FIELDS}
            kwargs.update({f: int(meta[f]) for f in _INT_FIELDS})
        except (KeyError, ValueError) as e:
            raise ScalesError(f"{path}: scales metadata is missing or has a bad field ({e})") from None
        extra = json.loads(meta["extra"]) if "extra" in meta else {}
        return cls(tensors=tensors, revision=meta.get("revision"), device=meta.get("device"), extra=extra, **kwargs)

    # -- validation -----------------------------------------------------------------------------------
    def validate(self, base: str | os.PathLike | Checkpoint, force: bool = False) -> None:
        """Check these scales fit `base`: every relaxed module present with the right shape, nothing extra,
        and (unless `force`) computed on the very same weights (content hash)."""
        try:
            ckpt = open_checkpoint(base)
        except CheckpointError as e:
            raise ScalesError(f"cannot validate scales against {base}: {e}") from None
        self._check_names(ckpt)
        actual = ckpt.content_hash()
        if actual != self.content_hash:
            msg = (f"scales were computed on base {self.base_model!r} (content hash "
                   f"{self.content_hash[:12]}...) but are applied to {ckpt.path} "
                   f"(content hash {actual[:12]}...)")
            if not force:
                raise ScalesError(msg + "; recalibrate, or pass force=True (aim.force / --force) to use them "
                                  "anyway")
            warnings.warn(msg + " (force=True: using them anyway)", stacklevel=2)

    def _check_names(self, ckpt: Checkpoint) -> None:
        expected = expected_shapes(ckpt, self.kind)
        unit = "module" if self.kind == "activation" else "parameter"
        for name, shape in expected.items():
            if name not in self.tensors:
                raise ScalesError(f"{self.kind} scales have no entry for {unit} {name!r} of {ckpt.path}")
            if tuple(self.tensors[name].shape) != tuple(shape):
                raise ScalesError(f"{self.kind} scales for {unit} {name!r} have shape "
                                  f"{tuple(self.tensors[name].shape)}, but {ckpt.path} needs {tuple(shape)}")
        for name in self.tensors:
            if name not in expected:
                raise ScalesError(f"{self.kind} scales have an entry for {unit} {name!r}, which {ckpt.path} "
                                  f"does not have (scales from another architecture?)")


def save_atomically(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A safetensors artifact written to a temp file and renamed, so a crash never leaves a truncated one."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    """Scales are float32 on the CPU, finite and non-negative (a NaN would poison A = s / max(s))."""
    if not torch.is_floating_point(t):
        raise ScalesError(f"scales for {name!r} are not floating point ({t.dtype})")
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ScalesError(f"scales for {name!r} contain negative, NaN or infinite values")
    return t


# ---------------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """`$AIM_RAY_CACHE/scales`, default `~/.cache/aim-ray/scales`."""
    return Path(_cache_root()).expanduser() / "scales"


def cache_key(content_hash: str, settings: Mapping[str, Any], kind: str) -> str:
    """sha256 over the base weights' hash, the calibration settings that change the result, and the kind."""
    if kind not in KINDS:
        raise ScalesError(f"scales kind must be one of {KINDS}, got {kind!r}")
    payload = json.dumps({"base": content_hash, "settings": dict(settings), "kind": kind}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(key: str, root: str | os.PathLike | None = None) -> Path:
    return (Path(root).expanduser() if root is not None else cache_dir()) / f"{key}.safetensors"
