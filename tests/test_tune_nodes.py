"""Ray Tune sweeps on a 2-node `ray.cluster_utils.Cluster` (2 CPU slots per node) with the tiny world.

The nodes are two raylets on this machine, each started in its own working directory (the driver's node in
`node-a`, the other in `node-b`): their workers inherit it, which is what lets the visibility test make a path
that one node cannot see (see there). Everything else on one machine is shared, as a real shared filesystem is.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from aim_ray import tune
from aim_ray.cli import main as cli
from aim_ray.config import TuneSweepConfig
from aim_ray.demo import demo_config
from aim_ray.errors import ConfigError

LIMIT = 20  # examples per task: an evaluation takes about a second


@pytest.fixture(scope="module")
def two_nodes(toy_world, tmp_path_factory):
    """(cluster, [driver node's cwd, other node's cwd], [driver node id, other node id])."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # an earlier module's local cluster
    dirs = [tmp_path_factory.mktemp("node-a"), tmp_path_factory.mktemp("node-b")]
    here = os.getcwd()
    try:  # a raylet and its workers inherit the cwd of the process that starts it
        os.chdir(dirs[0])
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        os.chdir(dirs[1])
        other = cluster.add_node(num_cpus=2)
    finally:
        os.chdir(here)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, dirs, [cluster.head_node.node_id, other.node_id]
    finally:
        ray.shutdown()
        cluster.shutdown()


def sweep_config(world, **changes) -> TuneSweepConfig:
    """One method x 2 omegas searched by Optuna for 4 trials: at least 2 trials repeat a pair (pigeonhole).
    Scores are not cached, so every trial, repeated or not, is scored by the pool."""
    data = demo_config(world, methods=["task_arithmetic"], omegas=[0.4, 1.0]).model_dump(mode="json")
    data["calibration"].update(n_samples=64, block_size=32)
    data["eval"].update(limit=LIMIT, include_path=str(world.tasks_dir), cache_scores=False, num_actors=2,
                        num_cpus=1)
    data.update(search="optuna", num_samples=4, max_concurrent_trials=2, trial_cpus=1)
    return TuneSweepConfig.model_validate({**data, **changes})


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_sweep_on_two_nodes_two_eval_actors_and_repeated_trials(two_nodes, toy_world, tmp_path):
    _, _, node_ids = two_nodes
    storage = tmp_path / "shared"
    cfg = sweep_config(toy_world)
    result = tune.sweep(cfg, storage, name="nodes", keep_models=True, echo=lambda *_: None)
    table = result.table

    # the pool: one evaluation actor on each node, both of which scored trials
    actors = [ray.get_actor(n) for n in ray.util.list_named_actors() if n.startswith(tune.EVAL_ACTOR)]
    infos = ray.get([a.info.remote() for a in actors], timeout=60)
    assert len(infos) == 2 and sorted(i["node_id"] for i in infos) == sorted(node_ids)
    assert sorted(table["eval_actor"].unique()) == [0, 1]
    trial_dirs = {str(storage / "nodes" / "trials" / t) for t in table["trial_id"]}
    served = [[s for s in i["spans"] if s[0] in trial_dirs] for i in infos]
    assert all(served) and sum(map(len, served)) == len(table)
    # the population (base + 3 experts) was scored on both actors at once
    population = [[s for s in i["spans"] if s[0] not in trial_dirs] for i in infos]
    assert all(len(p) == 2 for p in population)
    assert any(overlap(a, b) for a in population[0] for b in population[1])

    # two trials asking at the same moment are served at the same time, one on each node
    pool, _, _ = tune.default_scorer(cfg)  # the sweep's actors (named, reused)
    models = [str(storage / "nodes" / "trials" / t) for t in table["trial_id"][:2]]
    with ThreadPoolExecutor(2) as threads:
        answers = list(threads.map(lambda m: tune.score_on_pool(pool, m, 120), models))
    assert sorted(i for _, i in answers) == [0, 1]
    for (scores, _), trial in zip(answers, table["trial_id"][:2]):  # deterministic: the sweep's scores again
        assert scores == {c[len("score/"):]: v for c, v in table.set_index("trial_id").loc[trial].items()
                          if c.startswith("score/")}
    spans = [[s for s in i["spans"] if s[0] in models] for i in ray.get([a.info.remote() for a in actors], timeout=60)]
    last = [max(s, key=lambda s: s[1]) for s in spans]  # each actor's latest evaluation of those models
    assert overlap(*last)

    # every trial finished, in a directory of its own; a repeated pair is marked, same model and same scores
    assert len(table) == 4 and table["trial_id"].is_unique
    assert sorted(p.name for p in (storage / "nodes" / "trials").iterdir()) == sorted(table["trial_id"])
    by_end = table.sort_values("finished_at")
    first: dict[tuple[str, float], str] = {}
    expected = {t: first.setdefault((v, w), t) for t, v, w in zip(by_end["trial_id"], by_end["variant"],
                                                                   by_end["omega"])}
    assert len(first) <= 2 and table["duplicate_of"].notna().sum() == 4 - len(first) >= 2
    scores = [c for c in table.columns if c.startswith("score/")]
    rows = table.set_index("trial_id")
    for trial, original in expected.items():
        if trial == original:
            assert pd.isna(rows.loc[trial, "duplicate_of"])
            continue
        assert rows.loc[trial, "duplicate_of"] == original
        assert rows.loc[trial, scores + ["hv_gain"]].equals(rows.loc[original, scores + ["hv_gain"]])
        a, b = tensors(storage / "nodes" / "trials" / trial), tensors(storage / "nodes" / "trials" / original)
        assert a.keys() == b.keys() and len(a) > 10 and all(torch.equal(a[n], b[n]) for n in a)

    # the sweep's artifacts are all under the storage dir
    assert len(list((storage / "scales").glob("*.safetensors"))) == 1
    assert len(list((storage / "deltas").iterdir())) == 1
    assert len(list((storage / "scores").glob("*.json"))) == 4  # the population's (trial scores not cached)
    assert result.results_path == storage / "nodes" / "results.parquet" and result.results_path.is_file()


def test_several_nodes_without_storage_are_refused(two_nodes, toy_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the single-node default (runs/tune) would go
    with pytest.raises(ConfigError, match=r"^the Ray cluster has 2 alive nodes: pass --storage DIR "):
        tune.run_sweep(sweep_config(toy_world))
    assert not list(tmp_path.iterdir())


def test_storage_a_node_cannot_see_is_refused_naming_it(two_nodes, toy_world, tmp_path, monkeypatch):
    """What is real here: every process of this machine sees the same filesystem, so no local path is missing
    on one node only, and a mount namespace per node needs privileges. But `/proc/self/cwd/...` is resolved by
    the kernel in each process against that process's own working directory: the same path string names
    different directories in different processes, exactly as a local (unshared) disk path does on two
    machines. The driver runs in node-a's directory, so the driver and the workers of its node find the marker
    file and the other node's workers (in node-b) do not; the check itself runs unchanged, with no test hook.
    A per-node environment variable would only simulate this through a hook the production code must read."""
    cluster, dirs, (driver_node, other_node) = two_nodes
    monkeypatch.chdir(dirs[0])
    storage = "/proc/self/cwd/shared-storage"
    with pytest.raises(ConfigError) as refused:
        tune.run_sweep(sweep_config(toy_world), storage)
    message = str(refused.value)
    assert message.startswith("--storage /proc/self/cwd/shared-storage: not visible from node(s) ")
    assert other_node in message and driver_node not in message
    assert "it must be a directory every node of the Ray cluster sees" in message and "\n" not in message
    assert not (dirs[0] / "shared-storage").exists()  # the dir made for the check is removed again

    # the CLI: one line, exit 2, nothing written
    config = tmp_path / "sweep.yaml"
    config.write_text(sweep_config(toy_world).model_dump_json())
    run = CliRunner().invoke(cli, ["tune", str(config), "--storage", storage, "--address", cluster.address])
    assert run.exit_code == 2 and other_node in run.output and "Traceback" not in run.output
    assert not (dirs[0] / "shared-storage").exists()
    # and the same check passes for a real directory, which every node sees
    tune.check_shared_dir(tmp_path / "visible", tune.alive_nodes(), timeout_s=60)
