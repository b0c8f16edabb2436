"""What `--resume` may continue: the progress file of a merge's hidden work dir.

`aim-ray-progress.json` is rewritten (atomically) after every finished shard. It records the merge's settings
(config, seed, shard size and plan, output dtype, relaxation, shard metadata, aim-ray version), each input's
identity and which shards are done with their sha256. `--resume` continues only the same merge from the same
inputs; anything else is refused with a one-line error, because shards of another merge would silently mix into
the output.

Inputs are identified by `Checkpoint.content_hash` (sha256 of the weight files, cached on disk by path, size and
mtime, so a resume of unchanged inputs rehashes nothing). A fresh run hashes its inputs on a background thread
while it merges (one 26 GB model is ~15 s of one core at ~1.8 GB/s, plus the reads; usually a cache hit, since
calibration and Tune hash the same models). Until a hash is known the record holds each weight file's (size,
mtime), the signature that cache trusts, and a resume compares that instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .checkpoint import Checkpoint, sha256_files, shard_filename
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .engine import MergeJob, RelaxFn

PROGRESS = "aim-ray-progress.json"
FORMAT = 2


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def relax_identity(relax: RelaxFn | None) -> str:
    """What a relaxation hook computes: its `fingerprint()` (AimRelaxer: scales, kind, omega), else its name."""
    if relax is None:
        return "none"
    fingerprint = getattr(relax, "fingerprint", None)
    if callable(fingerprint):
        return str(fingerprint())
    kind = relax if hasattr(relax, "__qualname__") else type(relax)
    return f"{kind.__module__}.{kind.__qualname__}"


def merge_settings(job: MergeJob, relax: RelaxFn | None = None,
                   metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything besides the inputs' bytes that decides the shards' bytes, keyed by what a user would change.
    (`check_finite` is left out: it only refuses, so `--allow-nonfinite` can continue a refused run.)"""
    plan = [[[t.name, list(t.shape), str(t.dtype)] for t in shard] for shard in job.shards]
    return {"aim-ray version": __version__,
            "merge config": _digest(job.config.model_dump(mode="json")),
            "--seed": job.seed,
            "--shard-size": job.shard_size,
            "output dtype": str(job.out_dtype),
            "shard plan": _digest(plan),
            "AIM relaxation (scales, omega)": relax_identity(relax),
            "expert statistics (data-aware methods)": job.statistics.fingerprint() if job.statistics else "",
            "shard metadata": _digest(dict(metadata or {}))}


def file_signature(ckpt: Checkpoint) -> dict[str, Any]:
    """Each weight file's (size, mtime_ns): what the content-hash cache keys on. A hub checkpoint is named by
    its commit (its files are fetched lazily and may not exist yet; its content hash costs no download)."""
    if ckpt.commit is not None:
        return {"commit": ckpt.commit}
    out = {}
    for file in ckpt.files:
        st = file.stat()
        out[file.name] = [st.st_size, st.st_mtime_ns]
    return out


class Progress:
    """The progress of one merge in its work dir. `load` first (refuses another merge's work dir when resuming),
    then `record` each finished shard; `close` when the run ends."""

    def __init__(self, job: MergeJob, work: Path, relax: RelaxFn | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.job = job
        self.work = Path(work)
        self.file = self.work / PROGRESS
        self.settings = merge_settings(job, relax, metadata)
        self.inputs: list[tuple[str, Checkpoint]] = [
            (f"base model ({job.base.source})", job.base),
            *((f"expert {i} ({ref})", c) for i, (ref, c) in enumerate(zip(job.expert_refs, job.experts)))]
        self.done: dict[int, str] = {}
        self.resumed: list[int] = []
        self._signatures: dict[str, dict[str, list[int]]] = {}
        self._hashes: dict[str, str] = {}
        self._stop = threading.Event()
        self._hasher: threading.Thread | None = None

    # -- loading --------------------------------------------------------------------------------------
    def load(self, resume: bool) -> dict[int, str]:
        """The shards an interrupted run of this same merge finished (verified by sha256) when resuming, else
        none. Returns `self.done`, which `record` keeps up to date."""
        if resume and self.file.exists():
            state = self._read()
            self._check_settings(state.get("settings") or {})
            self._check_inputs({r.get("label"): r for r in state.get("inputs", [])})
            self.done.update(self._verified(state.get("shards") or {}))
        self.resumed = sorted(self.done)
        self._signatures = {label: file_signature(c) for label, c in self.inputs}
        self._hasher = threading.Thread(target=self._hash_inputs, name="aim-ray-input-hashes", daemon=True)
        self._hasher.start()
        return self.done

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads(self.file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.file}: unreadable progress file ({e}); rerun without --resume") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ConfigError(f"{self.file}: written by another aim-ray version; rerun without --resume")
        return state

    def _check_settings(self, old: Mapping[str, Any]) -> None:
        for key, value in self.settings.items():
            if old.get(key) != value:
                raise ConfigError(f"{self.work}: the {key} differs from the interrupted run's "
                                  f"({old.get(key)!r} -> {value!r}); rerun without --resume")

    def _check_inputs(self, old: Mapping[str, Mapping[str, Any]]) -> None:
        for label, ckpt in self.inputs:
            record = old.get(label) or {}
            if record.get("hash"):  # cached by (path, size, mtime): rehashed only if the files were touched
                if ckpt.content_hash() != record["hash"]:
                    raise CheckpointError(f"{label}: content changed since the interrupted run; rerun "
                                          f"without --resume")
                self._hashes[label] = record["hash"]
            elif record.get("files") != file_signature(ckpt):
                raise CheckpointError(f"{label}: weight files modified since the interrupted run (their "
                                      f"content was not hashed yet); rerun without --resume")

    def _verified(self, shards: Mapping[str, str]) -> dict[int, str]:
        n = len(self.job.shards)
        keys = [int(k) for k in shards if str(k).isdigit() and int(k) < n
                and (self.work / shard_filename(int(k), n)).is_file()]
        actual = sha256_files([self.work / shard_filename(k, n) for k in keys])
        return {k: digest for k, digest in zip(keys, actual) if digest == shards[str(k)]}

    def wait_hashed(self, timeout: float | None = None) -> bool:
        """Wait until every input's content hash is known (the next `save` records them)."""
        if self._hasher is not None:
            self._hasher.join(timeout)
        return len(self._hashes) == len(self.inputs)

    def _hash_inputs(self) -> None:
        for label, ckpt in self.inputs:
            if self._stop.is_set():
                return
            if label not in self._hashes:
                try:
                    self._hashes[label] = ckpt.content_hash()
                except OSError:
                    return  # a file vanished: the record keeps its (size, mtime) signature

    # -- recording ------------------------------------------------------------------------------------
    def record(self, index: int, digest: str) -> None:
        """Shard `index` is finished: a crash from here on keeps it for --resume."""
        self.done[index] = digest
        self.save()

    def save(self) -> None:
        inputs = [{"label": label, "path": str(c.path), "hash": self._hashes.get(label),
                   "files": self._signatures.get(label)} for label, c in self.inputs]
        state = {"format": FORMAT, "settings": self.settings, "inputs": inputs,
                 "shards": {str(k): v for k, v in sorted(self.done.items())}}
        tmp = self.work / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.file)

    def shard_digests(self) -> dict[str, str]:
        """Shard file name -> sha256, for the commit's check."""
        n = len(self.job.shards)
        return {shard_filename(i, n): d for i, d in sorted(self.done.items())}

    def resumed_names(self) -> list[str]:
        n = len(self.job.shards)
        return [shard_filename(i, n) for i in self.resumed]

    def close(self) -> None:
        """Stop hashing inputs (a file being hashed is finished; its hash lands in the cache)."""
        self._stop.set()
