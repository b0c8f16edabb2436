"""The marginal cost of one more omega in a sweep vs one full merge + AIM, side by side in one run.

    .venv/bin/python benchmarks/tune.py [--root DIR] [--repeats 3] [--no-eval]

A sweep merges each method variant once (a cached float32 delta) and computes the scales once; one more omega
then costs one relaxation of the cached delta plus the write of the model (`tune.trial_model`), and its
evaluation. This script measures, on the same inputs with the scales cached, both sides:

- one-pass merge + AIM: `service.merge_from_config` of the variant's MergeConfig with an `aim:` section naming
  the cached scales (what `aim-ray merge` does with such a YAML; the merge reads base + 3 experts);
- one more omega: `tune.trial_model` (relax the cached delta with omega, write the model);
- once per variant, for reference: writing the cached delta (`engine.write_delta`).

On synthetic Llama-shaped bf16 models big enough that the merge dominates (hidden 512, intermediate 1408,
4 layers, vocabulary 8000: ~21M parameters, ~42 MB per model; base + 3 experts, TIES density 0.5), with no
evaluation; and on the tiny world (the demo's models), where it also times the evaluation of one trial model
(lm-eval, hf backend, the toy suite, in process: what the sweep's evaluation actor does per trial).
Target: one more omega costs at most 15% of a one-pass merge + AIM on the synthetic models.

All timings: one intra-op thread (`torch.set_num_threads(1)`, fair on a shared 2-core machine), warm page
cache, one warm-up of each side, then the best of `--repeats` alternating runs. The outputs of both sides are
checked to be bit-identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set  # noqa: E402

from aim_ray import tune  # noqa: E402
from aim_ray.checkpoint import Checkpoint  # noqa: E402
from aim_ray.config import TuneSweepConfig  # noqa: E402
from aim_ray.demo import demo_config  # noqa: E402
from aim_ray.engine import prepare, write_delta  # noqa: E402
from aim_ray.service import merge_from_config  # noqa: E402

SHAPE = dict(hidden=512, intermediate=1408, layers=4, vocab=8000)
OMEGA = 0.4


def synthetic_config(root: Path) -> TuneSweepConfig:
    base, experts = build_model_set(root / "models", 3, **SHAPE)
    text = root / "calibration.txt"
    if not text.exists():
        text.write_text("\n".join(f"sample {i}: merge experts with activation informed merging {i * 7}"
                                  for i in range(400)))
    return TuneSweepConfig.model_validate({
        "base_model": str(base), "methods": ["ties"], "omegas": [OMEGA],
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts],
        "calibration": {"dataset": str(text), "n_samples": 64, "block_size": 64},
    })


def toy_config() -> TuneSweepConfig:
    from aim_ray.worlds.toy import build_toy_world

    world = build_toy_world()
    cfg = demo_config(world, methods=("ties",), omegas=(OMEGA,))
    return cfg


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


def measure(cfg: TuneSweepConfig, work: Path, repeats: int) -> dict[str, float]:
    """Seconds: one-pass merge + AIM, one more omega (relax + write), writing the cached delta."""
    variant = tune.plan_variants(cfg)[0]
    scales, _ = tune.cached_scales(cfg)  # calibrated once (cached), as in a sweep and for `aim-ray merge`
    delta, _ = tune.cached_delta(cfg, variant)
    one_pass_cfg = tune.merge_config(cfg, variant, OMEGA, str(scales))
    work.mkdir(parents=True, exist_ok=True)

    def one_pass() -> None:
        merge_from_config(one_pass_cfg, work / "one-pass", seed=cfg.seed, overwrite=True, progress=False)

    def one_more_omega() -> None:
        tune.trial_model(cfg, variant, OMEGA, delta, scales, work / "trial")

    def cached_delta() -> None:
        shutil.rmtree(work / "delta", ignore_errors=True)
        write_delta(prepare(tune.merge_config(cfg, variant), seed=cfg.seed), work / "delta")

    best = {"one_pass": float("inf"), "omega": float("inf"), "delta": float("inf")}
    one_pass(), one_more_omega()  # warm-up: imports, page cache, file-hash memos
    a, b = tensors(work / "one-pass"), tensors(work / "trial")
    if a.keys() != b.keys() or not all(torch.equal(a[n], b[n]) for n in a):
        raise SystemExit("one more omega (relaxed cached delta) is not bit-identical to the one-pass merge + AIM")
    for _ in range(repeats):  # alternating, so both sides see the same background load
        best["one_pass"] = min(best["one_pass"], timed(one_pass))
        best["omega"] = min(best["omega"], timed(one_more_omega))
        best["delta"] = min(best["delta"], timed(cached_delta))
    best["params"] = sum(t.numel() for t in a.values()) / 1e6
    best["mb"] = sum(f.stat().st_size for f in (work / "trial").glob("*.safetensors")) / 1e6
    shutil.rmtree(work, ignore_errors=True)
    return best


def eval_seconds(cfg: TuneSweepConfig, work: Path, repeats: int) -> float:
    """lm-eval (hf backend, CPU) of one relaxed trial model of the tiny world, as the sweep's evaluation actor
    runs it (the demo's settings: the whole toy suite); best of `repeats` after a warm-up."""
    from aim_ray.evaluation import EvalWorker, resolve_suite

    variant = tune.plan_variants(cfg)[0]
    scales, _ = tune.cached_scales(cfg)
    delta, _ = tune.cached_delta(cfg, variant)
    model = tune.trial_model(cfg, variant, OMEGA, delta, scales, work / "eval-model")
    tasks, include = resolve_suite(cfg.eval.suite, cfg.eval.include_path)
    worker = EvalWorker(cfg.eval.backend, tasks=tasks, include_path=include, limit=cfg.eval.limit,
                        batch_size=cfg.eval.batch_size, device="cpu")
    worker.score(model)  # warm-up: lm-eval imports, task indexing, datasets
    seconds = min(timed(lambda: worker.score(model)) for _ in range(repeats))
    shutil.rmtree(work, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("bench_out/tune"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-eval", action="store_true", help="skip the tiny world's evaluation timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request bars
    root = args.root.absolute()
    rows = []
    cfg = synthetic_config(root)
    rows.append(("synthetic Llama bf16 (h512, 4 layers, vocab 8000)", measure(cfg, root / "work", args.repeats),
                 None))
    toy = toy_config()
    toy_row = measure(toy, root / "toy-work", args.repeats)
    rows.append(("tiny world (the demo's models, float32)", toy_row,
                 None if args.no_eval else eval_seconds(toy, root / "toy-eval", args.repeats)))

    print(f"## One more omega in a sweep vs one merge + AIM (TIES density 0.5, 3 experts, omega {OMEGA}, scales "
          f"cached; 1 thread; best of {args.repeats})")
    print("| models | params (M) | output (MB) | one-pass merge + AIM (s) | one more omega: relax + write (s) "
          "| ratio | cached delta, once per variant (s) | eval of one trial (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r, ev in rows:
        print(f"| {label} | {r['params']:.1f} | {r['mb']:.1f} | {r['one_pass']:.3f} | {r['omega']:.3f} | "
              f"{r['omega'] / r['one_pass']:.1%} | {r['delta']:.3f} | {'-' if ev is None else f'{ev:.2f}'} |")
    synthetic = rows[0][1]
    ratio = synthetic["omega"] / synthetic["one_pass"]
    print(f"\ntarget: one more omega <= 15% of a one-pass merge + AIM on the synthetic models: {ratio:.1%} "
          f"({'met' if ratio <= 0.15 else 'NOT met'})")
    if rows[1][2] is not None:
        print(f"tiny world: evaluating a trial takes {rows[1][2] / toy_row['omega']:.0f}x its relax + write")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
