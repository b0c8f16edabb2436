"""Calibration cost of the scale hooks, and merge+AIM in one pass vs merge then relax.

    .venv/bin/python benchmarks/calibration.py [--root DIR] [--quick]

1. Tokens/s of the base model's forward with the scale hooks vs the same forward without hooks
   (same StageRunner, same blocks, interleaved repeats, best of each). Target: hooks cost <= 10%.
2. Seconds for `aim-ray merge` with an `aim:` section (one pass) vs plain merge, and vs plain merge followed
   by `aim-ray relax` (two passes). Target: one pass within 1.2x of the plain merge.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model_set, merge_yaml, timed  # noqa: E402

from aim_ray.calibration import StageRunner  # noqa: E402

BIN = Path(sys.executable).parent


def forward_seconds(runner: StageRunner, blocks: torch.Tensor, micro_batch: int, hooks: bool) -> float:
    if hooks:
        runner.start_recording()
    start = time.perf_counter()
    for i in range(0, blocks.shape[0], micro_batch):
        runner.forward(blocks[i:i + micro_batch])
    seconds = time.perf_counter() - start
    if hooks:
        runner.stop_recording()
    return seconds


def hooks_overhead(base: Path, n_blocks: int, block_size: int, micro_batch: int, repeats: int) -> None:
    runner = StageRunner(base, 0, int(yaml.safe_load((base / "config.json").read_text())["num_hidden_layers"]))
    vocab = runner.config.vocab_size
    blocks = torch.randint(0, vocab, (n_blocks, block_size), generator=torch.Generator().manual_seed(0))
    forward_seconds(runner, blocks[:micro_batch], micro_batch, False)  # warm-up
    plain, hooked = [], []
    for _ in range(repeats):
        plain.append(forward_seconds(runner, blocks, micro_batch, False))
        hooked.append(forward_seconds(runner, blocks, micro_batch, True))
    tokens = n_blocks * block_size
    p, h = min(plain), min(hooked)
    print(f"| without hooks | {tokens / p:,.0f} tokens/s |\n| with hooks | {tokens / h:,.0f} tokens/s |")
    print(f"hook overhead: {100 * (h / p - 1):+.1f}% (target <= 10%)")


def one_pass_vs_two(root: Path, base: Path, experts: list[Path], calib: Path) -> None:
    work = root / "calib_work"
    work.mkdir(exist_ok=True)
    scales = work / "scales.safetensors"
    if not scales.exists():
        run = timed([str(BIN / "aim-ray"), "calibrate", str(base), "--out", str(scales), "--data", str(calib),
                     "--n-samples", "64", "--block-size", "128"])
        assert run.returncode == 0, run.tail
    params = {"weight": 1.0, "density": 0.5}
    plain_cfg = merge_yaml(work / "plain.yaml", "ties", base, experts, params)
    aim_cfg = work / "aim.yaml"
    data = yaml.safe_load(plain_cfg.read_text())
    data["aim"] = {"omega": 0.4, "scales": str(scales)}
    aim_cfg.write_text(yaml.safe_dump(data))

    def merge(cfg: Path, out: Path):
        shutil.rmtree(out, ignore_errors=True)
        run = timed([str(BIN / "aim-ray"), "merge", str(cfg), "--out", str(out), "--quiet"])
        assert run.returncode == 0, run.tail
        return run.seconds

    plain = merge(plain_cfg, work / "plain")
    one = merge(aim_cfg, work / "one")
    shutil.rmtree(work / "two", ignore_errors=True)
    relax = timed([str(BIN / "aim-ray"), "relax", "--base", str(base), "--merged", str(work / "plain"),
                   "--scales", str(scales), "--omega", "0.4", "--out", str(work / "two"), "--quiet"])
    assert relax.returncode == 0, relax.tail
    print("| path | seconds | vs plain merge |\n|---|---|---|")
    print(f"| plain merge (ties) | {plain:.2f} | 1.00x |")
    print(f"| merge + AIM, one pass | {one:.2f} | {one / plain:.2f}x |")
    print(f"| merge, then relax (two passes) | {plain + relax.seconds:.2f} | {(plain + relax.seconds) / plain:.2f}x |")
    for d in ("plain", "one", "two"):
        shutil.rmtree(work / d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("bench_out/merge_speed"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shape = dict(hidden=512, intermediate=1408, layers=4, vocab=8000) if args.quick else {}
    base, experts = build_model_set(args.root, 3, **shape)
    calib = args.root / "calib.txt"
    words = "the quick brown fox merges experts while the slow dog reads numbers".split()
    calib.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(2000)))
    print("## calibration throughput (full base model, float32, block 512, micro-batch 2)")
    hooks_overhead(base, n_blocks=4 if args.quick else 8, block_size=512, micro_batch=2, repeats=3)
    print("\n## merge + AIM: one pass vs two (ties, 3 experts)")
    one_pass_vs_two(args.root, base, experts, calib)


if __name__ == "__main__":
    main()
