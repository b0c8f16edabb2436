"""Hugging Face hub checkpoints: validated from remote headers, weight files downloaded on first read.

`open_hub_checkpoint` gives a `Checkpoint` whose tensor list comes from metadata only, so `engine.prepare` can
plan a merge of hub models without downloading their weights:

- the revision is resolved to one commit first (the HEAD of `config.json`), and every later request names that
  commit, so all files come from the same commit even if the branch moves meanwhile;
- the small files (config, generation config, tokenizer, safetensors index) are downloaded into the HF cache;
- the safetensors headers are read with ranged requests (`huggingface_hub.get_safetensors_metadata`) and
  checked like local headers (dtypes, shapes, offsets within the file's size);
- a weight file is downloaded (`hf_hub_download`, into the HF cache under `HF_HOME`) when a tensor in it is
  first read, so a Ray worker downloads only the files holding the tensors of its own shards.

Each file is downloaded once per cache: `hf_hub_download` takes a file lock per blob
(`{cache}/.locks/{repo}/{etag}.lock`) around the download and checks again for the finished blob once it holds
the lock, so concurrent workers on a node wait for the first download instead of repeating it. With `HF_HOME`
on a shared file system (cluster.yaml) that is once per cluster; the lock is `flock`, which Linux maps to
NFSv4 byte-range locks on NFS/EFS. On a file system whose `flock` silently succeeds (some Lustre/GPFS mounts)
huggingface_hub still writes each download to a unique temporary file and renames it into place: the cost is
bandwidth, never a corrupt blob.

Offline (`HF_HUB_OFFLINE=1`) or with the hub unreachable, a checkpoint opens from the cache alone: the
revision resolves through the cache's refs and the headers are read from the cached weight files.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import (
    CONFIG_FILES,
    SAFE_INDEX,
    SAFE_SINGLE,
    TOKENIZER_FILES,
    Checkpoint,
    TensorInfo,
    files_hash,
    header_tensor_infos,
    local_tensor_infos,
    read_config,
)
from .errors import CheckpointError

HTTP_TIMEOUT_S = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


class HubCheckpoint(Checkpoint):
    """A hub model at one commit. `path` is its snapshot directory in the HF cache, which holds the config and
    tokenizer files at once and each weight file once it has been read."""

    def __init__(self, repo_id: str, commit: str, snapshot: Path, tensors: dict[str, TensorInfo],
                 config: dict[str, Any], source: str, digests: Mapping[str, str | None]) -> None:
        super().__init__(snapshot, tensors, config, source)
        self.repo_id = repo_id
        self.commit = commit
        self.digests = dict(digests)  # weight file -> content id from the hub: LFS sha256, or "git-" blob sha1
        self._fetch_lock = threading.Lock()

    @property
    def ref(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    def _fetch(self, file: Path) -> None:
        if file.exists():
            return
        with self._fetch_lock:  # the merge threads of this process: one downloads, the others wait
            if not file.exists():
                _download(self.repo_id, file.relative_to(self.path).as_posix(), self.commit)

    def content_hash(self) -> str:
        """From the hub's per-file sha256 (LFS), without downloading: equal to the content hash of a local copy
        of the same weights, so caches keyed by it are shared between the two."""
        if self._hash is None:
            names = [file.relative_to(self.path).as_posix() for file in self.files]
            if all(self.digests.get(n) for n in names):
                self._hash = files_hash((Path(n).name, str(self.digests[n])) for n in names)
            else:  # a weight file without a content id (not on LFS, or a cache without symlinks): hash its bytes
                for file in self.files:
                    self._fetch(file)
                self._hash = super().content_hash()
        return self._hash


def open_hub_checkpoint(repo_id: str, revision: str | None, source: str) -> HubCheckpoint:
    """Open `repo_id` at `revision` (default: main) from hub metadata, or from the HF cache when offline."""
    snapshot = Path(_download(repo_id, "config.json", revision)).parent  # resolves the commit (or the cache's ref)
    commit = snapshot.name
    config = read_config(snapshot)
    listing, unreachable = _listing(repo_id, commit)
    if listing is None:
        return _open_cached(repo_id, commit, snapshot, config, source, unreachable)
    weights = _weight_layout(repo_id, listing)
    for name in (*CONFIG_FILES, *TOKENIZER_FILES, SAFE_INDEX):
        if name in listing and name != "config.json":
            _download(repo_id, name, commit)
    tensors = _remote_tensor_infos(repo_id, commit, snapshot, weights, listing)
    names = {i.file.relative_to(snapshot).as_posix() for i in tensors.values()}
    digests = {name: _sibling_digest(listing[name]) for name in names}
    return HubCheckpoint(repo_id, commit, snapshot, tensors, config, source, digests)


# --------------------------------------------------------------------------------------------- remote


def _listing(repo_id: str, commit: str) -> tuple[dict[str, Any] | None, str]:
    """The commit's files (name -> RepoSibling with size, LFS sha256, blob id), or (None, why) when the hub
    cannot be asked, in which case the checkpoint opens from the cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.is_offline_mode():
        return None, "offline (HF_HUB_OFFLINE=1)"
    try:
        info = HfApi().model_info(repo_id, revision=commit, files_metadata=True, timeout=HTTP_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _hub_error(repo_id, commit, e) from None
    except Exception as e:  # noqa: BLE001 - unreachable, as hf_hub_download would: fall back to the cache
        return None, f"the hub is unreachable ({type(e).__name__}: {_first_line(e)})"
    return {s.rfilename: s for s in info.siblings or []}, ""


def _weight_layout(repo_id: str, listing: Mapping[str, Any]) -> str:
    """The safetensors index, or the one safetensors file, of the repo (as a local directory is read)."""
    if SAFE_INDEX in listing or SAFE_SINGLE in listing:
        return SAFE_INDEX if SAFE_INDEX in listing else SAFE_SINGLE
    singles = [n for n in listing if n.endswith(".safetensors") and "/" not in n]
    if len(singles) == 1:
        return singles[0]
    if any(n.endswith(".bin") for n in listing):
        raise CheckpointError(f"{repo_id}: only pickle weights (pytorch_model*.bin) on the hub; aim-ray reads hub "
                              f"checkpoints from safetensors only (download and convert it to a local directory)")
    raise CheckpointError(f"{repo_id}: no {SAFE_SINGLE} or {SAFE_INDEX} on the hub")


def _remote_tensor_infos(repo_id: str, commit: str, snapshot: Path, weights: str,
                         listing: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """Every tensor, from the remote headers (ranged reads), checked against the index and the file sizes."""
    from huggingface_hub import HfApi

    api = HfApi()
    where = f"{repo_id}@{commit[:12]}"
    try:
        if weights == SAFE_INDEX:
            _check_index(where, snapshot / SAFE_INDEX, listing)
        if weights in (SAFE_INDEX, SAFE_SINGLE):
            meta = api.get_safetensors_metadata(repo_id, revision=commit, timeout=HTTP_TIMEOUT_S)
            files, weight_map = meta.files_metadata, meta.weight_map
        else:  # a lone safetensors file under another name
            header = api.parse_safetensors_file_metadata(repo_id, weights, revision=commit, timeout=HTTP_TIMEOUT_S)
            files, weight_map = {weights: header}, {}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise _hub_error(repo_id, commit, e) from None
    tensors: dict[str, TensorInfo] = {}
    for name in dict.fromkeys([*weight_map.values(), *files]):  # the index's order, as a local directory is read
        header = {t: {"dtype": i.dtype, "shape": i.shape, "data_offsets": i.data_offsets}
                  for t, i in files[name].tensors.items()}
        size = _sibling_size(listing[name])
        for info in header_tensor_infos(header, snapshot / name, size - 8, f"{where}/{name}"):
            tensors[info.name] = info
    for tensor, name in weight_map.items():
        if tensor not in tensors or tensors[tensor].file != snapshot / name:
            raise CheckpointError(f"{where}/{SAFE_INDEX}: index maps tensor {tensor!r} to {name}, which does not "
                                  f"contain it")
    if not tensors:
        raise CheckpointError(f"{where}: checkpoint has no tensors")
    return tensors


def _check_index(where: str, index: Path, listing: Mapping[str, Any]) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}/{SAFE_INDEX}: invalid index file ({e})") from None
    for tensor, name in weight_map.items():
        if name not in listing:
            raise CheckpointError(f"{where}/{SAFE_INDEX}: names shard {name!r} (for tensor {tensor!r}), which "
                                  f"does not exist")


def _sibling_size(sibling: Any) -> int:
    return int(sibling.lfs.size if sibling.lfs is not None else sibling.size)


def _sibling_digest(sibling: Any) -> str | None:
    """The file's content id as the HF cache names its blob: the LFS sha256, else the git blob sha1."""
    if sibling.lfs is not None:
        return str(sibling.lfs.sha256)
    return f"git-{sibling.blob_id}" if sibling.blob_id else None


# ---------------------------------------------------------------------------------------------- cache


def _open_cached(repo_id: str, commit: str, snapshot: Path, config: dict[str, Any], source: str,
                 why: str) -> HubCheckpoint:
    """The checkpoint from its snapshot in the HF cache, which must hold every weight file."""
    try:
        tensors, _ = local_tensor_infos(snapshot, allow_pickle=False)
    except CheckpointError as e:
        raise CheckpointError(f"{repo_id}@{commit[:12]}: {why}, and the HF cache does not hold the whole "
                              f"checkpoint ({e})") from None
    digests = {file.relative_to(snapshot).as_posix(): _blob_digest(file) for file in {i.file for i in tensors.values()}}
    return HubCheckpoint(repo_id, commit, snapshot, tensors, config, source, digests)


def _blob_digest(file: Path) -> str | None:
    """The HF cache names each blob by its etag: the LFS sha256 or the git blob sha1 (as `_sibling_digest`)."""
    blob = Path(os.path.realpath(file)).name
    if _SHA256.fullmatch(blob):
        return blob
    return f"git-{blob}" if _GIT_SHA1.fullmatch(blob) else None


# ----------------------------------------------------------------------------------------- downloads


def _download(repo_id: str, filename: str, revision: str | None) -> str:
    """`hf_hub_download` into the HF cache (served from the cache when offline or unreachable); hub errors
    become one-line CheckpointErrors."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise _hub_error(repo_id, revision, e, filename) from None


def _hub_error(repo_id: str, revision: str | None, e: Exception, filename: str | None = None) -> CheckpointError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return CheckpointError(f"{repo_id}: gated repo on the Hugging Face hub: accept its terms on the model page "
                               f"and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(f"{repo_id}: no such local directory, and no such model on the Hugging Face hub "
                               f"({constants.ENDPOINT}; a private repo needs `hf auth login` or HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return CheckpointError(f"{repo_id}: revision {revision!r} not found on the Hugging Face hub")
    if isinstance(e, RemoteEntryNotFoundError):
        return CheckpointError(f"{repo_id}: no {filename or 'such file'} on the hub"
                               + (" (not a Hugging Face model repo)" if filename == "config.json" else ""))
    if isinstance(e, LocalEntryNotFoundError):
        why = "offline (HF_HUB_OFFLINE=1)" if constants.is_offline_mode() else "the hub cannot be reached"
        return CheckpointError(f"{repo_id}: {filename} is not in the HF cache ({constants.HF_HUB_CACHE}) and {why}")
    return CheckpointError(f"{repo_id}: Hugging Face hub error ({type(e).__name__}: {_first_line(e)})")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else ""
