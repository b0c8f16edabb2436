"""The Ray merge service, side by side in one run: K=1 vs K merge (+AIM) and the calibration pipeline.

    .venv/bin/python benchmarks/service.py [--root DIR] [--workers 2]      # CPU, a ~69M-parameter Llama shape
    .venv/bin/python benchmarks/service.py --gpu [--root DIR]               # GPU machine, 7B Llama shape

Prints (all in one run, same inputs, warm page cache):
- merge + AIM relaxation (ties, 3 experts, scales from the pipeline): K=1 (the single-process path, no Ray)
  vs K workers (Ray, warm pool), wall time and ratio; also K workers including the pool start (cold);
- calibration throughput (tokens/s): the pipeline with K stages vs 1 stage, each stage `--cpus-per-worker`
  threads (CPU) or one GPU (`--gpu`), same blocks and micro-batches;
- `--gpu`: merge throughput in GB of output per second.
On a shared 2-core machine the CPU ratios are bounded by the cores left free by others: read them as such.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import ray
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set, merge_yaml  # noqa: E402

from aim_ray.config import CalibrationConfig, load_merge_config  # noqa: E402
from aim_ray.driver import (  # noqa: E402
    ClusterOptions,
    WorkerPool,
    distributed_merge,
    distributed_scales,
    layer_ranges,
)
from aim_ray.engine import MergeJob, prepare, run_merge  # noqa: E402
from aim_ray.relaxer import aim_for_job  # noqa: E402

CPU_SHAPE = dict(hidden=768, intermediate=2048, layers=8, vocab=8000, n_shards=2)
GPU_SHAPE = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, n_shards=3)  # Llama-2-7B sizes


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def calib_text(path: Path, lines: int = 400) -> Path:
    path.write_text("\n".join(f"sample {i}: merge experts with activation informed merging {i * 7}"
                              for i in range(lines)))
    return path


def make_job(root: Path, base: Path, experts: list[Path], shard_size: int, omega: float) -> MergeJob:
    path = merge_yaml(root / "ties.yaml", "ties", base, experts, {"weight": 0.5, "density": 0.5})
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "aim": {"omega": omega}}))  # scales: given to aim_for_job
    return prepare(load_merge_config(path), shard_size=shard_size)


def bench_merge(job: MergeJob, pool: WorkerPool, cluster: ClusterOptions, scales, work: Path) -> dict:
    relax, metadata, report = aim_for_job(job, scales)

    def single() -> Path:
        return run_merge(job, work / "k1", relax=relax, metadata=metadata, report=report, progress=False)

    def aim(_pool):
        return relax, metadata, report

    def ray_merge(out: str, p: WorkerPool | None = None) -> Path:
        return distributed_merge(job, work / out, cluster, aim=aim, pool=p, progress=False)

    ray_merge("warmup", pool)  # workers import the engine and open the checkpoints once
    single()  # the same warm-up in process
    shutil.rmtree(work / "k1")
    t1 = tk = float("inf")
    for _ in range(2):  # best of two, alternating, so both see the same background load
        for d in ("k1", "kwarm"):
            shutil.rmtree(work / d, ignore_errors=True)
        t1 = min(t1, timed(single)[0])
        tk = min(tk, timed(lambda: ray_merge("kwarm", pool))[0])
    for d in ("k1", "warmup", "kwarm"):
        shutil.rmtree(work / d, ignore_errors=True)
    return {"k1": t1, "k": tk, "bytes": sum(t.nbytes for t in job.outputs), "aim": aim}


def cold_merge(job: MergeJob, cluster: ClusterOptions, aim, work: Path) -> float:
    """K workers including the pool start (placement group, actor processes, imports)."""
    seconds, _ = timed(lambda: distributed_merge(job, work / "kcold", cluster, aim=aim, progress=False))
    shutil.rmtree(work / "kcold", ignore_errors=True)
    return seconds


def calibration_rate(job: MergeJob, pool: WorkerPool, blocks: torch.Tensor, micro_batch: int,
                     dtype: str) -> dict[str, float]:
    """Tokens/s of the pipeline over the pool's workers (one stage each), after a warm-up micro-batch, and
    the stages' summed compute time over the wall time (how many stages were busy at once, on average)."""
    base = str(job.base.path)
    ranges = layer_ranges(job, len(pool.actors))
    pool.calibrate(base, ranges, blocks[:micro_batch], micro_batch, dtype)  # imports, first weights load
    seconds, _ = timed(lambda: pool.calibrate(base, ranges, blocks, micro_batch, dtype))
    busy = ray.get([a.busy_seconds.remote() for a in pool.actors])
    return {"rate": blocks.numel() / seconds, "busy": sum(busy) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("bench_out/service"))
    ap.add_argument("--workers", type=int, default=None, help="K (default: 2; --gpu: GPU count)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpu", action="store_true", help="GPU machine: 7B Llama shape, one GPU per worker")
    ap.add_argument("--blocks", type=int, default=None, help="calibration blocks (default 16 CPU, 64 GPU)")
    ap.add_argument("--block-size", type=int, default=None, help="default 256 CPU, 512 GPU")
    ap.add_argument("--micro-batch", type=int, default=2)
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    k = args.workers or (torch.cuda.device_count() if args.gpu else 2)
    if not args.gpu:  # the in-process K=1 merge gets what each worker gets: cpus_per_worker threads
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    shape = GPU_SHAPE if args.gpu else CPU_SHAPE
    root = args.root / f"{'gpu' if args.gpu else 'cpu'}-h{shape['hidden']}-l{shape['layers']}"
    base, experts = build_model_set(root, 3, **shape)
    work = root / "work"
    work.mkdir(exist_ok=True)
    job = make_job(work, base, experts, shard_size=(2 * 10**9 if args.gpu else 5 * 10**6), omega=0.4)
    n_blocks = args.blocks or (64 if args.gpu else 16)
    block_size = args.block_size or (512 if args.gpu else 256)
    dtype = "bfloat16" if args.gpu else "float32"
    gpus = 1.0 if args.gpu else 0.0

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             **({} if args.gpu else {"num_cpus": k + 1, "num_gpus": 0}))
    blocks = torch.randint(0, 256, (n_blocks, block_size), generator=torch.Generator().manual_seed(0))
    cal = CalibrationConfig(dataset=str(calib_text(work / "calib.txt")), n_samples=256, block_size=64,
                            micro_batch=args.micro_batch)
    try:
        rates, merge = {}, {}
        for n in sorted({1, k}):  # one pool at a time: with --gpu, K pools would hold every GPU
            opts = ClusterOptions(workers=n, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus)
            with WorkerPool(opts) as pool:
                rates[n] = calibration_rate(job, pool, blocks, args.micro_batch, dtype)
                if n == k:
                    scales = distributed_scales(pool, job, cal, cache_root=work / "scales", refresh=True)
                    merge = bench_merge(job, pool, opts, scales, work)
            if n == k:
                merge["cold"] = cold_merge(job, opts, merge.pop("aim"), work)
    finally:
        ray.shutdown()
    report(args, k, job, rates, merge, n_blocks, block_size)


def report(args, k: int, job: MergeJob, rates: dict[int, dict[str, float]], merge: dict, n_blocks: int,
           block_size: int) -> None:
    mode = "GPU, 1 GPU per worker" if args.gpu else f"CPU, {args.cpus_per_worker:g} CPU per worker"
    gb = merge["bytes"] / 1e9
    print(f"## aim-ray service ({mode}); ties + AIM omega 0.4, 3 experts, {gb:.2f} GB output, "
          f"{len(job.shards)} shards")
    print(f"| measurement | K=1 | K={k} | ratio |")
    print("|---|---|---|---|")
    print(f"| merge + AIM relax, wall s (K=1: in process; K: warm pool) | {merge['k1']:.2f} | "
          f"{merge['k']:.2f} | {merge['k1'] / merge['k']:.2f}x |")
    print(f"| merge + AIM relax incl. pool start, wall s | {merge['k1']:.2f} | {merge['cold']:.2f} | "
          f"{merge['k1'] / merge['cold']:.2f}x |")
    if args.gpu:
        print(f"| merge throughput, GB/s of output | {gb / merge['k1']:.2f} | {gb / merge['k']:.2f} | "
              f"{merge['k1'] / merge['k']:.2f}x |")
    r1, rk = rates[1], rates[k]
    print(f"| calibration, tokens/s ({n_blocks} blocks x {block_size}, micro-batch {args.micro_batch}) | "
          f"{r1['rate']:.0f} | {rk['rate']:.0f} | {rk['rate'] / r1['rate']:.2f}x |")
    print(f"| calibration, stages busy at once (sum of stage compute / wall) | {r1['busy']:.2f} | "
          f"{rk['busy']:.2f} | |")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
