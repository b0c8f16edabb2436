"""The merge driver used by the CLI and the Ray jobs: validate, get AIM scales, merge, commit.

With `workers=1` (the default) everything runs in this process through `engine`. With more workers the
same per-tensor functions run inside Ray actors (`driver.py` drives the `actors.py` workers); the output is
bit-identical.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, OutputDir
from .config import MergeConfig, parse_config
from .engine import model_dtype, prepare, run_merge, stored_vocab_rows
from .relaxer import aim_for_job
from .statistics import attach_statistics

if TYPE_CHECKING:
    from .driver import ClusterOptions


def merge_from_config(cfg: MergeConfig, out: str | os.PathLike, *, seed: int = 0,
                      shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, resume: bool = False,
                      allow_pickle: bool = False, check_finite: bool = True, progress: bool = True,
                      workers: int = 1, address: str | None = None,
                      cluster: ClusterOptions | None = None, tokenizer_src: Path | None = None) -> Path:
    """Merge (and relax, if `cfg.aim`) into `out`. Every input is validated before anything is written.

    More than one worker (`workers`, or `cluster.workers`) runs the merge on Ray (`driver.distributed_merge`,
    attaching to `address` / RAY_ADDRESS or starting a local cluster); one worker never imports Ray."""
    job = prepare(cfg, seed=seed, allow_pickle=allow_pickle, check_finite=check_finite, shard_size=shard_size)
    if tokenizer_src is not None:  # relax: the merged model's tokenizer files, copied as they are
        job.tokenizer_src = tokenizer_src
    output = OutputDir(out, overwrite=overwrite, resume=resume)  # refuse an existing output before any long work
    with output.locked():  # and a second run to the same output, before calibrating
        if (cluster.workers if cluster is not None else workers) > 1:
            from .driver import ClusterOptions, distributed_merge, pool_aim

            cluster = cluster or ClusterOptions(workers=workers, address=address)
            return distributed_merge(job, output, cluster, allow_pickle=allow_pickle, aim=pool_aim(job),
                                     progress=progress)
        relax, metadata, report = aim_for_job(job)
        report.update(attach_statistics(job))
        return run_merge(job, output, relax=relax, metadata=metadata, report=report, progress=progress)


def relax_checkpoint(base: str, merged: str, out: str | os.PathLike, *, omega: float, scales: str | None = None,
                     kind: str = "activation", force: bool = False, calibration: dict[str, Any] | None = None,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """AIM on any merged checkpoint: task arithmetic with the merged model as the one expert gives exactly
    delta = merged - base, which is then relaxed. Vocabulary and tokenizer follow the merged model."""
    merged_ckpt = Checkpoint.open(merged)
    # Equal vocabularies: no tokenizer section, so the merged model's rows (padding included) are kept as they
    # are; MergeKit's tokenizer rules would cut them to its tokenizer's length.
    same_rows = stored_vocab_rows(merged_ckpt) == stored_vocab_rows(Checkpoint.open(base))
    aim = {"omega": omega, "kind": kind, "force": force}
    aim.update({"scales": scales} if scales else {"calibration": {k: v for k, v in (calibration or {}).items()
                                                                   if v is not None}})
    cfg = parse_config(MergeConfig, {
        "merge_method": "task_arithmetic", "base_model": str(base),
        **({} if same_rows else {"tokenizer_source": str(merged)}),
        "models": [{"model": str(merged), "parameters": {"weight": 1.0}}],
        "out_dtype": str(model_dtype(merged_ckpt)).removeprefix("torch."), "aim": aim}, "relax options")
    return merge_from_config(cfg, out, overwrite=overwrite, progress=progress,
                             tokenizer_src=merged_ckpt.path if same_rows else None)
