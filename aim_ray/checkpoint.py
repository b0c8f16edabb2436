"""Hugging Face checkpoints: lazy per-tensor reads, streaming sharded writes, atomic output directories.

Reading never loads a whole model: the safetensors headers are parsed (and validated) up front, and each
tensor is memory-mapped on demand. Writing streams too: shards are planned from the known output shapes,
each shard's header is written first and tensors are appended as they are produced, so peak memory is one
tensor, not one shard. Outputs are built in a hidden sibling directory and renamed into place only when
complete, so a crash never leaves a directory that looks like a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from .errors import AimRayError, CheckpointError, OutputBusyError, OutputExistsError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_SHARD_SIZE = 5 * 10**9

# Files copied next to the merged weights (those that exist in the source).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

DTYPE_TO_SAFE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
SAFE_TO_DTYPE = {v: k for k, v in DTYPE_TO_SAFE.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def parse_dtype(name: str | torch.dtype, option: str = "dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    key = aliases.get(key, key)
    if key not in DTYPE_NAMES:
        raise CheckpointError(f"{option}: unknown dtype {name!r}; use one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------- reading


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without reading tensor data."""
    header, data_len = _parse_safetensors_header(file)
    header_tensor_infos(header, file, data_len, str(file))
    return header


def _parse_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """The header (entries not yet checked) and the length of the data section."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(f"{file}: corrupt safetensors header (header length {header_len}, "
                                      f"file size {size})")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header (invalid JSON: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    return header, size - 8 - header_len


def header_tensor_infos(header: dict[str, Any], file: Path, data_len: int, where: str) -> list[TensorInfo]:
    """The tensors of a parsed safetensors header, each entry checked against a data section of `data_len`
    bytes (local files and hub headers alike; `where` names the file in errors)."""
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype = SAFE_TO_DTYPE[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: corrupt safetensors header entry for tensor {name!r}") from None
        expected = dtype_size(dtype) * int(torch.Size(shape).numel())
        if end > data_len or end - begin != expected or begin < 0:
            raise CheckpointError(f"{where}: truncated or corrupt data for tensor {name!r} "
                                  f"(offsets {begin}..{end}, data section {data_len} bytes)")
        infos.append(TensorInfo(name, shape, dtype, file))
    return infos


# A hub id: `org/name`, optionally `@revision` (a branch, tag or commit), as MergeKit writes pinned models.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def hub_reference(text: str) -> tuple[str, str | None]:
    """(repo id, revision) of a reference that is not an existing path. Anything that reads as a local path
    is "no such checkpoint directory", never a hub lookup: it starts with ./ ../ / ~, is not `org/name`,
    or its parent directory exists here (`models/llama-typo` when `models/` exists)."""
    repo_id, at, revision = text.partition("@")
    if text.startswith(("./", "../", "/", "~")) or text in (".", ".."):
        raise CheckpointError(f"{text}: no such checkpoint directory")
    if not _HUB_ID.fullmatch(repo_id) or (at and not revision):
        raise CheckpointError(f"{text}: no such checkpoint directory (and not a hub id: those are org/name)")
    if Path(repo_id).parent.is_dir():
        raise CheckpointError(f"{text}: no such checkpoint directory (./{Path(repo_id).parent} exists here, so "
                              f"this is read as a local path, not a hub id)")
    return repo_id, revision or None


class Checkpoint:
    """A Hugging Face model directory opened lazily: names, shapes and dtypes now, tensors on demand.

    `open` takes a local directory or a hub id (`org/name[@revision]`, see `hub.HubCheckpoint`: validated
    from remote headers, weight files downloaded on first read)."""

    commit: str | None = None  # the hub commit the checkpoint was resolved to (None: a local directory)

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict[str, Any], source: str,
                 pickled: bool = False) -> None:
        self.path = path
        self.source = source
        self.tensors = tensors
        self.config = config
        self.pickled = pickled
        self._handles: dict[Path, Any] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._hash: str | None = None

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path_or_id: str | os.PathLike, *, revision: str | None = None,
             allow_pickle: bool = False) -> Checkpoint:
        """A local directory, else a hub id, else MergeKit's `model+lora` (a LoRA adapter applied as tensors are
        read); `revision` (a pinned commit) overrides one in the id."""
        path = Path(path_or_id).expanduser()
        if not path.exists() and "+" in str(path_or_id):  # MergeKit's model+lora (`lora.py`)
            from .lora import open_lora_checkpoint

            return open_lora_checkpoint(str(path_or_id), revision, allow_pickle)
        if not path.exists():
            repo_id, ref_revision = hub_reference(str(path_or_id))
            # hub.py builds on this module; imported on first use, so local runs never import huggingface_hub
            from .hub import open_hub_checkpoint

            return open_hub_checkpoint(repo_id, revision or ref_revision, str(path_or_id))
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
        config = read_config(path)
        tensors, pickled = local_tensor_infos(path, allow_pickle)
        return cls(path, tensors, config, str(path_or_id), pickled)

    @property
    def ref(self) -> str:
        """A reference that reopens this exact checkpoint in another process (a hub id pins its commit)."""
        return str(self.path)

    # -- metadata ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self.tensors.values()})

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def tie_word_embeddings(self) -> bool:
        text = self.config.get("text_config") or {}  # multimodal models tie their language model's head
        return bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))

    # -- data ----------------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype. Safetensors files are memory-mapped: the page cache holds the
        bytes, not the heap, until the caller converts the tensor."""
        info = self.info(name)
        if self.pickled:
            return self._read_bin(info)
        handle = self._handles.get(info.file)
        if handle is None:
            self._fetch(info.file)
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(name)

    def _fetch(self, file: Path) -> None:
        """Make a weight file available locally before its first read (a hub checkpoint downloads it)."""

    def _read_bin(self, info: TensorInfo) -> torch.Tensor:
        if info.file not in self._bin_cache:
            self._bin_cache = {info.file: _load_bin(info.file)}  # keep one pickle file in memory at a time
        return self._bin_cache[info.file][info.name]

    def content_hash(self) -> str:
        """sha256 of the weight files' bytes (in name order). Cached per (path, size, mtime) on disk,
        because hashing a 26 GB model takes a minute and the same base is calibrated against often."""
        if self._hash is None:
            self._hash = _cached_files_hash(self.files)
        return self._hash

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache.clear()


def local_tensor_infos(path: Path, allow_pickle: bool) -> tuple[dict[str, TensorInfo], bool]:
    """Every tensor of a local model directory, from its headers; whether the weights are pickle files."""
    files, pickled = _weight_files(path, allow_pickle)
    tensors: dict[str, TensorInfo] = {}
    for file, expected_names in files.items():
        for info in _file_tensor_infos(file, pickled):
            tensors[info.name] = info
        missing = expected_names - {n for n, i in tensors.items() if i.file == file}
        if missing:
            raise CheckpointError(f"{path / SAFE_INDEX}: index maps tensor {sorted(missing)[0]!r} to {file.name}, "
                                  f"which does not contain it")
    if not tensors:
        raise CheckpointError(f"{path}: checkpoint has no tensors")
    return tensors, pickled


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None


def _weight_files(path: Path, allow_pickle: bool) -> tuple[dict[Path, set[str]], bool]:
    """Map each weight file to the tensor names the index says it holds (empty set: no index)."""
    if (path / SAFE_INDEX).exists():
        return _index_files(path / SAFE_INDEX), False
    if (path / SAFE_SINGLE).exists():
        return {path / SAFE_SINGLE: set()}, False
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return {singles[0]: set()}, False
    has_bin = (path / BIN_INDEX).exists() or (path / BIN_SINGLE).exists()
    if has_bin and not allow_pickle:
        raise CheckpointError(f"{path}: only pickle weights (pytorch_model*.bin) found; pickle files can run "
                              f"arbitrary code when loaded. Convert to safetensors, or pass --allow-pickle "
                              f"(loads with torch.load(weights_only=True))")
    if (path / BIN_INDEX).exists():
        return _index_files(path / BIN_INDEX), True
    if (path / BIN_SINGLE).exists():
        return {path / BIN_SINGLE: set()}, True
    raise CheckpointError(f"{path}: no model.safetensors or {SAFE_INDEX} found")


def _index_files(index: Path) -> dict[Path, set[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: invalid index file ({e})") from None
    files: dict[Path, set[str]] = {}
    for name, fname in weight_map.items():
        file = index.parent / fname
        if not file.exists():
            raise CheckpointError(f"{index}: names shard {fname!r} (for tensor {name!r}), which does not exist")
        files.setdefault(file, set()).add(name)
    return files


def _file_tensor_infos(file: Path, pickled: bool) -> Iterable[TensorInfo]:
    if pickled:
        for name, t in _load_bin(file).items():
            yield TensorInfo(name, tuple(t.shape), t.dtype, file)
        return
    header, data_len = _parse_safetensors_header(file)
    yield from header_tensor_infos(header, file, data_len, str(file))


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{file}: cannot load pickle weights safely ({e})") from None


def sha256_file(file: Path, chunk: int = 2**24) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Sequence[Path], threads: int = 4) -> list[str]:
    """sha256 of each file, a few at a time (hashlib releases the GIL): verifying a 26 GB output's shards is
    bound by the disk, not one core's ~2 GB/s."""
    if len(files) <= 1:
        return [sha256_file(f) for f in files]
    with ThreadPoolExecutor(min(threads, len(files)), thread_name_prefix="aim-ray-sha256") as pool:
        return list(pool.map(sha256_file, files))


def cache_dir() -> Path:
    """The aim-ray cache root: `$AIM_RAY_CACHE`, default `~/.cache/aim-ray` (scales, deltas, scores, worlds)."""
    return Path(os.environ.get("AIM_RAY_CACHE") or Path.home() / ".cache" / "aim-ray").expanduser()


def files_hash(digests: Iterable[tuple[str, str]]) -> str:
    """The content hash of weight files from (file name, sha256) pairs in name order: a hub checkpoint's
    LFS sha256s give the same hash as its local copy."""
    total = hashlib.sha256()
    for name, digest in digests:
        total.update(f"{name}:{digest}\n".encode())
    return total.hexdigest()


def _cached_files_hash(files: Sequence[Path]) -> str:
    return files_hash((file.name, _cached_file_digest(file)) for file in files)


def _cached_file_digest(file: Path) -> str:
    store = cache_dir() / "file-hashes"
    st = file.stat()
    key = hashlib.sha256(f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    memo = store / key
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(file)
    store.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will receive: known up front so shard headers can be written first."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * dtype_size(self.dtype)


def plan_shards(tensors: Sequence[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Greedy packing in the given order; a tensor larger than shard_size gets a shard of its own.
    Depends only on the tensor list and shard_size (never on the number of workers), so every run of the
    same merge produces the same files."""
    if shard_size <= 0:
        raise CheckpointError(f"--shard-size must be positive, got {shard_size}")
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return [s for s in shards if s]


def shard_filename(index: int, count: int) -> str:
    return SAFE_SINGLE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in the planned order, hashing as it goes.

    Writing and hashing run on a background thread (both release the GIL), so they overlap with merging the
    next tensor; the queue holds at most two tensors, which keeps memory at O(1) tensors.
    """

    def __init__(self, file: Path, tensors: Sequence[OutputTensor], metadata: dict[str, str] | None = None):
        self.file = file
        self.expected = list(tensors)
        self._next = 0
        self._sha = hashlib.sha256()
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in self.expected:
            header[t.name] = {"dtype": DTYPE_TO_SAFE[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors does
        self._f: BinaryIO = open(file, "wb")
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._drain, name=f"write-{file.name}", daemon=True)
        self._thread.start()
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    view = data if isinstance(data, bytes) else memoryview(data.numpy())
                    self._f.write(view)
                    self._sha.update(view)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = e

    def _put(self, data: bytes | torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self._next]
        if name != want.name or tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise RuntimeError(f"{self.file.name}: expected {want} next, got {name} {tuple(tensor.shape)} "
                               f"{tensor.dtype}")
        self._put(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.expected)

    def _finish_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self, durable: bool = True) -> str:
        """Flush, fsync (unless not `durable`: a scratch output) and return the file's sha256."""
        if not self.complete:
            self.abort()
            raise RuntimeError(f"{self.file.name}: closed after {self._next}/{len(self.expected)} tensors")
        self._finish_thread()
        if self._error is not None:
            self._f.close()
            raise self._error
        self._f.flush()
        if durable:
            os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._finish_thread()
        self._f.close()


def write_index(out_dir: Path, shards: Sequence[Sequence[OutputTensor]], metadata: dict[str, Any]) -> None:
    if len(shards) == 1:
        return  # HF convention: a single model.safetensors needs no index
    weight_map = {t.name: shard_filename(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(config_src: Path, tokenizer_src: Path | None, out_dir: Path,
                   config_updates: dict[str, Any] | None = None) -> list[str]:
    """Copy config/generation config from the base and tokenizer files from tokenizer_src (None: none)."""
    copied = []
    for name in CONFIG_FILES:
        if (config_src / name).exists():
            shutil.copy2(config_src / name, out_dir / name)
            copied.append(name)
    for name in TOKENIZER_FILES if tokenizer_src is not None else ():
        if (tokenizer_src / name).exists():
            shutil.copy2(tokenizer_src / name, out_dir / name)
            copied.append(name)
    if config_updates and (out_dir / "config.json").exists():
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg.update(config_updates)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return copied


# ------------------------------------------------------------------------------------ output directories

# What marks a directory `--overwrite` may replace: a Hugging Face checkpoint (config.json and weights).
WEIGHT_MARKERS = (SAFE_INDEX, BIN_INDEX)
REPORT = "merge_report.json"


def replaceable(path: Path) -> bool:
    """Whether `--overwrite` may delete `path`: empty, a Hugging Face checkpoint (config.json plus safetensors or
    pytorch_model*.bin weights or an index), or an aim-ray output (its merge_report.json)."""
    names = {p.name for p in path.iterdir()}
    if not names or _is_aim_ray_report(path / REPORT):
        return True
    weights = any(n.endswith(".safetensors") or n in WEIGHT_MARKERS
                  or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names)
    return "config.json" in names and weights


def _is_aim_ray_report(file: Path) -> bool:
    try:
        report = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "aim_ray" in (report.get("versions") or {})


def _check_replaceable(out: Path) -> None:
    if not replaceable(out):
        names = sorted(p.name for p in out.iterdir())
        sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise OutputExistsError(f"{out}: --overwrite replaces only a model checkpoint (config.json and weights, or "
                                f"an aim-ray merge_report.json) or an empty directory, and this one holds other "
                                f"files ({sample}); choose another --out or remove it yourself")


class OutputLock:
    """One run's exclusive lock on an output: `fcntl.flock` on `.NAME.aim-ray-lock` next to it.

    The kernel drops a flock when its holder dies (SIGKILL and OOM kills too), so a killed run never blocks the
    next one. The file names its holder (pid, host, start) for the message a second run prints. On NFS, Linux
    emulates flock with POSIX locks that reach the server through lockd (v3) or the v4 protocol; a mount with
    `nolock` or `local_lock=flock|all` keeps them on one client, so runs on two hosts would not see each other.
    Where the filesystem has no locks at all (ENOLCK, EOPNOTSUPP), the lock falls back to creating the file
    exclusively: a holder that is dead on this host is taken over, any other holder refuses and the message
    says which file to delete if that run is gone.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    @classmethod
    def acquire(cls, path: Path, out: Path) -> OutputLock:
        for _ in range(100):  # retried only when a holder released (and unlinked) the file as we opened it
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputBusyError(_busy(out, holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return cls._acquire_exclusive(path, out)
                raise
            if _same_file(fd, path):
                return cls(path, fd)
            os.close(fd)
        raise OutputBusyError(f"{out}: cannot lock {path}: it keeps being replaced by other runs")

    @classmethod
    def _acquire_exclusive(cls, path: Path, out: Path) -> OutputLock:
        for _ in range(3):
            try:
                return cls(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                fd = os.open(path, os.O_RDONLY)
                holder = _read_holder(fd)
                os.close(fd)
            if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # its run died without releasing: stale
                continue
            raise OutputBusyError(f"{_busy(out, holder)}; if that run is gone, delete {path}")
        raise OutputBusyError(f"{out}: cannot take the lock {path}")

    def release(self) -> None:
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)  # unlinked while still held: a waiter that opened it retries
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume the holder is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(out: Path, holder: Mapping[str, Any]) -> str:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
           if holder else "holder not yet recorded")
    return f"{out}: another aim-ray run ({who}) is writing this output; wait for it to finish or stop it"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable. Some filesystems cannot fsync a directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class OutputDir:
    """An output checkpoint directory built in a hidden sibling and renamed into place when complete.

    The work dir `.NAME.aim-ray-partial` sits next to the output (same filesystem, so the final rename is
    atomic). It is never mistaken for a finished checkpoint, and `resume=True` keeps it so finished shards
    can be reused. An existing output is only replaced with `overwrite=True`, and only when it is a model
    checkpoint or empty. One run at a time: `locked()` holds `OutputLock` while anything is deleted or written.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.out = Path(out).expanduser().absolute()
        self.overwrite = overwrite
        self.work = self.out.parent / f".{self.out.name}.aim-ray-partial"
        self.lock_file = self.out.parent / f".{self.out.name}.aim-ray-lock"
        self.resume = resume
        self._lock: OutputLock | None = None
        self._check_target()

    def _check_target(self) -> None:
        if not self.out.exists():
            return
        if not self.overwrite:
            raise OutputExistsError(f"{self.out}: output directory already exists; pass --overwrite to replace it")
        if not self.out.is_dir():
            raise OutputExistsError(f"{self.out}: exists and is not a directory")
        _check_replaceable(self.out)

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputDir]:
        """Hold the output's lock (re-entrant: an inner `locked()` of the same object leaves it held)."""
        if self._lock is not None:
            yield self
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock.acquire(self.lock_file, self.out)
        try:
            yield self
        finally:
            self._lock.release()
            self._lock = None

    def prepare(self) -> Path:
        """The work dir: emptied for a fresh run, kept for `resume`. Needs the lock."""
        if self._lock is None:
            raise RuntimeError("OutputDir.prepare() outside OutputDir.locked()")
        if self.work.exists() and not self.resume:
            shutil.rmtree(self.work)
        self.work.mkdir(exist_ok=True)
        return self.work

    def commit(self, shards: Mapping[str, str], scratch: Sequence[str] = (), durable: bool = True) -> Path:
        """Check every shard against its recorded sha256, drop scratch and stale `*.tmp` files, fsync, and
        swap the work dir into place (the old output, if overwriting, is removed last). `durable=False` is for
        a scratch output written by this process and deleted soon (a Tune trial model): no re-hash, no fsync;
        the swap is still atomic."""
        if durable:
            self._verify(shards)
        for name in scratch:
            (self.work / name).unlink(missing_ok=True)
        for tmp in self.work.glob("*.tmp"):  # left by writers that died or lost their node
            tmp.unlink(missing_ok=True)
        if durable:
            for file in self.work.iterdir():
                if file.is_file() and file.name not in shards:  # shards were fsynced by their writers
                    fsync_file(file)
            fsync_dir(self.work)
        old = None
        if self.out.exists():  # it may have appeared while we merged
            self._check_target()
            old = self.out.parent / f".{self.out.name}.aim-ray-old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.work, self.out)
        if durable:
            fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.out

    def _verify(self, shards: Mapping[str, str]) -> None:
        names = sorted(shards)
        missing = [n for n in names if not (self.work / n).is_file()]
        if missing:
            raise CheckpointError(f"{self.work / missing[0]}: recorded as written but missing; nothing was "
                                  f"committed; rerun with --resume to rewrite it")
        for name, actual in zip(names, sha256_files([self.work / n for n in names])):
            if actual != shards[name]:
                raise CheckpointError(f"{self.work / name}: sha256 {actual[:16]}... differs from the digest "
                                      f"recorded when it was written ({shards[name][:16]}...); another writer "
                                      f"may have replaced it. Nothing was committed; rerun with --resume to "
                                      f"rewrite it")

    def abandon(self, error: AimRayError, finished: int) -> AimRayError:
        """After a user error: a work dir holding finished shards is kept for `--resume` (the error says so);
        one with nothing finished is discarded."""
        if finished and self.work.exists():
            return type(error)(f"{error} ({finished} finished shard(s) kept in {self.work}; fix this and rerun "
                               f"with --resume to continue from them)")
        self.discard()
        return error

    def discard(self) -> None:
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
