"""Ray Tune sweeps on a real local Ray cluster with the tiny world (hf backend, CPU).

One Ray cluster and one fresh artifact cache for the module, so what a first sweep computes is known: the
scales once, one delta per method, the base and the experts scored once; every later sweep of the same config
reuses all three. Also: resuming a sweep whose trials crashed, bad input, the CLI help, and the analysis
notebook executed on a sweep's output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import ray
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from aim_ray import tune
from aim_ray.cli import main as cli
from aim_ray.config import TuneSweepConfig, load_tune_config
from aim_ray.demo import demo_config, print_reading, reading
from aim_ray.engine import prepare
from aim_ray.errors import ConfigError
from aim_ray.worlds import toy

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
LIMIT = 20  # examples per task: a trial scores in about a second
METHODS = ["task_arithmetic", "ties"]
OMEGAS = [0.4, 1.0]


@pytest.fixture(scope="module")
def cluster(toy_world, tmp_path_factory):
    """A local Ray cluster and an empty artifact cache (scales, deltas, scores) for this module only."""
    before = os.environ.get(toy.CACHE_ENV)
    os.environ[toy.CACHE_ENV] = str(tmp_path_factory.mktemp("tune-cache"))  # before ray.init: workers inherit
    ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": 2}), include_dashboard=False)
    yield Path(os.environ[toy.CACHE_ENV])
    ray.shutdown()
    if before is None:
        os.environ.pop(toy.CACHE_ENV, None)
    else:
        os.environ[toy.CACHE_ENV] = before


def config(world, **changes) -> TuneSweepConfig:
    """The demo's config, smaller: 2 methods x 2 omegas, few calibration blocks, LIMIT examples per task."""
    data = demo_config(world, methods=METHODS, omegas=OMEGAS).model_dump(mode="json")
    data["calibration"].update(n_samples=64, block_size=32)
    # not the default world's tasks; trial scores not cached, so the spy sees every evaluation a sweep asks for
    data["eval"].update(limit=LIMIT, include_path=str(world.tasks_dir), cache_scores=False)
    return TuneSweepConfig.model_validate({**data, **changes})


def eval_actor():
    names = [n for n in ray.util.list_named_actors() if n.startswith(tune.EVAL_ACTOR)]
    assert len(names) == 1, names  # every sweep of this module shares one evaluation setup, so one actor
    return ray.get_actor(names[0])


def evaluated() -> list[str]:
    """Every model directory the shared evaluation actor has scored, in order (the spy on evaluations)."""
    return ray.get(eval_actor().info.remote())["evaluated"]


def population(world) -> list[str]:
    return [str(world.base), *[str(p) for p in world.experts.values()]]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def cached_delta_path(cfg: TuneSweepConfig, variant: tune.Variant, storage: Path) -> Path:
    """Where a sweep with this storage caches the variant's delta (computed by the first sweep)."""
    return storage / "deltas" / tune.delta_key(prepare(tune.merge_config(cfg, variant), seed=cfg.seed))


def one_pass_merge(cfg: TuneSweepConfig, method: str, omega: float, scales: Path, out: Path) -> Path:
    """`aim-ray merge` of a MergeKit-schema YAML with an aim section: merge and relax in one pass."""
    merge = {"merge_method": method, "base_model": cfg.base_model,
             "models": [{"model": m.model, "parameters": dict(m.parameters)} for m in cfg.models],
             "parameters": dict(cfg.parameters), "aim": {"omega": omega, "scales": str(scales)}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(merge))
    run = CliRunner().invoke(cli, ["merge", str(path), "--out", str(out), "--quiet"])
    assert run.exit_code == 0, run.output
    return out


def assert_same_tensors(got: Path, want: Path) -> dict[str, torch.Tensor]:
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys() and len(a) > 10
    for name, t in b.items():
        assert a[name].dtype == t.dtype and torch.equal(a[name], t), name
    assert (got / "config.json").is_file() and (got / "tokenizer.json").is_file()
    return a


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def first(cluster, toy_world, tmp_path_factory):
    """The first sweep of the module (nothing cached yet), exporting its best model."""
    storage = tmp_path_factory.mktemp("sweeps")
    cfg = config(toy_world)
    result = tune.sweep(cfg, storage, name="first", export_best=storage / "best", echo=lambda *_: None)
    return cfg, storage, result, list(evaluated())


# ------------------------------------------------------------------------------------------------ sweeps


def test_small_sweep_ranks_every_trial_and_exports_the_best(first, toy_world, tmp_path):
    cfg, storage, result, _ = first
    table = result.table
    tasks = toy_world.task_names
    assert len(table) == len(METHODS) * len(OMEGAS)  # one row per trial
    assert sorted(zip(table["method"], table["omega"])) == sorted((m, w) for m in METHODS for w in OMEGAS)
    assert table["trial_id"].is_unique and table["duplicate_of"].isna().all()  # a grid repeats no pair
    ranked = table.sort_values(["hv_gain", "normalized_performance"], ascending=False, kind="stable")
    assert table.equals(ranked.reset_index(drop=True))  # best first
    assert (table["hv_gain"].diff().dropna() <= 0).all()
    scores = table[[f"score/{t}" for t in tasks]].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all() and (table["hv_gain"] >= 0).all()
    assert result.results_path == storage / "first" / "results.parquet"
    assert pd.read_parquet(result.results_path).equals(table)
    assert sorted(p.name for p in result.plots) == ["hv_gain_vs_omega.png", "pareto.png"]
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in result.plots)
    saved = json.loads((storage / "first" / "population.json").read_text())
    assert sorted(saved) == sorted(population(toy_world)) and all(set(s) == set(tasks) for s in saved.values())
    assert result.best == table.iloc[0].to_dict()
    assert not list((storage / "first" / "trials").iterdir())  # trial models are deleted once scored

    # --export-best == a one-pass `aim-ray merge` (merge + AIM) of the best trial, with the cached scales:
    # relaxing the cached float32 delta gives the very same bits
    scales, computed = tune.cached_scales(cfg, storage)  # everything the sweep made is under its storage
    assert not computed and scales.parent == storage / "scales"
    method, omega = result.best["method"], float(result.best["omega"])
    assert_same_tensors(storage / "best", one_pass_merge(cfg, method, omega, scales, tmp_path / "one-pass"))
    # and whichever trial won: a relaxed TIES trial model (omega < 1, so AIM changes the weights) too
    ties = next(v for v in tune.plan_variants(cfg) if v.method == "ties")
    trial = tune.trial_model(cfg, ties, 0.4, cached_delta_path(cfg, ties, storage), scales, tmp_path / "trial")
    relaxed = assert_same_tensors(trial, one_pass_merge(cfg, "ties", 0.4, scales, tmp_path / "ties-0.4"))
    plain = tensors(one_pass_merge(cfg, "ties", 1.0, scales, tmp_path / "ties-1.0"))
    assert any(not torch.equal(t, plain[n]) for n, t in relaxed.items())


def test_mergebench_measures_forgetting_against_the_base_in_every_trial(first, toy_world):
    """Forgetting and retention on the general task (the demo config names the world's), by hand from each trial's
    scores and the base's scores in the same results."""
    cfg, storage, result, _ = first
    general = toy_world.general_task
    assert cfg.eval.general_tasks == [general]
    base = result.population[cfg.base_model][general]
    assert base > 0  # a ratio to the base, not the zero-base guard
    table = result.table
    assert sorted(c for c in table.columns if c.startswith("forgetting")) == ["forgetting", f"forgetting/{general}"]
    for _, row in table.iterrows():
        merged = row[f"score/{general}"]
        assert row[f"forgetting/{general}"] == base - merged
        assert row["forgetting"] == base - merged  # the mean over one general task
        assert row["general_retention"] == merged / base
    assert table["forgetting"].nunique() > 1  # the trials differ on the general task
    saved = json.loads((storage / "first" / "summary.json").read_text())
    assert saved["base_model"] == cfg.base_model and saved["general_tasks"] == [general]
    assert saved["tasks"] == toy_world.task_names


def test_mergebench_runtime_splits_algorithm_from_validation(first):
    """Per trial: algorithm = its variant's statistics + merge (the same one-off figure on each of its trials) + its
    relax; validation = its evaluation. The sweep's totals count each variant once."""
    cfg, storage, result, _ = first
    table, runtime = result.table, result.runtime
    variants = runtime["variants"]
    assert sorted(variants) == sorted(v.label() for v in tune.plan_variants(cfg))
    for label, cost in variants.items():
        assert cost["statistics_seconds"] == 0.0  # no dataless method collects expert statistics
        assert cost["merge_seconds"] > 0 and not cost["merge_cached"]  # the first sweep computed every delta
        trials = table[table["variant"] == label]
        assert len(trials) == len(OMEGAS)
        assert (trials["merge_seconds"] == cost["merge_seconds"]).all()
        assert (trials["statistics_seconds"] == cost["statistics_seconds"]).all()
    for _, row in table.iterrows():
        assert row["algorithm_seconds"] == row["statistics_seconds"] + row["merge_seconds"] + row["relax_seconds"]
        assert row["validation_seconds"] == row["eval_seconds"] > 0  # scored on an actor (cache_scores is off)
    assert runtime["statistics_seconds"] == sum(c["statistics_seconds"] for c in variants.values())
    assert runtime["merge_seconds"] == sum(c["merge_seconds"] for c in variants.values())
    assert runtime["relax_seconds"] == table["relax_seconds"].sum()
    assert runtime["trial_eval_seconds"] == table["validation_seconds"].sum()
    assert runtime["algorithm_seconds"] == (runtime["calibration_seconds"] + runtime["statistics_seconds"]
                                            + runtime["merge_seconds"] + runtime["relax_seconds"])
    assert runtime["validation_seconds"] == runtime["population_seconds"] + runtime["trial_eval_seconds"]
    assert runtime["calibration_seconds"] > 0 and runtime["population_seconds"] > 0
    # not double counted: the per-trial figures repeat each merge once per omega, the total has it once
    assert table["algorithm_seconds"].sum() == pytest.approx(
        runtime["algorithm_seconds"] - runtime["calibration_seconds"]
        + (len(OMEGAS) - 1) * runtime["merge_seconds"], rel=1e-12)
    assert json.loads((storage / "first" / "summary.json").read_text())["runtime"] == runtime
    out = io.StringIO()
    tune.print_summary(result, lambda line: print(line, file=out))
    assert tune.runtime_line(runtime) in out.getvalue()
    assert f"algorithm {runtime['algorithm_seconds']:.1f} s" in tune.runtime_line(runtime)


def test_demo_reading_shows_the_three_measures(first, toy_world):
    _, _, result, _ = first
    rows = reading(result.table, toy_world.general_task)
    assert [r["method"] for r in rows] == sorted(METHODS)
    out = io.StringIO()
    print_reading(result, toy_world, lambda line: print(line, file=out))
    text = out.getvalue()
    for r in rows:
        best = result.table[(result.table["method"] == r["method"]) & (result.table["omega"] == r["best_omega"])]
        plain = result.table[(result.table["method"] == r["method"]) & (result.table["omega"] == 1.0)].iloc[0]
        assert r["forgetting"] == best.iloc[0]["forgetting"] and r["plain_forgetting"] == plain["forgetting"]
        assert r["algorithm_seconds"] == best.iloc[0]["algorithm_seconds"]
        for prefix, words in (("", f"{r['method']:<16} best omega {r['best_omega']:.1f}: "),
                              ("plain_", "omega 1.0 (no AIM): ")):
            assert (f"{words}HV Gain {r[prefix + 'hv_gain']:.4f}, norm. perf. "
                    f"{r[prefix + 'normalized_performance']:.3f}, general {r[prefix + 'general']:.3f} (forgetting "
                    f"{r[prefix + 'forgetting']:+.3f}, retention {r[prefix + 'general_retention']:.3f}), algorithm "
                    f"{r[prefix + 'algorithm_seconds']:.1f} s vs validation {r[prefix + 'validation_seconds']:.1f} s"
                    ) in text
    assert f"runtime (MergeBench's split): algorithm {result.runtime['algorithm_seconds']:.1f} s" in text


def test_second_sweep_recomputes_nothing_and_scores_the_population_once(first, toy_world, cluster):
    cfg, storage, result, seen = first
    assert result.computed == {"calibrations": 1, "merges": len(METHODS), "trials": len(METHODS) * len(OMEGAS)}
    trials, n_pop = len(METHODS) * len(OMEGAS), len(population(toy_world))
    assert sorted(seen[:n_pop]) == sorted(population(toy_world))  # scored first, once each
    assert len(seen) == n_pop + trials
    assert len(list((storage / "scores").glob("*.json"))) == n_pop
    assert len(list((storage / "deltas").iterdir())) == len(METHODS)
    assert not any((cluster / d).exists() for d in ("scales", "deltas", "scores"))  # nothing in the local cache

    again = tune.sweep(cfg, storage, name="second", echo=lambda *_: None)
    assert again.computed == {"calibrations": 0, "merges": 0, "trials": trials}
    assert all(v["merge_cached"] for v in again.runtime["variants"].values())  # each delta only looked up
    now = evaluated()
    assert all(now.count(m) == 1 for m in population(toy_world))  # base and experts: evaluated once, ever
    assert len(now) == len(seen) + trials  # the second sweep only scored its own trials
    assert sorted(now[len(seen):]) == sorted(str(storage / "second" / "trials" / t) for t in again.table["trial_id"])
    assert len(list((storage / "scores").glob("*.json"))) == n_pop
    # same trials, same models, same scores (the hf backend is deterministic on CPU)
    key = ["variant", "omega"]
    cols = [c for c in result.table.columns if c.startswith("score/") or c in ("hv_gain", *key)]
    assert again.table[cols].sort_values(key).reset_index(drop=True).equals(
        result.table[cols].sort_values(key).reset_index(drop=True))


def test_cached_trial_scores_serve_a_rerun_without_evaluating(first, toy_world):
    """With eval.cache_scores, a trial model with the bytes of one scored before takes its scores from the
    cache: the rerun evaluates nothing and ranks the same trials with the same scores."""
    cfg, storage, result, _ = first
    cached = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"cache_scores": True})})
    before = len(evaluated())
    fresh = tune.sweep(cached, storage, name="cache-a", echo=lambda *_: None)
    assert len(evaluated()) == before + len(METHODS) * len(OMEGAS) and not fresh.table["scores_cached"].any()
    rerun = tune.sweep(cached, storage, name="cache-b", echo=lambda *_: None)
    assert len(evaluated()) == before + len(METHODS) * len(OMEGAS)  # nothing evaluated again
    assert rerun.table["scores_cached"].all() and (rerun.table["eval_seconds"] == 0).all()
    assert (rerun.table["validation_seconds"] == 0).all() and rerun.runtime["trial_eval_seconds"] == 0
    key = ["variant", "omega"]
    cols = [c for c in result.table.columns if c.startswith("score/") or c in ("hv_gain", *key)]
    for table in (fresh.table, rerun.table):  # = the uncached first sweep's scores
        assert table[cols].sort_values(key).reset_index(drop=True).equals(
            result.table[cols].sort_values(key).reset_index(drop=True))


def test_resume_reruns_only_the_trials_that_did_not_finish(first, toy_world):
    cfg, storage, _, _ = first
    ties_delta = cached_delta_path(cfg, next(v for v in tune.plan_variants(cfg) if v.method == "ties"), storage)
    assert (ties_delta / "model.safetensors").is_file()

    def crashing_scorer(c):
        # runs after the driver prepared the deltas and before any trial: the ties trials then crash on a missing
        # delta, like trials of a sweep killed half-way (what Tune records for them is an error, not a result)
        shutil.rmtree(ties_delta)
        return tune.default_scorer(c)

    before = len(evaluated())
    broken = tune.sweep(cfg, storage, name="interrupted", keep_models=True, scorer_factory=crashing_scorer,
                        echo=lambda *_: None)
    assert sorted(broken.table["method"]) == ["task_arithmetic"] * len(OMEGAS)  # the ties trials errored
    done = broken.table.set_index("trial_id")
    assert len(evaluated()) == before + len(OMEGAS)

    with pytest.raises(ConfigError, match="--resume"):  # rerunning the name needs --resume (or --overwrite)
        tune.sweep(cfg, storage, name="interrupted", echo=lambda *_: None)

    resumed = tune.sweep(cfg, storage, name="interrupted", resume=True, keep_models=True, echo=lambda *_: None)
    assert resumed.computed == {"calibrations": 0, "merges": 1, "trials": len(METHODS) * len(OMEGAS)}
    rerun = evaluated()[before + len(OMEGAS):]
    table = resumed.table.set_index("trial_id")
    ties = table.index[table["method"] == "ties"]
    assert sorted(Path(m).name for m in rerun) == sorted(ties)  # the rerun trials, in their own trials' dirs
    assert sorted(table["method"]) == sorted(m for m in METHODS for _ in OMEGAS)
    assert done.index.isin(table.index).all()  # the finished trials are the same Tune trials ...
    pd.testing.assert_frame_equal(table.loc[done.index], done)  # ... with their first results (not redone)
    models = sorted(p.name for p in (storage / "interrupted" / "trials").iterdir())
    assert models == sorted(table.index)  # kept: one directory per trial, named by its trial id


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_fails_before_anything_is_written(first, toy_world, tmp_path):
    cfg, storage, _, _ = first
    fresh = tmp_path / "storage"
    cases = [
        (config(toy_world, methods=["ties", "tiez"]), "merge_method 'tiez' is unknown; known methods: "),
        (config(toy_world, parameters={"normalize": False, "densty": 0.3}),
         r"parameter 'densty' is not used by any of the methods \['task_arithmetic', 'ties'\]"),
        (config(toy_world, method_grid={"lambda": [0.5], "epsilon": [0.1]}),
         r"parameter 'epsilon' is not used by any of the methods"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            tune.run_sweep(bad, fresh)
    assert not fresh.exists()

    data = config(toy_world).model_dump(mode="json")
    path = tmp_path / "omega.yaml"
    path.write_text(yaml.safe_dump({**data, "omegas": [0.2, 1.5]}))
    with pytest.raises(ConfigError, match=r"omegas: .*every omega must be in \[0, 1\], got \[1.5\]"):
        load_tune_config(path)
    run = CliRunner().invoke(cli, ["tune", str(path), "--storage", str(fresh)])
    assert run.exit_code == 2 and "every omega must be in [0, 1]" in run.output and "Traceback" not in run.output

    path.write_text(yaml.safe_dump({**data, "methods": ["nope"]}))
    run = CliRunner().invoke(cli, ["tune", str(path), "--storage", str(fresh)])
    assert run.exit_code == 2 and "merge_method 'nope' is unknown" in run.output
    assert not fresh.exists()

    # a general task the sweep does not evaluate: refused before calibrating, on the CLI in one line
    unknown = {**data, "eval": {**data["eval"], "general_tasks": [toy_world.general_task, "toy_nope"]}}
    message = "eval.general_tasks: 'toy_nope' is not one of the evaluated tasks ["
    with pytest.raises(ConfigError, match=r"eval\.general_tasks: 'toy_nope' is not one of the evaluated tasks \["):
        tune.run_sweep(TuneSweepConfig.model_validate(unknown), fresh)
    path.write_text(yaml.safe_dump(unknown))
    run = CliRunner().invoke(cli, ["tune", str(path), "--storage", str(fresh)])
    assert run.exit_code == 2 and message in run.output and "Traceback" not in run.output
    assert len(run.output.strip().splitlines()) == 1
    assert not fresh.exists()

    existing = tree(storage / "first")
    with pytest.raises(ConfigError, match=r"a sweep of that name exists; pass --resume to continue it or "
                                          r"--overwrite to start over"):
        tune.run_sweep(cfg, storage, name="first")
    with pytest.raises(ConfigError, match=r"--export-best .*: already exists; pass --overwrite"):
        tune.run_sweep(cfg, storage, name="new", export_best=storage / "best")
    assert tree(storage / "first") == existing and not (storage / "new").exists()


def test_storage_on_one_node_defaults_to_local_paths(cluster, toy_world, tmp_path, monkeypatch):
    """One node: without a storage dir, Tune's experiments go to runs/tune and the artifacts to the local cache;
    a storage dir given needs no visibility check. Neither writes anything yet."""
    monkeypatch.chdir(tmp_path)
    where = tune.SweepStorage.resolve(None)
    assert where == tune.SweepStorage(Path.cwd() / "runs" / "tune", tune.cache_dir(), shared=False)
    given = tune.SweepStorage.resolve("~/sweeps")
    assert given == tune.SweepStorage(Path.home() / "sweeps", Path.home() / "sweeps", shared=True)
    where.check_visible()
    tune.SweepStorage.resolve(tmp_path / "shared").check_visible()
    assert not list(tmp_path.iterdir())
    # `storage:` in a sweep config is relative to the config's directory; --storage overrides it
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "sweep.yaml"
    path.write_text(yaml.safe_dump({**config(toy_world).model_dump(mode="json"), "storage": "out"}))
    assert load_tune_config(path).storage == str(tmp_path / "conf" / "out")


def test_cli_help():
    runner = CliRunner()
    demo = runner.invoke(cli, ["demo", "--help"])
    assert demo.exit_code == 0 and "--out" in demo.output and "Ray cluster" in demo.output
    sweep = runner.invoke(cli, ["tune", "--help"])
    assert sweep.exit_code == 0
    for option in ("--storage", "--name", "--resume", "--overwrite", "--export-best", "--keep-models", "--address"):
        assert option in sweep.output
    assert "HV Gain" in sweep.output


# ------------------------------------------------------------------------------------------------ notebook


def test_analysis_notebook_runs_on_a_sweep(first, toy_world, monkeypatch):
    _, storage, result, _ = first
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)  # saved without outputs
    assert "runs/demo/demo/results.parquet" in code[0].source
    monkeypatch.setenv("AIM_RAY_RESULTS", str(result.results_path))
    namespace: dict = {"__name__": "__main__"}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for i, cell in enumerate(code):
            exec(compile(cell.source, f"{NOTEBOOK.name}[{i}]", "exec"), namespace)
    figures = storage / "first" / "analysis"
    assert sorted(p.name for p in figures.iterdir()) == ["hv_gain_vs_omega.png", "pareto.png"]
    assert namespace["ranked"]["trial_id"].tolist() == result.table["trial_id"].tolist()
    assert f"HV Gain recomputed for {len(result.table)} trials" in out.getvalue()
    # MergeBench's measures: forgetting and the runtime totals recomputed there from the sweep's files
    assert namespace["general_tasks"] == [toy_world.general_task] and namespace["runtime"] == result.runtime
    assert f"forgetting recomputed for {len(result.table)} trials on {[toy_world.general_task]}" in out.getvalue()
    assert (f"algorithm {result.runtime['algorithm_seconds']:.1f} s vs validation "
            f"{result.runtime['validation_seconds']:.1f} s") in out.getvalue()


def test_data_aware_sweep_collects_statistics_once_and_relaxes_like_one_pass(cluster, toy_world, tmp_path):
    """A sweep over regmean and fisher: each expert's statistics are collected under the storage and timed as the
    variant's statistics_seconds; a trial model is a one-pass `aim-ray merge` of the same config, bit for bit;
    the MergeBench table has both methods with and without AIM."""
    from aim_ray.demo import measures_table

    data = {"dataset": str(toy_world.calibration), "n_samples": 64, "block_size": 32}
    cfg = config(toy_world, methods=["regmean", "fisher"], omegas=[0.4, 1.0])
    cfg = TuneSweepConfig.model_validate({**cfg.model_dump(mode="json"), "models": [
        {"model": m.model, "parameters": {"weight": 1.0}, "data": data} for m in cfg.models]})
    storage = tmp_path / "sweeps"
    result = tune.sweep(cfg, storage, name="data", echo=lambda *_: None)
    table = result.table
    assert sorted(zip(table["method"], table["omega"])) == [("fisher", 0.4), ("fisher", 1.0), ("regmean", 0.4),
                                                           ("regmean", 1.0)]
    assert len(list((storage / "statistics").glob("*.safetensors"))) == 2 * len(cfg.models)  # gram + fisher
    costs = result.runtime["variants"]
    assert all(c["statistics_seconds"] > 0 for c in costs.values()), costs
    assert result.runtime["statistics_seconds"] == pytest.approx(sum(c["statistics_seconds"]
                                                                     for c in costs.values()))
    assert (table["algorithm_seconds"] >= table["statistics_seconds"] + table["merge_seconds"]).all()
    scales, _ = tune.cached_scales(cfg, storage)
    for variant in tune.plan_variants(cfg):
        trial = tune.trial_model(cfg, variant, 0.4, cached_delta_path(cfg, variant, storage), scales,
                                 tmp_path / f"trial-{variant.method}")
        merge = tune.merge_config(cfg, variant, 0.4, str(scales))
        path = tmp_path / f"{variant.method}.yaml"
        path.write_text(yaml.safe_dump(merge.model_dump(mode="json", exclude_none=True)))
        run = CliRunner().invoke(cli, ["merge", str(path), "--out", str(tmp_path / f"one-{variant.method}"),
                                       "--quiet"])
        assert run.exit_code == 0, run.output
        assert_same_tensors(trial, tmp_path / f"one-{variant.method}")
    text = measures_table(table).splitlines()
    assert text[0].startswith("| method | AIM | omega | HV Gain")
    assert [line.split(" | ")[:3] for line in text[2:]] == [["| fisher", "no", "1.0"], ["| fisher", "yes", "0.4"],
                                                           ["| regmean", "no", "1.0"], ["| regmean", "yes", "0.4"]]
