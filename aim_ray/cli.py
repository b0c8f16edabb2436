"""`aim-ray` command line: merge | calibrate | relax | eval | tune | demo.

Thin wrappers: each command validates its options, calls the library, and turns `AimRayError`s into a
one-line message and exit status 2 (no traceback: the message names the file, tensor or option at fault).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from .errors import AimRayError, ClusterError


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AimRayError as e:
            click.echo(f"aim-ray: error: {e}", err=True)
            sys.exit(2)
        except ClusterError as e:  # not the input's fault: status 1, and --resume continues the run
            click.echo(f"aim-ray: cluster error: {e}", err=True)
            sys.exit(1)

    return wrapper


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '1.5e9', '2GiB'."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise click.BadParameter(f"{text!r} is not a size (e.g. 5GB, 500MB, 2GiB, 1000000)") from None
    if value <= 0:
        raise click.BadParameter(f"{text!r} must be positive")
    return value


def default_threads() -> int:
    """The CPUs this process may use, at most 4 (each merging thread holds one tensor's buffers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))


def threads_option(fn):
    return click.option(
        "--threads", type=click.IntRange(min=1), default=default_threads(), show_default="CPUs, at most 4",
        help="Tensors merged at once by this process, one core each (torch's own threads are set to 1 while "
             "they run, so no OpenMP team spins against them). Each holds one tensor's buffers.")(fn)


def set_threads(threads: int) -> None:
    import torch

    from .engine import set_merge_threads

    torch.set_num_threads(threads)
    set_merge_threads(threads)


def compute_options(fn):
    """`--device` / `--dtype`: where and in what dtype calibration computes (the scales accumulate in float32)."""
    fn = click.option("--dtype", "calib_dtype", default=None,
                      help="Calibration compute dtype: auto | float32 | bfloat16 | float16 [default: the config's, "
                           "else auto: bfloat16 on cuda, float32 on cpu]. Scales accumulate in float32.")(fn)
    return click.option("--device", default=None,
                        help="Calibration device: auto | cpu | cuda | cuda:N [default: the config's, else auto: "
                             "cuda when a GPU is usable, else cpu].")(fn)


def checked_compute(device: str | None, dtype: str | None) -> dict[str, str]:
    """The given --device / --dtype, validated (one-line error naming the option), as calibration fields."""
    from .calibration import check_device, check_dtype

    return {**({"device": check_device(device)} if device is not None else {}),
            **({"dtype": check_dtype(dtype)} if dtype is not None else {})}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aim-ray")
def main() -> None:
    """Merge fine-tuned LLM experts with Activation-Informed Merging, on one machine or a Ray cluster."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output checkpoint directory (created atomically).")
@click.option("--seed", default=0, show_default=True, help="Seed for random sparsification (DARE, DELLA).")
@click.option("--shard-size", default="5GB", show_default=True, callback=lambda c, p, v: parse_size(v),
              help="Maximum bytes per output shard.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output checkpoint (or empty directory); a directory of other files is refused.")
@click.option("--resume", is_flag=True,
              help="Reuse shards finished by an interrupted run of the same merge from unchanged inputs.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model*.bin inputs (torch.load weights_only).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge even if an input tensor has NaN/Inf.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Ray workers (one layer range / run of shards each); 1 runs in this process without Ray.")
@click.option("--address", default=None, help="Ray cluster to attach to (default: RAY_ADDRESS, else start a "
              "local cluster).")
@click.option("--cpus-per-worker", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="CPUs in each worker's placement-group bundle.")
@click.option("--gpus-per-worker", default=None, type=click.FloatRange(min=0),
              help="GPUs in each worker's bundle [default: 1 if the cluster has one per worker, else 0].")
@click.option("--placement", type=click.Choice(["pack", "spread"]), default="pack", show_default=True,
              help="Placement-group strategy for the workers.")
@click.option("--dry-run", is_flag=True,
              help="Validate and print the plan (ranges, shards, memory per worker); write nothing.")
@compute_options
@threads_option
@user_errors
def merge(config: Path, out: Path, seed: int, shard_size: int, overwrite: bool, resume: bool,
          allow_pickle: bool, allow_nonfinite: bool, quiet: bool, workers: int, address: str | None,
          cpus_per_worker: float, gpus_per_worker: float | None, placement: str, dry_run: bool,
          device: str | None, calib_dtype: str | None, threads: int) -> None:
    """Merge the experts of a MergeKit-schema CONFIG (YAML), with AIM if it has an `aim:` section."""
    from .config import load_merge_config
    from .service import merge_from_config

    set_threads(threads)
    cfg = _with_compute(load_merge_config(config), checked_compute(device, calib_dtype), config)
    cluster = None
    if workers > 1 or dry_run:
        from .driver import ClusterOptions

        cluster = ClusterOptions(workers=workers, address=address, cpus_per_worker=cpus_per_worker,
                                 gpus_per_worker=gpus_per_worker, placement=placement)
    if dry_run:
        from .driver import dry_run_plan

        click.echo(dry_run_plan(cfg, cluster, seed=seed, shard_size=shard_size, allow_pickle=allow_pickle))
        return
    path = merge_from_config(cfg, out, seed=seed, shard_size=shard_size, overwrite=overwrite, resume=resume,
                             allow_pickle=allow_pickle, check_finite=not allow_nonfinite, progress=not quiet,
                             cluster=cluster)
    click.echo(f"wrote {path}")


def _with_compute(cfg, compute: dict[str, str], source: Path):
    """`cfg` with --device / --dtype set in its aim.calibration (refused when nothing is calibrated)."""
    from .errors import ConfigError

    if not compute:
        return cfg
    aim = cfg.aim
    if aim is None or aim.scales is not None:
        raise ConfigError(f"--device/--dtype set how the merge calibrates, but {source} "
                          f"{'has no aim section' if aim is None else 'uses aim.scales'}: nothing is calibrated")
    calibration = aim.calibration_or_default().model_copy(update=compute)
    return cfg.model_copy(update={"aim": aim.model_copy(update={"calibration": calibration})})


def calibration_options(fn):
    """Options shared by `calibrate` and `relax` (the DESIGN.md section 1 defaults)."""
    from .config import DEFAULT_CALIBRATION_DATASET

    options = [
        click.option("--data", default=DEFAULT_CALIBRATION_DATASET, show_default=True,
                     help="Hub dataset id or local .jsonl/.json/.txt/.parquet file."),
        click.option("--split", default="validation", show_default=True, help="Dataset split (hub ids)."),
        click.option("--n-samples", default=256, show_default=True, type=click.IntRange(min=1)),
        click.option("--block-size", default=512, show_default=True, type=click.IntRange(min=1)),
        click.option("--n-blocks", default=None, type=click.IntRange(min=1), help="Cap on calibration blocks."),
        click.option("--micro-batch", default=4, show_default=True, type=click.IntRange(min=1)),
        click.option("--kind", type=click.Choice(["activation", "sensitivity"]), default="activation",
                     show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("base")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Scales file to write (safetensors).")
@calibration_options
@compute_options
@click.option("--overwrite", is_flag=True, help="Replace an existing scales file.")
@user_errors
def calibrate(base: str, out: Path, data: str, split: str, n_samples: int, block_size: int, n_blocks: int | None,
              micro_batch: int, kind: str, device: str | None, calib_dtype: str | None, overwrite: bool) -> None:
    """Compute AIM scales of the BASE model (cached: the same calibration is never computed twice)."""
    from .calibration import cached_calibrate
    from .errors import OutputExistsError

    compute = checked_compute(device, calib_dtype)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
    scales = cached_calibrate(base, dataset=data, n_samples=n_samples, block_size=block_size, n_blocks=n_blocks,
                              kind=kind, split=split, micro_batch=micro_batch, **compute)
    scales.save(out)
    click.echo(f"wrote {kind} scales for {len(scales)} modules to {out} ({scales.dtype} on {scales.device})")


@main.command()
@click.option("--base", required=True, help="The pre-trained model the merge started from.")
@click.option("--merged", required=True, help="Any merged checkpoint (e.g. made by MergeKit).")
@click.option("--scales", "scales_path", default=None, help="Scales file from `aim-ray calibrate`.")
@calibration_options
@click.option("--omega", required=True, type=float, help="AIM omega in [0, 1] (1 = unchanged).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Accept scales computed for another base model.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@compute_options
@threads_option
@user_errors
def relax(base: str, merged: str, scales_path: str | None, data: str, split: str, n_samples: int, block_size: int,
          n_blocks: int | None, micro_batch: int, kind: str, omega: float, out: Path, force: bool,
          overwrite: bool, quiet: bool, device: str | None, calib_dtype: str | None, threads: int) -> None:
    """Apply AIM to an existing merged checkpoint: theta = base + (1 - A(1 - omega)) (merged - base)."""
    from .service import relax_checkpoint

    set_threads(threads)
    compute = checked_compute(device, calib_dtype)
    path = relax_checkpoint(base, merged, out, omega=omega, scales=scales_path, kind=kind, force=force,
                            calibration={"dataset": data, "split": split, "n_samples": n_samples,
                                         "block_size": block_size, "n_blocks": n_blocks,
                                         "micro_batch": micro_batch, **compute},
                            overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {path}")


@main.command("eval")
@click.argument("model")
@click.option("--suite", default="toy", show_default=True,
              help="paper | real | toy | comma-separated lm-eval task names.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Examples per task (quick runs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--include-path", default=None, help="Extra lm-eval task YAML folder.")
@click.option("--allow-code-execution", is_flag=True,
              help="Run model-generated code (humaneval, mbpp). Only on a sandboxed machine.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the scores to this parquet table.")
@user_errors
def eval_cmd(model: str, suite: str, backend: str, limit: int | None, batch_size: int, tensor_parallel_size: int,
             include_path: str | None, allow_code_execution: bool, results: Path | None) -> None:
    """Score MODEL with lm-evaluation-harness (scores normalised to [0, 1])."""
    from .evaluation import append_results, evaluate, resolve_suite, score_rows

    tasks, include = resolve_suite(suite, include_path, allow_code_execution)
    scores = evaluate(model, tasks, backend, limit=limit, batch_size=batch_size, include_path=include,
                      allow_code_execution=allow_code_execution, tensor_parallel_size=tensor_parallel_size)
    for task, metrics in scores.items():
        click.echo(f"{task:24s} " + "  ".join(f"{m}={v:.4f}" for m, v in metrics.items()))
    if results is not None:
        append_results(results, score_rows(model, scores))
        click.echo(f"appended to {results}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory every node sees: scales, deltas, trial models, results, Tune's state [default: the "
                   "config's `storage`, else runs/tune and ~/.cache/aim-ray on a single-node cluster].")
@click.option("--name", default="sweep", show_default=True, help="Experiment name under --storage.")
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep without redoing finished trials.")
@click.option("--overwrite", is_flag=True, help="Start the named sweep over (and replace --export-best).")
@click.option("--export-best", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the best trial's model here.")
@click.option("--keep-models", is_flag=True, help="Keep every trial's model (default: deleted once scored).")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS, else a local cluster].")
@compute_options
@user_errors
def tune(config: Path, storage: Path | None, name: str, resume: bool, overwrite: bool, export_best: Path | None,
         keep_models: bool, address: str | None, device: str | None, calib_dtype: str | None) -> None:
    """Sweep omega x merge methods with Ray Tune; rank by HV Gain."""
    from .config import load_tune_config
    from .errors import ConfigError
    from .tune import print_summary, sweep

    cfg = load_tune_config(config)
    compute = checked_compute(device, calib_dtype)
    if compute and cfg.scales is not None:
        raise ConfigError(f"--device/--dtype set how the sweep calibrates, but {config} uses scales: nothing is "
                          f"calibrated")
    if compute:
        cfg = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update=compute)})
    result = sweep(cfg, storage, name=name, resume=resume, overwrite=overwrite,
                   export_best=export_best, keep_models=keep_models, address=address, echo=click.echo)
    print_summary(result, click.echo)


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Where the demo writes its sweep, plots and best model (replaced).")
@click.option("--world", type=click.Choice(["real", "tiny"]), default="real", show_default=True,
              help="real: SmolLM2-135M-Instruct and 3 experts fine-tuned here; tiny: the toy world (quick).")
@click.option("--suite", type=click.Choice(["paper", "mergebench"]), default="paper", show_default=True,
              help="paper: task_arithmetic, ties, dare_ties x 6 omegas; mergebench: MergeBench's comparison "
                   "(dataless, data-aware and 2025 methods, with and without AIM; longer).")
@user_errors
def demo(out: Path, world: str, suite: str) -> None:
    """World -> local Ray cluster -> calibrate -> methods x omegas sweep -> ranked table and reading."""
    from .demo import run_demo

    run_demo(out, world=world, suite=suite)


def run() -> None:
    """The `aim-ray` console entry point: `main`, then a fast exit. torch's interpreter teardown alone takes
    ~0.4 s (a tenth of a small merge); the atexit handlers still run and stdio is flushed, only module
    teardown is skipped. Every file the commands write is closed (and fsynced) before they return."""
    import atexit

    try:
        main()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
