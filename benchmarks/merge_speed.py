"""aim-ray merge vs mergekit-yaml, side by side in one run, plus the I/O floor and peak heap vs N.

    .venv/bin/python benchmarks/merge_speed.py [--root DIR] [--quick]

Speed: base + 3 experts (~220M parameters, bf16, 2 shards each, ~440 MB per model) for task_arithmetic,
ties (density 0.5), dare_ties (density 0.5) and breadcrumbs (density 0.9, gamma 0.01). Memory: ties with
N = 2, 4, 8, 16 experts, peak anonymous RSS (heap; memory-mapped input pages are page cache, not heap).
Inputs are warm in the page cache for every tool alike (they were just written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set, io_floor, merge_yaml, timed  # noqa: E402

BIN = Path(sys.executable).parent
METHODS = {
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "breadcrumbs": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
}


def run_tool(tool: str, cfg: Path, out: Path, best_threads: bool = False, threads: int | None = None):
    """One timed run. aim-ray runs as shipped (`--threads` defaults to the CPUs, at most 4) or with `threads`.
    With best_threads, MergeKit runs with its default threads and with OMP_NUM_THREADS=1, and its faster
    run counts (the fairest comparison)."""
    if tool == "aim-ray":
        cmd = [str(BIN / "aim-ray"), "merge", str(cfg), "--out", str(out), "--quiet"]
        cmd += ["--threads", str(threads)] if threads else []
    else:
        cmd = [str(BIN / "mergekit-yaml"), str(cfg), str(out), "--quiet", "--random-seed", "0"]
    runs = []
    for env in ([{}, {"OMP_NUM_THREADS": "1"}] if best_threads and tool != "aim-ray" else [{}]):
        shutil.rmtree(out, ignore_errors=True)
        run = timed(cmd, env)
        if run.returncode != 0:
            raise SystemExit(f"{tool} failed:\n{run.tail}")
        runs.append(run)
    shutil.rmtree(out, ignore_errors=True)
    return min(runs, key=lambda r: r.seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("bench_out/merge_speed"))
    ap.add_argument("--quick", action="store_true", help="small model (~30M parameters), N up to 4")
    args = ap.parse_args()
    shape = dict(hidden=512, intermediate=1408, layers=4, vocab=8000) if args.quick else {}
    ns = [2, 4] if args.quick else [2, 4, 8, 16]
    base, experts = build_model_set(args.root, max(ns), **shape)
    work = args.root / "work"
    work.mkdir(exist_ok=True)

    print("## speed: base + 3 experts")
    print("I/O floor: read the 4 models, write and fsync one; measured right before each aim-ray run, since it "
          "moves with the page cache's dirty pages")
    print("| method | aim-ray s | aim-ray 1 thread s | mergekit s | speed-up | speed-up 1 thread | I/O floor s | "
          "aim-ray / I/O floor |")
    print("|---|---|---|---|---|---|---|---|")
    for method, params in METHODS.items():
        cfg = merge_yaml(work / f"{method}.yaml", method, base, experts[:3], params)
        floor = io_floor([base, *experts[:3]], work / "floor.bin")
        ours = run_tool("aim-ray", cfg, work / "out")
        single = run_tool("aim-ray", cfg, work / "out", threads=1)
        theirs = run_tool("mergekit", cfg, work / "out", best_threads=True)
        print(f"| {method} | {ours.seconds:.2f} | {single.seconds:.2f} | {theirs.seconds:.2f} | "
              f"{theirs.seconds / ours.seconds:.2f}x | {theirs.seconds / single.seconds:.2f}x | {floor:.2f} | "
              f"{ours.seconds / floor:.2f}x |", flush=True)

    print("\n## peak heap (anonymous RSS), ties density 0.5")
    print("| N experts | aim-ray MB | mergekit MB | aim-ray s | mergekit s |")
    print("|---|---|---|---|---|")
    first = None
    for n in ns:
        cfg = merge_yaml(work / f"ties_{n}.yaml", "ties", base, experts[:n], METHODS["ties"])
        ours = run_tool("aim-ray", cfg, work / "out")
        theirs = run_tool("mergekit", cfg, work / "out")
        first = first or ours.peak_anon_mb
        print(f"| {n} | {ours.peak_anon_mb:.0f} | {theirs.peak_anon_mb:.0f} | {ours.seconds:.2f} | "
              f"{theirs.seconds:.2f} |", flush=True)
    print(f"\naim-ray peak heap growth N={ns[0]} -> N={ns[-1]}: {100 * (ours.peak_anon_mb / first - 1):+.1f}%")


if __name__ == "__main__":
    main()
