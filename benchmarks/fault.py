"""Merge + AIM on a 3-node local Ray cluster, uninterrupted vs one node removed mid-merge.

    .venv/bin/python benchmarks/fault.py [--root DIR] [--grace 5]

Each node has exactly one worker slot, so the removed node's worker cannot restart anywhere: the driver
declares it lost after `--grace` seconds and moves its shards to the two survivors. Prints both wall times,
the time lost, and whether the two outputs are byte-identical (the merge report aside).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set, merge_yaml  # noqa: E402

from aim_ray.config import CalibrationConfig, load_merge_config  # noqa: E402
from aim_ray.driver import ClusterOptions, WorkerPool, distributed_merge, distributed_scales  # noqa: E402
from aim_ray.engine import MergeJob, prepare  # noqa: E402
from aim_ray.relaxer import aim_for_job  # noqa: E402

SHAPE = dict(hidden=768, intermediate=2048, layers=8, vocab=8000, n_shards=2)


def make_job(root: Path, shard_size: int) -> MergeJob:
    base, experts = build_model_set(root / "models", 3, **SHAPE)
    path = merge_yaml(root / "ties.yaml", "ties", base, experts, {"weight": 0.5, "density": 0.5})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "aim": {"omega": 0.4}}))
    return prepare(load_merge_config(path), shard_size=shard_size)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "merge_report.json")
    return names == sorted(p.name for p in b.iterdir() if p.name != "merge_report.json") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def run(job: MergeJob, cluster: Cluster, nodes: list, options: ClusterOptions, aim, out: Path,
        remove: bool) -> tuple[float, Path]:
    pool = WorkerPool(options)
    removed: list[str] = []
    victim = pool.nodes[-1]

    def on_done(index: int, digest: str, pid: int) -> None:
        if remove and not removed:
            removed.append(victim)
            cluster.remove_node(next(n for n in nodes if n.node_id == victim))

    start = time.perf_counter()
    path = distributed_merge(job, out, options, pool=pool, aim=aim, progress=False, on_done=on_done)
    seconds = time.perf_counter() - start
    pool.close()
    return seconds, path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("bench_out/fault"))
    ap.add_argument("--grace", type=float, default=5.0, help="lost_worker_grace_s")
    ap.add_argument("--shard-size", type=int, default=20_000_000)
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    job = make_job(args.root, args.shard_size)
    calib = args.root / "calib.txt"
    calib.write_text("\n".join(f"sample {i}: merge experts with activation informed merging {i * 7}"
                               for i in range(400)))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    options = ClusterOptions(workers=3, cpus_per_worker=1, gpus_per_worker=0, placement="spread",
                             resources_per_worker={"slot": 1}, lost_worker_grace_s=args.grace)
    try:
        with WorkerPool(options) as pool:  # AIM scales from the 3-stage pipeline, once, for both runs
            scales = distributed_scales(pool, job, CalibrationConfig(dataset=str(calib), n_samples=64,
                                                                     block_size=128),
                                        cache_root=args.root / "cache")
        relax = aim_for_job(job, scales)
        for d in ("clean", "fault"):
            shutil.rmtree(args.root / d, ignore_errors=True)
        clean, a = run(job, cluster, nodes, options, lambda _p: relax, args.root / "clean", remove=False)
        fault, b = run(job, cluster, nodes, options, lambda _p: relax, args.root / "fault", remove=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"merge + AIM (ties, 3 experts, {sum(t.nbytes for t in job.outputs) / 1e6:.0f} MB out, "
          f"{len(job.shards)} shards) on 3 nodes x 1 slot")
    print(f"| run | wall s |\n|---|---|\n| uninterrupted | {clean:.1f} |\n| one node removed mid-merge | "
          f"{fault:.1f} |")
    print(f"time lost: {fault - clean:.1f} s (grace {args.grace:.0f} s included); outputs byte-identical: "
          f"{same_files(a, b)}")


if __name__ == "__main__":
    main()
