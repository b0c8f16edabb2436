"""`aim-ray demo`: the embedded default, end to end on a laptop.

The default world is real: SmolLM2-135M-Instruct (from PyPI, dequantized to bf16) and three experts fine-tuned
from it here (math, code, instruction following). The demo builds (or reuses) that world, starts a local Ray
cluster, calibrates the base on real documentation text, sweeps 3 merge methods x 6 omegas with Ray Tune, scores
every trial with lm-eval (hf backend) on a pool of evaluation actors, and prints the trials ranked by HV Gain with
a short reading of what AIM did. `--world tiny` runs the same loop on the toy world in about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .config import TuneSweepConfig
from .worlds import World, load_world


@dataclass(frozen=True)
class DemoSetup:
    methods: tuple[str, ...]
    omegas: tuple[float, ...]
    weight: float | None  # per expert; None: 1 / number of experts
    density: float
    calibration: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None  # each expert's own training data (data-aware methods): loader settings


SETUPS = {
    # Task vectors summed at weight 1 (each expert's full skill; the interference is what AIM relaxes); TIES and
    # DARE keep half of each. Calibration: 16 blocks of 128 tokens of documentation text (the paper finds 8
    # blocks enough). Two evaluation actors score two trials at once on a 2-core machine.
    "real": DemoSetup(methods=("task_arithmetic", "ties", "dare_ties"), omegas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                      weight=1.0, density=0.5,
                      calibration={"n_samples": 128, "block_size": 128, "n_blocks": 16},
                      eval={"batch_size": 32, "num_actors": 2, "num_cpus": 0.5}),
    # MergeBench's comparison on the real world: two dataless baselines, Localize-and-Stitch without and with
    # trained masks, the data-aware RegMean and Fisher, and 2025's TSV-M and Iso-C, each without AIM (omega 1)
    # and with it. The data-aware methods read each expert's own training texts: 8 blocks of 128 tokens (about
    # 40 examples) per expert, what a 2-core machine affords for the backward-pass statistics (MergeBench
    # samples 1,000 training examples per task).
    "mergebench": DemoSetup(methods=("task_arithmetic", "ties", "localize_stitch", "localize_stitch_trained",
                                     "regmean", "fisher", "tsv", "iso_c"), omegas=(0.0, 0.4, 1.0),
                            weight=1.0, density=0.5,
                            calibration={"n_samples": 128, "block_size": 128, "n_blocks": 16},
                            eval={"batch_size": 32, "num_actors": 2, "num_cpus": 0.5},
                            data={"n_samples": 512, "block_size": 128, "n_blocks": 8}),
    "toy": DemoSetup(methods=("task_arithmetic", "ties", "dare_ties"), omegas=(0.2, 0.6, 1.0), weight=None,
                      density=0.5, calibration={"n_samples": 256, "block_size": 32},
                      eval={"batch_size": 64}),
}


def demo_config(world: World, setup: DemoSetup | None = None, methods=None, omegas=None) -> TuneSweepConfig:
    setup = setup or SETUPS[world.suite]
    weight = setup.weight if setup.weight is not None else round(1 / len(world.experts), 6)
    concurrent = setup.eval.get("num_actors")
    return TuneSweepConfig.model_validate({
        "base_model": str(world.base),
        "models": [{"model": str(p), "parameters": {"weight": weight, "density": setup.density},
                    **({"data": {"dataset": str(world.training_data[skill]), **setup.data}} if setup.data else {})}
                   for skill, p in world.experts.items()],
        "methods": list(methods or setup.methods),
        "parameters": {"normalize": False},
        "omegas": list(omegas or setup.omegas),
        "calibration": {"dataset": str(world.calibration), **setup.calibration},
        "eval": {"suite": world.suite, "backend": "hf", "include_path": str(world.tasks_dir),
                 "general_tasks": [world.general_task], **setup.eval},  # forgetting: measured on the general task
        "max_concurrent_trials": concurrent,
        "trial_cpus": 0.5 if concurrent else 1.0,
        # the general task has no expert: the base is its reference
        "expert_for_task": {**{t: str(world.experts[e]) for t, e in world.expert_for_task.items()},
                            world.general_task: str(world.base)},
    })


def parameter_count(model_dir: Path) -> int:
    from .checkpoint import Checkpoint

    ckpt = Checkpoint.open(model_dir)
    return sum(ckpt.info(n).numel for n in ckpt.names())


SUITES = ("paper", "mergebench")  # the demo's sweeps: the AIM paper's methods, or MergeBench's comparison


def run_demo(out: Path, world: str = "real", overwrite: bool = True, suite: str = "paper") -> Any:
    from .errors import ConfigError
    from .tune import print_summary, sweep

    if suite == "mergebench" and world != "real":
        raise ConfigError("--suite mergebench runs on the real world (its experts' training data): use --world real")
    click.echo(f"building (or reusing) the {world} world: a base model and experts fine-tuned from it ...")
    built = load_world(world, echo=click.echo)
    click.echo(f"base model: {built.name}, {parameter_count(built.base) / 1e6:.1f}M parameters; experts: "
               f"{', '.join(built.experts)}")
    cfg = demo_config(built, SETUPS["mergebench"] if suite == "mergebench" else None)
    click.echo(f"sweeping {len(cfg.methods)} methods x {len(cfg.omegas)} omegas on a local Ray cluster ...")
    result = sweep(cfg, out, name="demo", overwrite=overwrite, export_best=out / "best-model", echo=click.echo,
                   progress=True)
    print_summary(result, click.echo)
    print_reading(result, built, click.echo)
    if suite == "mergebench":
        click.echo("\nMergeBench's measures, each method without AIM (omega 1) and with it (its best omega):\n"
                   + measures_table(result.table))
    click.echo(f"best model: {out / 'best-model'}")
    return result


def measures_table(table) -> str:
    """Markdown: per method, omega 1 (no AIM) and the best omega below 1 by HV Gain, with MergeBench's three
    measures (normalised performance, forgetting on the general tasks, algorithm vs validation seconds)."""
    lines = ["| method | AIM | omega | HV Gain | norm. perf. | forgetting | algorithm s | validation s |",
             "|---|---|---|---|---|---|---|---|"]
    for method, trials in table.groupby("method", sort=True):
        plain = trials[trials["omega"] == 1.0]
        relaxed = trials[trials["omega"] < 1.0].sort_values(["hv_gain", "omega"], ascending=[False, False],
                                                           kind="stable")
        for label, rows in (("no", plain), ("yes", relaxed)):
            if len(rows):
                r = rows.iloc[0]
                forgetting = f"{r['forgetting']:+.3f}" if "forgetting" in r else "-"
                lines.append(f"| {method} | {label} | {r['omega']:.1f} | {r['hv_gain']:.4f} | "
                             f"{r['normalized_performance']:.3f} | {forgetting} | {r['algorithm_seconds']:.1f} | "
                             f"{r['validation_seconds']:.1f} |")
    return "\n".join(lines)


def mergebench_table(out: Path, name: str = "demo") -> str:
    """`measures_table` of the sweep a `aim-ray demo --suite mergebench --out OUT` left in OUT."""
    import pandas as pd

    return measures_table(pd.read_parquet(Path(out) / name / "results.parquet"))


# MergeBench's three measures (normalised performance, forgetting, runtime) next to the HV Gain; a sweep without
# general tasks has no forgetting columns, one from an older aim-ray no runtime columns
MEASURES = ("hv_gain", "normalized_performance", "forgetting", "general_retention", "algorithm_seconds",
            "validation_seconds")


def reading(table, general_task: str) -> list[dict[str, Any]]:
    """Per method: the best omega by HV Gain with its general-ability score and every measure of `MEASURES` the
    table has, and the same for omega = 1 (keys prefixed `plain_`)."""
    general = f"score/{general_task}"
    measures = [m for m in MEASURES if m in table]
    rows = []
    for method, trials in table.groupby("method", sort=True):
        best = trials.sort_values(["hv_gain", "omega"], ascending=[False, False], kind="stable").iloc[0]
        plain = trials[trials["omega"] == 1.0]
        row = {"method": method, "best_omega": float(best["omega"]), "general": float(best[general]),
               **{m: float(best[m]) for m in measures}}
        if len(plain):
            row.update(plain_general=float(plain.iloc[0][general]),
                       **{f"plain_{m}": float(plain.iloc[0][m]) for m in measures})
        rows.append(row)
    return rows


def _measures(r: dict[str, Any], prefix: str = "") -> str:
    """One trial's measures as `reading` gives them: HV Gain, normalised performance, general score with its
    forgetting, algorithm vs validation seconds."""
    def get(key: str) -> float | None:
        return r.get(prefix + key)

    text = f"HV Gain {get('hv_gain'):.4f}"
    if get("normalized_performance") is not None:
        text += f", norm. perf. {get('normalized_performance'):.3f}"
    text += f", general {get('general'):.3f}"
    if get("forgetting") is not None:
        text += f" (forgetting {get('forgetting'):+.3f}, retention {get('general_retention'):.3f})"
    if get("algorithm_seconds") is not None:
        text += f", algorithm {get('algorithm_seconds'):.1f} s vs validation {get('validation_seconds'):.1f} s"
    return text


def print_reading(result, world: World, echo=click.echo) -> None:
    if not len(result.table):
        return
    base_general = result.population[str(world.base)][world.general_task]
    echo(f"\nreading ({world.general_task} = general ability; the base scores {base_general:.3f}; forgetting = "
         f"base - merged on it, retention = merged / base):")
    for r in reading(result.table, world.general_task):
        echo(f"  {r['method']:<16} best omega {r['best_omega']:.1f}: {_measures(r)}")
        if "plain_hv_gain" in r:
            echo(f"  {'':<16} omega 1.0 (no AIM): {_measures(r, 'plain_')}")
    if result.runtime:
        rt = result.runtime
        share = rt["validation_seconds"] / max(rt["algorithm_seconds"] + rt["validation_seconds"], 1e-9)
        echo(f"  runtime (MergeBench's split): algorithm {rt['algorithm_seconds']:.1f} s (AIM calibration, "
             f"statistics + merges once per variant, relax + write per trial) vs validation "
             f"{rt['validation_seconds']:.1f} s ({share:.0%} of the sweep spent evaluating)")
