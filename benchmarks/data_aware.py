"""The data-aware merges (regmean, fisher, trained localize_stitch) and the 2025 dataless ones on the real world.

    .venv/bin/python benchmarks/data_aware.py [--root DIR] [--parts methods,pipeline,heap] [--results DIR]

1. methods: for each method, one `aim-ray merge` of the real world's three experts (SmolLM2-135M) with AIM
   (omega 0.4), each expert's own training data for the statistics, a fresh statistics cache: the seconds to
   collect the statistics (from the merge report), the seconds to merge and write, and the peak heap of the
   process (anonymous RSS).
2. pipeline: the statistics pipeline (Gram and Fisher of one expert) on K = 1 vs 2 Ray workers (one CPU each):
   tokens/s after a warm-up, and the stages' summed compute time over the wall time. Target: K workers collect
   at least 0.8 K times as fast once the pipeline is full; on a 2-core machine, what 2 workers reach.
3. heap: the peak heap of each statistics worker (Fisher, the heavier kind) for a synthetic Llama of L and 2L
   layers on K = 2 workers: it follows the worker's own layer range, not the model.
4. --results DIR: the table of a finished `aim-ray demo --suite mergebench --out DIR` (normalised performance,
   forgetting, runtime per method, with and without AIM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import ray
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set, timed  # noqa: E402

from aim_ray.calibration import load_calibration_blocks, load_tokenizer  # noqa: E402
from aim_ray.driver import ClusterOptions, WorkerPool, calibration_ranges  # noqa: E402
from aim_ray.engine import prepare  # noqa: E402
from aim_ray.methods import REGISTRY  # noqa: E402
from aim_ray.worlds.real import build_real_world  # noqa: E402

BIN = Path(sys.executable).parent
METHODS = ("task_arithmetic", "ties", "localize_stitch", "localize_stitch_trained", "regmean", "fisher", "tsv",
           "iso_c", "iso_cts")
# Per expert: 8 blocks of 128 tokens of its own training texts (MergeBench samples 1,000 training examples per
# task; a 2-core machine affords about a thousand tokens per expert for the backward-pass statistics).
DATA = {"n_samples": 512, "block_size": 128, "n_blocks": 8, "micro_batch": 4}


def merge_config(path: Path, world, method: str, scales: Path) -> Path:
    m = REGISTRY[method]
    params = {k: v for k, v in {"weight": 1.0, "density": 0.5}.items() if m.param(k) is not None}
    models = [{"model": str(p), "data": {"dataset": str(world.training_data[skill]), **DATA}, "parameters": params}
              for skill, p in world.experts.items()]
    raw = {"merge_method": method, "base_model": str(world.base), "models": models,
           "aim": {"omega": 0.4, "scales": str(scales)}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def methods_part(root: Path, world) -> None:
    scales = root / "scales.safetensors"  # the AIM scales are not what is measured: one calibration, up front
    if not scales.exists():
        run = timed([str(BIN / "aim-ray"), "calibrate", str(world.base), "--out", str(scales), "--data",
                     str(world.calibration), "--n-samples", "128", "--block-size", "128", "--n-blocks", "16"])
        assert run.returncode == 0, run.tail
    print("## per method on the real world (3 experts, SmolLM2-135M, AIM omega 0.4, one process, 2 threads)")
    print("| method | statistics s | merge + write s | peak heap MB |\n|---|---|---|---|")
    for method in [m for m in METHODS if m in REGISTRY]:
        cfg = merge_config(root / f"{method}.yaml", world, method, scales)
        out = root / f"out_{method}"
        shutil.rmtree(out, ignore_errors=True)
        cache = root / f"cache_{method}"  # empty: the statistics are collected
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        run = timed([str(BIN / "aim-ray"), "merge", str(cfg), "--out", str(out), "--quiet"],
                    env={"AIM_RAY_CACHE": str(cache)})
        assert run.returncode == 0, run.tail
        report = json.loads((out / "merge_report.json").read_text())
        stats = report.get("statistics", {}).get("seconds", 0.0)
        merge = report["timings"]["merge_seconds"]
        print(f"| {method} | {stats:.1f} | {merge:.1f} | {run.peak_anon_mb:,.0f} |")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def pipeline_rate(pool: WorkerPool, job, model: str, blocks: torch.Tensor, kind: str) -> dict[str, float]:
    ranges = calibration_ranges(job, len(pool.actors))
    pool.calibrate(model, ranges, blocks[:2], 2, "float32", kind=kind)  # imports, first weights load
    start = time.perf_counter()
    pool.calibrate(model, ranges, blocks, 2, "float32", kind=kind)
    seconds = time.perf_counter() - start
    busy = ray.get([a.busy_seconds.remote() for a in pool.actors], timeout=60)
    return {"rate": blocks.numel() / seconds, "busy": sum(busy) / seconds}


def pipeline_part(world, k: int) -> None:
    expert = str(world.experts["code"])
    job = prepare(yaml_config(world))
    blocks = load_calibration_blocks(load_tokenizer(expert), str(world.training_data["code"]), 512, 128, 16)
    rates: dict[tuple[str, int], dict[str, float]] = {}
    for n in (1, k):
        with WorkerPool(ClusterOptions(workers=n, cpus_per_worker=1, gpus_per_worker=0)) as pool:
            for kind in ("gram", "fisher"):
                rates[kind, n] = pipeline_rate(pool, job, expert, blocks[:8] if kind == "fisher" else blocks, kind)
    print(f"\n## statistics pipeline, one expert (SmolLM2-135M), K = 1 vs {k} workers, 1 CPU each")
    print(f"| statistics | K=1 tokens/s | K={k} tokens/s | speed-up (target >= {0.8 * k:.1f}x) | "
          f"stages busy at once, K={k} |\n|---|---|---|---|---|")
    for kind in ("gram", "fisher"):
        r1, rk = rates[kind, 1], rates[kind, k]
        print(f"| {kind} | {r1['rate']:.0f} | {rk['rate']:.0f} | {rk['rate'] / r1['rate']:.2f}x | {rk['busy']:.2f} |")


def yaml_config(world):
    from aim_ray.config import MergeConfig, parse_config

    return parse_config(MergeConfig, {"merge_method": "task_arithmetic", "base_model": str(world.base),
                                      "models": [{"model": str(p), "parameters": {"weight": 1.0}}
                                                 for p in world.experts.values()]}, "bench")


def heap_part(root: Path, layers: int) -> None:
    from aim_ray.config import MergeConfig, parse_config

    print(f"\n## peak heap of each Fisher statistics worker, K = 2, synthetic Llama (hidden 512), "
          f"{layers} vs {2 * layers} layers")
    print("| model layers | worker | its layers | peak RSS MB | over an idle worker MB |\n|---|---|---|---|---|")
    for depth in (layers, 2 * layers):
        base, experts = build_model_set(root / f"heap-l{depth}", 1, hidden=512, intermediate=1408, layers=depth,
                                        vocab=8000)
        job = prepare(parse_config(MergeConfig, {"merge_method": "task_arithmetic", "base_model": str(base),
                                                 "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0}}]},
                                    "bench"))
        blocks = torch.randint(0, 8000, (4, 128), generator=torch.Generator().manual_seed(0))
        with WorkerPool(ClusterOptions(workers=2, cpus_per_worker=1, gpus_per_worker=0)) as pool:
            idle = ray.get([a.peak_rss_mb.remote() for a in pool.actors], timeout=60)
            ranges = calibration_ranges(job, 2)
            pool.calibrate(str(experts[0]), ranges, blocks, 1, "float32", kind="fisher")
            peaks = ray.get([a.peak_rss_mb.remote() for a in pool.actors], timeout=60)
        for w, (r, idle_mb, peak) in enumerate(zip(ranges, idle, peaks, strict=True)):
            span = f"{r.layers.start}-{r.layers.stop - 1}" + (" + embed" if r.has_embed else "") + \
                   (" + head" if r.has_head else "")
            print(f"| {depth} | {w} | {span} | {peak:,.0f} | {peak - idle_mb:,.0f} |")


def results_part(results: Path) -> None:
    from aim_ray.demo import mergebench_table

    print(f"\n## MergeBench measures of the sweep in {results}")
    print(mergebench_table(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("bench_out/data_aware"))
    ap.add_argument("--parts", default="methods,pipeline,heap")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="depth L of the heap part's smaller model")
    ap.add_argument("--results", type=Path, default=None, help="a finished mergebench demo's --out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.root.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    world = build_real_world() if parts & {"methods", "pipeline"} else None
    if "methods" in parts:
        methods_part(args.root, world)
    if parts & {"pipeline", "heap"}:
        ray.init(address="local", num_cpus=args.workers + 1, num_gpus=0, include_dashboard=False,
                 log_to_driver=False)
        try:
            if "pipeline" in parts:
                pipeline_part(world, args.workers)
            if "heap" in parts:
                heap_part(args.root, args.layers)
        finally:
            ray.shutdown()
    if args.results is not None:
        results_part(args.results)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
