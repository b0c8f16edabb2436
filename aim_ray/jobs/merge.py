"""`ray job submit` entrypoint for a merge on the cluster the job runs in.

    ray job submit --working-dir . -- python -m aim_ray.jobs.merge configs/llama2-13b-ties-aim.yaml \
        --out /shared/merges/ties --workers 4

`--working-dir .` puts the repository root on sys.path, so `aim_ray` imports from the uploaded copy whether or
not the package is installed on the cluster.

Inside a job RAY_ADDRESS is set, so Ray is attached with a plain `ray.init()` (resource arguments raise on an
existing cluster). `--workers auto` (the default) uses one worker per GPU of the cluster, or 2 without GPUs.
The plan is printed first, and a one-line JSON summary last (for log scrapers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from ..errors import AimRayError, ClusterError


def size(text: str) -> int:
    import click

    from ..cli import parse_size

    try:
        return parse_size(text)
    except click.BadParameter as e:
        raise argparse.ArgumentTypeError(e.message) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m aim_ray.jobs.merge", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="MergeKit-schema YAML (with an optional aim: section)")
    ap.add_argument("--out", required=True, help="output directory, on storage every node shares")
    ap.add_argument("--workers", default="auto", help="number of workers, or auto (one per GPU, else 2)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if enough GPUs, else 0")
    ap.add_argument("--placement", choices=["pack", "spread"], default="pack")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=size, default=size("5GB"))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--resume", action="store_true", help="reuse verified shards of an interrupted run")
    ap.add_argument("--allow-pickle", action="store_true")
    ap.add_argument("--allow-nonfinite", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def auto_workers() -> int:
    """One worker per GPU of the cluster; 2 on a CPU-only cluster."""
    import ray

    if not ray.is_initialized():
        ray.init()  # attach: RAY_ADDRESS is set inside a job (outside one this starts a local cluster)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus if gpus > 0 else 2


def run(args: argparse.Namespace) -> dict:
    from ..config import load_merge_config
    from ..driver import ClusterOptions, dry_run_plan
    from ..service import merge_from_config

    workers = auto_workers() if args.workers == "auto" else int(args.workers)
    cluster = ClusterOptions(workers=workers, cpus_per_worker=args.cpus_per_worker,
                             gpus_per_worker=args.gpus_per_worker, placement=args.placement)
    cfg = load_merge_config(args.config)
    print(dry_run_plan(cfg, cluster, seed=args.seed, shard_size=args.shard_size,
                       allow_pickle=args.allow_pickle), flush=True)
    if args.dry_run:
        return {"dry_run": True, "workers": workers}
    started = time.time()
    path = merge_from_config(cfg, args.out, seed=args.seed, shard_size=args.shard_size,
                             overwrite=args.overwrite, resume=args.resume, allow_pickle=args.allow_pickle,
                             check_finite=not args.allow_nonfinite, progress=not args.quiet, cluster=cluster)
    return {"out": str(path), "workers": workers, "seconds": round(time.time() - started, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except AimRayError as e:
        print(f"aim-ray: error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"aim-ray: cluster error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"aim_ray_job": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
