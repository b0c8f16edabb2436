"""aim-ray merge vs mergekit-yaml, side by side in one run, plus the I/O floor and peak heap vs N.

    .venv/bin/python benchmarks/merge_speed.py [--root DIR] [--quick] [--skip-mergekit-heap]
        [--methods M ...] [--skip-speed] [--skip-heap] [--heap-threads T]

Speed: base + experts (~220M parameters, bf16, 2 shards each, ~440 MB per model) for every method in
`METHODS` (3 experts, or what the method takes: slerp, nearswap and arcee_fusion 1, nuslerp 2), and a passthrough slices
frankenmerge (two experts' layer ranges stacked: 2L - 2 layers). Memory: ties with
N = 2, 4, 8, 16 experts for both tools, and every streaming method at the smallest and largest N for aim-ray:
peak anonymous RSS (heap; memory-mapped input pages are page cache, not heap). Inputs are warm in the page
cache for every tool alike (they were just written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set, io_floor, merge_yaml, timed  # noqa: E402

BIN = Path(sys.executable).parent
# method -> (experts, per-model parameters, global parameters)
METHODS: dict[str, tuple[int, dict, dict]] = {
    "task_arithmetic": (3, {"weight": 0.5}, {}),
    "ties": (3, {"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": (3, {"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs": (3, {"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}),
    "sce": (3, {"weight": 0.5}, {"select_topk": 0.5}),
    "slerp": (1, {}, {"t": 0.4}),
    "nuslerp": (2, {"weight": 0.5}, {}),
    "model_stock": (3, {}, {}),
    "karcher": (3, {}, {}),
    "linear": (3, {"weight": 0.5}, {"weight": 0.1}),  # the global weight merges the base as one more model
    "dare_linear": (3, {"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs_ties": (3, {"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}),
    "della": (3, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": (3, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
    "multislerp": (3, {"weight": 0.5}, {}),
    "ram": (3, {}, {}),
    "ramplus_tl": (3, {}, {}),
    "nearswap": (1, {}, {"t": 0.5}),
    "arcee_fusion": (1, {}, {}),
}
# Every method of METHODS that takes any number of experts: its peak heap must not grow with them.
STREAMING = tuple(m for m, (n, _, _) in METHODS.items() if n > 2)


def method_yaml(work: Path, method: str, base: Path, experts: list[Path], n: int | None = None) -> Path:
    count, per_model, shared = METHODS[method]
    n = n or count
    path = merge_yaml(work / f"{method}_{n}.yaml", method, base, experts[:n], per_model)
    data = yaml.safe_load(path.read_text())
    if shared:
        data["parameters"] = dict(shared)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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


def frankenmerge_yaml(work: Path, experts: list[Path], layers: int) -> Path:
    """A passthrough frankenmerge: layers [0, L-1) of one expert stacked on layers [1, L) of another."""
    data = {"merge_method": "passthrough", "dtype": "float32", "out_dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(experts[0]), "layer_range": [0, layers - 1]}]},
        {"sources": [{"model": str(experts[1]), "layer_range": [1, layers]}]}]}
    path = work / "passthrough_slices.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def speed_row(label: str, cfg: Path, inputs: list[Path], work: Path) -> None:
    """One row of the speed table: aim-ray (default threads and 1 thread) vs MergeKit, and the I/O floor."""
    floor = io_floor(inputs, work / "floor.bin")
    ours = run_tool("aim-ray", cfg, work / "out")
    single = run_tool("aim-ray", cfg, work / "out", threads=1)
    theirs = run_tool("mergekit", cfg, work / "out", best_threads=True)
    print(f"| {label} | {ours.seconds:.2f} | {single.seconds:.2f} | {theirs.seconds:.2f} | "
          f"{theirs.seconds / ours.seconds:.2f}x | {theirs.seconds / single.seconds:.2f}x | {floor:.2f} | "
          f"{ours.seconds / floor:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("bench_out/merge_speed"))
    ap.add_argument("--quick", action="store_true", help="small model (~30M parameters), N up to 4")
    ap.add_argument("--skip-mergekit-heap", action="store_true",
                    help="skip MergeKit's ties heap vs N table (its N=16 run alone takes minutes)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="only these methods' speed and heap rows")
    ap.add_argument("--skip-speed", action="store_true", help="skip the speed table")
    ap.add_argument("--skip-heap", action="store_true", help="skip the heap tables")
    ap.add_argument("--heap-threads", type=int, help="aim-ray's --threads in its heap rows (default: as shipped)")
    args = ap.parse_args()
    methods = args.methods or list(METHODS)
    speed_methods = [] if args.skip_speed else methods
    shape = dict(hidden=512, intermediate=1408, layers=4, vocab=8000) if args.quick else {}
    ns = [2, 4] if args.quick else [2, 4, 8, 16]
    base, experts = build_model_set(args.root, max(ns), **shape)
    work = args.root / "work"
    work.mkdir(exist_ok=True)

    print("## speed: base + 3 experts" if speed_methods else "## speed: skipped")
    print("I/O floor: read the 4 models, write and fsync one; measured right before each aim-ray run, since it "
          "moves with the page cache's dirty pages")
    print("| method | aim-ray s | aim-ray 1 thread s | mergekit s | speed-up | speed-up 1 thread | I/O floor s | "
          "aim-ray / I/O floor |")
    print("|---|---|---|---|---|---|---|---|")
    for method in speed_methods:
        n = METHODS[method][0]
        speed_row(f"{method} ({n})", method_yaml(work, method, base, experts), [base, *experts[:n]], work)
    if speed_methods and args.methods is None:
        layers = shape.get("layers", 12)
        speed_row(f"passthrough slices (2 x {layers - 1} layers)", frankenmerge_yaml(work, experts, layers),
                  experts[:2], work)

    if args.skip_heap:
        return
    if not args.skip_mergekit_heap and "ties" in methods:  # that table is ties vs N
        print("\n## peak heap (anonymous RSS), ties density 0.5")
        print("| N experts | aim-ray MB | mergekit MB | aim-ray s | mergekit s |")
        print("|---|---|---|---|---|")
        first = None
        for n in ns:
            cfg = method_yaml(work, "ties", base, experts, n)
            ours = run_tool("aim-ray", cfg, work / "out", threads=args.heap_threads)
            theirs = run_tool("mergekit", cfg, work / "out")
            first = first or ours.peak_anon_mb
            print(f"| {n} | {ours.peak_anon_mb:.0f} | {theirs.peak_anon_mb:.0f} | {ours.seconds:.2f} | "
                  f"{theirs.seconds:.2f} |", flush=True)
        print(f"\naim-ray peak heap growth N={ns[0]} -> N={ns[-1]}: {100 * (ours.peak_anon_mb / first - 1):+.1f}%")

    threads = f"--threads {args.heap_threads}" if args.heap_threads else "threads as shipped"
    print(f"\n## aim-ray peak heap of every streaming method, N={ns[0]} vs N={ns[-1]} ({threads})")
    print(f"| method | N={ns[0]} MB | N={ns[-1]} MB | growth |")
    print("|---|---|---|---|")
    for method in (m for m in STREAMING if m in methods):
        small, large = (run_tool("aim-ray", method_yaml(work, method, base, experts, n), work / "out",
                                 threads=args.heap_threads) for n in (ns[0], ns[-1]))
        print(f"| {method} | {small.peak_anon_mb:.0f} | {large.peak_anon_mb:.0f} | "
              f"{100 * (large.peak_anon_mb / small.peak_anon_mb - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
