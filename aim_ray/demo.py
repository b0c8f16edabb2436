"""`aim-ray demo`: the embedded default, end to end on a laptop with no downloads.

Builds (or reuses) the tiny world — a base model and three experts with real skills, plus lm-eval tasks read
from local files — starts a local Ray cluster, calibrates the base, sweeps 3 merge methods x 3 omegas with
Ray Tune, scores every trial with the hf backend and prints the trials ranked by HV Gain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .config import TuneSweepConfig

DEMO_METHODS = ("task_arithmetic", "ties", "dare_ties")
DEMO_OMEGAS = (0.2, 0.6, 1.0)


def calibration_text(path: Path, n: int = 400) -> Path:
    """Task-agnostic calibration data for the tiny world: its generic synthetic text (the role pile-val plays
    for real models), as a local .jsonl with a `text` field."""
    import json
    import random

    from .toy_tasks import GENERATORS

    if not path.exists():
        rng = random.Random(42)
        lines = [json.dumps({"text": GENERATORS["text"](rng, False)[1]}) for _ in range(n)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return path


def demo_config(world: Any, methods=DEMO_METHODS, omegas=DEMO_OMEGAS) -> TuneSweepConfig:
    """Weights 1/3 each without normalisation (task arithmetic then averages the skills); TIES and DARE keep
    half of each delta."""
    n = len(world.experts)
    return TuneSweepConfig.model_validate({
        "base_model": str(world.base),
        "models": [{"model": str(p), "parameters": {"weight": round(1 / n, 6), "density": 0.5}}
                   for p in world.experts.values()],
        "methods": list(methods),
        "parameters": {"normalize": False},
        "omegas": list(omegas),
        "calibration": {"dataset": str(calibration_text(world.root.parent / "demo-calibration.jsonl")),
                        "n_samples": 256, "block_size": 32},
        "eval": {"suite": "toy", "backend": "hf", "batch_size": 64},
        # the general-knowledge task has no expert: the base is its reference
        "expert_for_task": {**{t: str(world.experts[e]) for t, e in world.expert_for_task.items()},
                            world.general_task: str(world.base)},
    })


def run_demo(out: Path, overwrite: bool = True) -> Any:
    from .toy import build_toy_world
    from .tune import print_summary, sweep

    click.echo("building (or reusing) the tiny world: a base model and 3 experts with real skills ...")
    world = build_toy_world()
    cfg = demo_config(world)
    click.echo(f"sweeping {len(cfg.methods)} methods x {len(cfg.omegas)} omegas on a local Ray cluster ...")
    result = sweep(cfg, out, name="demo", overwrite=overwrite, export_best=out / "best-model", echo=click.echo)
    print_summary(result, click.echo)
    click.echo(f"best model: {out / 'best-model'}")
    return result
