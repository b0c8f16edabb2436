"""`aim-ray demo`: the embedded default. Builds tiny models locally (no downloads) and merges them."""

from __future__ import annotations

from pathlib import Path

import click

from .checkpoint import cache_dir
from .config import MergeConfig, ModelEntry
from .service import merge_from_config
from .tiny import build_tiny_family


def run_demo(out: Path) -> Path:
    root = cache_dir() / "demo-family-v1"
    if not (root / "expert_2" / "config.json").exists():
        click.echo(f"building a tiny base model and 3 experts in {root} ...")
        build_tiny_family(root, "llama", n_experts=3, seed=0)
    base, experts = root / "base", [root / f"expert_{i}" for i in range(3)]
    cfg = MergeConfig(merge_method="ties", base_model=str(base),
                      models=[ModelEntry(model=str(e), parameters={"weight": 1.0, "density": 0.5})
                              for e in experts])
    path = merge_from_config(cfg, out, overwrite=True)
    click.echo(f"merged 3 experts with TIES into {path}")
    return path
