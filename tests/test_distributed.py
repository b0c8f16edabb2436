"""The Ray merge service on a real local cluster: pipelined calibration, parallel merge, faults, resume.

Every distributed output is compared byte for byte with the single-process merge (`engine.run_merge`). One
local cluster (4 CPU slots, 2 fake GPUs) serves the module; the pools are module-scoped too because starting a
worker costs a torch import. The multi-node test builds its own `ray.cluster_utils.Cluster` last.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from checks import assert_same_checkpoint

from aim_ray.calibration import collect_activation_scales, collect_sensitivity_scales
from aim_ray.checkpoint import shard_filename
from aim_ray.config import load_merge_config
from aim_ray.driver import (
    ClusterOptions,
    WorkerPool,
    distributed_merge,
    layer_ranges,
    pool_aim,
    service_plan,
    shard_assignment,
)
from aim_ray.engine import PROGRESS, MergeJob, prepare, run_merge
from aim_ray.errors import CalibrationError
from aim_ray.plan import assign_shards
from aim_ray.relaxer import aim_for_job
from aim_ray.worlds.tiny import build_tiny_family

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need SlowRelax, not this file
SHARD = 20_000  # bytes: ~20 shards for the tiny Llama, so every worker gets several
CPU = 0.25  # fake CPU slots per worker: all module pools fit in the 4-slot cluster at once


@pytest.fixture(scope="module")
def local_ray():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _pool(workers: int, **kw) -> WorkerPool:
    return WorkerPool(ClusterOptions(workers=workers, cpus_per_worker=CPU, ready_timeout_s=60, **kw))


@pytest.fixture(scope="module")
def pools(local_ray):
    made = {1: _pool(1, gpus_per_worker=0), 2: _pool(2), 4: _pool(4)}  # pool 2: auto -> one fake GPU each
    yield made
    for pool in made.values():
        pool.close()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """4-layer Llama (6 blocks), base + 3 experts."""
    return build_tiny_family(tmp_path_factory.mktemp("dist"), "llama", n_experts=3, seed=5, num_layers=4)


def _config(tmp: Path, base: Path, experts: list[Path], method: str = "dare_ties", aim: dict | None = None,
            params: dict | None = None):
    import yaml

    params = {"weight": 0.6, "density": 0.5} if params is None else params
    data = {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": params} for e in experts]}
    if aim:
        data["aim"] = aim
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_merge_config(path)


@pytest.fixture(scope="module")
def job(family, tmp_path_factory) -> MergeJob:
    base, experts = family
    return prepare(_config(tmp_path_factory.mktemp("cfg"), base, experts), seed=7, shard_size=SHARD)


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> Path:
    return run_merge(job, tmp_path_factory.mktemp("ref") / "out", progress=False)




class SlowRelax:
    """`theta_pre + delta` (bit-identical to no relaxation), slowly: time to kill a worker mid-merge."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, name: str, theta_pre: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return theta_pre + delta


def slow_aim(seconds: float):
    return lambda pool: (SlowRelax(seconds), {}, {})


# ------------------------------------------------------------------------------------------------ plan


def test_assign_shards_contiguous_balanced():
    runs = assign_shards([5, 1, 1, 1, 1, 1, 5], 3)
    assert [list(r) for r in runs] == [[0], [1, 2, 3, 4, 5], [6]]
    assert [len(r) for r in assign_shards([1, 1], 4)] == [1, 1, 0, 0]  # more workers than shards


def test_plan_covers_every_block_and_shard(job):
    plan = service_plan(job, ClusterOptions(workers=4, gpus_per_worker=1))
    assert [w.range.start for w in plan.workers] == [0, *[w.range.end for w in plan.workers[:-1]]]
    assert plan.workers[-1].range.end == job.n_layers + 2
    assert [i for w in plan.workers for i in w.shards] == list(range(len(job.shards)))
    text = plan.describe()
    assert "embed" in text and "head" in text and "'GPU': 1" in text


# ----------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("k", [1, 2, 4])
def test_merge_byte_identical_for_any_k(k, pools, job, reference, tmp_path):
    out = distributed_merge(job, tmp_path / "out", pools[k].options, pool=pools[k], progress=False)
    assert_same_checkpoint(reference, out)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["service"]["workers"] == k
    assert report["seed"] == 7


def test_fake_gpu_bundles(pools):
    """Pool 2 asked for GPUs automatically (2 fake GPUs, 2 workers): one distinct GPU per worker."""
    pool = pools[2]
    assert pool.bundle == {"CPU": CPU, "GPU": 1.0}
    ids = [tuple(i["gpu_ids"]) for i in pool.info()]
    assert all(len(g) == 1 for g in ids) and len(set(ids)) == 2
    assert pools[4].bundle == {"CPU": CPU}  # 2 GPUs cannot serve 4 workers: CPU bundles


def test_killed_worker_redoes_its_shards(pools, job, reference, tmp_path):
    pool = pools[2]
    runs = shard_assignment(job, 2)
    killed: list[int] = []

    def kill_other(index: int, digest: str, pid: int) -> None:
        if not killed:  # after the first shard, kill the worker that did not write it, mid-run
            victim = 1 if index in runs[0] else 0
            killed.append(victim)
            ray.kill(pool.actors[victim], no_restart=False)

    before = {i["pid"] for i in pool.info()}
    out = distributed_merge(job, tmp_path / "out", pool.options, pool=pool, aim=slow_aim(0.02),
                            progress=False, on_done=kill_other)
    assert_same_checkpoint(reference, out)
    writers = set(json.loads((out / "merge_report.json").read_text())["service"]["writer_pids"].values())
    assert writers - before, "a restarted worker should have written some shards"


class DriverCrash(Exception):
    pass


def test_failed_run_resumes_from_verified_shards(pools, job, reference, tmp_path):
    pool = pools[2]
    out = tmp_path / "out"
    seen: list[int] = []

    def crash(index: int, digest: str, pid: int) -> None:
        seen.append(index)
        if len(seen) == 4:
            raise DriverCrash  # the driver dies after 4 recorded shards

    with pytest.raises(DriverCrash):
        distributed_merge(job, out, pool.options, pool=pool, aim=slow_aim(0.01), progress=False,
                          on_done=crash)
    work = out.parent / f".{out.name}.aim-ray-partial"
    assert not out.exists() and work.exists()  # nothing that looks like a finished checkpoint
    recorded = sorted(int(i) for i in json.loads((work / PROGRESS).read_text())["shards"])
    assert recorded == sorted(seen)
    corrupt = work / shard_filename(recorded[0], len(job.shards))
    corrupt.write_bytes(corrupt.read_bytes()[:-8] + b"corrupt!")  # fails its sha256: must be redone

    # the same relaxation hook as the crashed run (its speed is no part of its identity): else refused
    resumed = distributed_merge(job, out, pool.options, pool=pool, resume=True, aim=slow_aim(0.0), progress=False)
    assert_same_checkpoint(reference, resumed)
    report = json.loads((resumed / "merge_report.json").read_text())
    rewritten = {int(i) for i in report["service"]["writer_pids"]}
    assert rewritten == set(range(len(job.shards))) - set(recorded[1:])
    assert report["resumed_shards"] == [shard_filename(i, len(job.shards)) for i in recorded[1:]]


def test_user_error_in_worker_is_raised_as_itself(pools, family, tmp_path):
    """A NaN in an expert (found by a worker) surfaces as the CheckpointError itself; no output is left."""
    import shutil

    from safetensors.torch import load_file, save_file

    from aim_ray.errors import CheckpointError

    base, experts = family
    bad = tmp_path / "bad_expert"
    shutil.copytree(experts[0], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.3.mlp.down_proj.weight"  # late in the plan: written by the last worker
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    job = prepare(_config(tmp_path, base, [bad, experts[1]], method="ties"), shard_size=SHARD)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="NaN") as error:
        distributed_merge(job, out, pools[2].options, pool=pools[2], progress=False)
    assert not out.exists()
    if (tmp_path / ".out.aim-ray-partial").exists():  # shards the other worker finished first are kept
        assert "rerun with --resume to continue" in str(error.value)


def test_many_experts_on_four_workers(pools, tmp_path_factory):
    """32 experts, ties, 4 workers: completes with the single-process bytes; worker memory stays small."""
    base, experts = build_tiny_family(tmp_path_factory.mktemp("many"), "llama", n_experts=32, seed=9,
                                      num_layers=2)
    tmp = tmp_path_factory.mktemp("many_out")
    job = prepare(_config(tmp, base, experts, method="ties"), shard_size=SHARD)
    ref = run_merge(job, tmp / "ref", progress=False)
    out = distributed_merge(job, tmp / "out", pools[4].options, pool=pools[4], progress=False)
    assert_same_checkpoint(ref, out)
    peak = ray.get([a.peak_rss_mb.remote() for a in pools[4].actors])
    assert max(peak) < 2000, peak  # torch + transformers dominate; 32 memory-mapped experts add little


@pytest.mark.parametrize("method", ["passthrough", "dare_ties"])
def test_slices_byte_identical_on_four_workers(method, pools, family, tmp_path):
    """A frankenmerge (6 output layers from two 4-layer models) and a slices merge with a gradient density and
    filtered weights: the per-tensor plan is the same in every worker, so are the bytes."""
    base, experts = family
    b, e0, e1 = str(base), str(experts[0]), str(experts[1])
    if method == "passthrough":
        slices = [{"sources": [{"model": e0, "layer_range": [0, 3]}]},
                  {"sources": [{"model": e1, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]
    else:
        weight = [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.5}]
        slices = [{"sources": [{"model": b, "layer_range": [0, 3]}, {"model": e0, "layer_range": [0, 3]},
                               {"model": e1, "layer_range": [1, 4], "parameters": {"weight": weight}}],
                   "parameters": {"density": [0.3, 0.8], "weight": 0.7}}]
    data = {"merge_method": method, "slices": slices, **({"base_model": b} if method != "passthrough" else {})}
    path = tmp_path / "slices.yaml"
    path.write_text(json.dumps(data))
    job = prepare(load_merge_config(path), seed=3, shard_size=SHARD)
    ref = run_merge(job, tmp_path / "ref", progress=False)
    out = distributed_merge(job, tmp_path / "out", pools[4].options, pool=pools[4], progress=False)
    assert_same_checkpoint(ref, out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == (6 if method == "passthrough" else 3)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_merges_byte_identical_on_two_workers(method, pools, family, tmp_path):
    """The single process (torch on 2 threads) and 2 workers (1 thread each) write the same bytes: the SVDs run
    on one thread whatever the process's setting."""
    job = prepare(_config(tmp_path, *family, method=method, params={"weight": 0.8}), shard_size=SHARD)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = run_merge(job, tmp_path / "ref", progress=False)
    finally:
        torch.set_num_threads(before)
    out = distributed_merge(job, tmp_path / "out", pools[2].options, pool=pools[2], progress=False)
    assert_same_checkpoint(ref, out)


# ----------------------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}"
                              for i in range(120)))
    return path


@pytest.mark.parametrize("k", [2, 4])
def test_pipeline_scales_equal_single_process(k, pools, job, family):
    base = str(family[0])
    blocks = torch.randint(0, 256, (7, 24), generator=torch.Generator().manual_seed(3))
    expected = collect_activation_scales(base, blocks, None, micro_batch=2)  # the full model, one process
    ranges = layer_ranges(job, k)
    got = pools[k].calibrate(base, ranges, blocks, micro_batch=2, max_inflight=2)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("k", [2, 3])
def test_pipelined_sensitivity_equals_single_process(k, pools, job, family):
    """Forward down the stages, backward up them (gradients of the hidden states as object refs): the very
    bits of the whole-model backward in one process."""
    base = str(family[0])
    blocks = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(4))
    expected = collect_sensitivity_scales(base, blocks)
    pool = pools.get(k) or _pool(k)
    try:
        ranges = layer_ranges(job, k)
        assert len(ranges) == k and all(r.layers.stop > r.layers.start for r in ranges)
        got = pool.calibrate(base, ranges, blocks, micro_batch=1, kind="sensitivity",
                             max_inflight=2 if k == 2 else None)  # 2: forward(i + 2) before backward(i)
        busy = ray.get([a.busy_seconds.remote() for a in pool.actors], timeout=60)
    finally:
        if k not in pools:
            pool.close()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert all(b > 0 for b in busy)  # every stage did its share


def test_pipeline_device_and_dtype(pools, job, family):
    """Fake GPU ids without CUDA: auto resolves to cpu + float32; asking for cuda is a one-line error."""
    assert pools[2].compute() == (["cpu", "cpu"], "float32")
    assert pools[2].compute("cpu", "bf16") == (["cpu", "cpu"], "bfloat16")
    with pytest.raises(CalibrationError, match=r"^calibration\.device \(--device\) 'cuda': no CUDA GPU is usable"):
        pools[2].calibrate(str(family[0]), layer_ranges(job, 2), torch.zeros(1, 8, dtype=torch.long), 1,
                           device="cuda")


@pytest.mark.parametrize("kind", ["activation", "sensitivity"])
def test_aim_merge_distributed_equals_single_process(pools, family, calib_text, tmp_path, monkeypatch, kind):
    base, experts = family
    aim = {"omega": 0.4, "kind": kind, "calibration": {"dataset": str(calib_text), "n_samples": 40,
                                                       "block_size": 128, "micro_batch": 2}}
    cfg = _config(tmp_path, base, experts, method="ties", aim=aim)
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache_single"))
    single = prepare(cfg, shard_size=SHARD)
    relax, metadata, report = aim_for_job(single)
    ref = run_merge(single, tmp_path / "ref", relax=relax, metadata=metadata, report=report, progress=False)
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache_ray"))  # no cache hit: the pipeline runs
    monkeypatch.setattr("aim_ray.relaxer.cached_calibrate", None)  # no fallback to calibrating in this process
    dist = prepare(cfg, shard_size=SHARD)
    out = distributed_merge(dist, tmp_path / "out", pools[2].options, pool=pools[2], aim=pool_aim(dist),
                            progress=False)
    assert_same_checkpoint(ref, out)
    assert list((tmp_path / "cache_ray" / "scales").glob("*.safetensors"))
    report = json.loads((out / "merge_report.json").read_text())["aim"]
    assert (report["omega"], report["kind"], report["scales"]["dtype"]) == (0.4, kind, "float32")


def test_each_shard_gets_only_its_scales(pools, family, calib_text, tmp_path, monkeypatch):
    """Workers receive, per shard, an AimRelaxer holding only the scales of that shard's tensors; together
    the shards hold every entry the full relaxer needs."""
    from aim_ray.driver import _relax_per_shard

    base, experts = family
    aim = {"omega": 0.4, "calibration": {"dataset": str(calib_text), "n_samples": 40, "block_size": 128}}
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache"))
    job = prepare(_config(tmp_path, base, experts, method="ties", aim=aim), shard_size=SHARD)
    relax, _, _ = aim_for_job(job)
    parts = {i: ray.get(ref) for i, ref in _relax_per_shard(job, relax, range(len(job.shards))).items()}
    for i, part in parts.items():
        wanted = {t.name.removesuffix(".weight") for t in job.shards[i] if t.name.endswith(".weight")}
        assert set(part.scales) == wanted & set(relax.scales), i
        assert all(torch.equal(part.scales[k], relax.scales[k]) for k in part.scales)
    assert set().union(*(p.scales for p in parts.values())) == set(relax.scales)


def test_stalled_merge_times_out_naming_the_worker(local_ray, job, tmp_path):
    """A shard write that exceeds call_timeout_s fails with a ClusterError naming the worker and its node;
    the hidden work dir (with the shards already recorded) is kept for --resume."""
    from aim_ray.errors import ClusterError

    pool = WorkerPool(ClusterOptions(workers=1, cpus_per_worker=CPU, gpus_per_worker=0, call_timeout_s=2))
    try:
        node = pool.nodes[0][:8]
        out = tmp_path / "out"
        with pytest.raises(ClusterError, match=rf"no shard finished in 2 s; waiting on worker 0 on node {node}"):
            distributed_merge(job, out, pool.options, pool=pool, aim=slow_aim(3.0), progress=False)
        assert not out.exists() and (tmp_path / ".out.aim-ray-partial").is_dir()
    finally:
        pool.close()


@pytest.mark.parametrize(("method", "k"), [("regmean", 2), ("fisher", 4)])
def test_data_aware_merge_distributed_equals_single_process(pools, family, calib_text, tmp_path, monkeypatch,
                                                            method, k):
    """The experts' statistics come from the pipeline (one pass per expert over K stages), each shard's writer
    gets only its tensors' statistics, and the output (with AIM) is the single process's byte for byte."""
    import yaml

    from aim_ray.driver import _statistics_per_shard
    from aim_ray.statistics import attach_statistics

    base, experts = family
    data = {"dataset": str(calib_text), "n_samples": 24, "block_size": 128, "micro_batch": 2}
    raw = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "data": {**data, "n_samples": 24 + 4 * i}} for i, e in enumerate(experts)],
           "aim": {"omega": 0.4, "calibration": {**data, "n_samples": 40}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_merge_config(tmp_path / "cfg.yaml")
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache_single"))
    single = prepare(cfg, shard_size=SHARD)
    relax, metadata, report = aim_for_job(single)
    report.update(attach_statistics(single))
    ref = run_merge(single, tmp_path / "ref", relax=relax, metadata=metadata, report=report, progress=False)
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache_ray"))  # no cache hit: the pipeline runs
    monkeypatch.setattr("aim_ray.statistics.InProcess.collect", None)  # and nothing is collected in process
    dist = prepare(cfg, shard_size=SHARD)
    out = distributed_merge(dist, tmp_path / "out", pools[k].options, pool=pools[k], aim=pool_aim(dist),
                            progress=False)
    assert_same_checkpoint(ref, out)
    assert len(list((tmp_path / "cache_ray" / "statistics").glob("*.safetensors"))) == len(experts)
    stats = json.loads((out / "merge_report.json").read_text())["statistics"]
    assert stats["kind"] == ("gram" if method == "regmean" else "fisher")
    assert [e["n_samples"] for e in stats["experts"]] == [24, 28, 32]
    parts = {i: ray.get(r) for i, r in _statistics_per_shard(dist, range(len(dist.shards))).items()}
    for i, part in parts.items():
        for s, full in zip(part.experts, dist.statistics.experts, strict=True):
            assert set(s.tensors) == full.keys_for([t.name for t in dist.shards[i]]), i
    assert set().union(*(p.experts[0].tensors for p in parts.values())) == set(dist.statistics.experts[0].tensors)


# ------------------------------------------------------------------------------------- multi-node fault


def _cluster(n_nodes: int, **node_args):
    """A head (driver only, fast health checks) and `n_nodes` worker nodes; returns (cluster, nodes)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    return cluster, [cluster.add_node(**node_args) for _ in range(n_nodes)]


def test_node_removed_mid_merge_completes(job, reference, tmp_path, pools):
    """Head (driver only) + 2 worker nodes; SPREAD puts one worker on each. Removing one node mid-merge: its
    bundle is rescheduled on the surviving node, the actor restarts there and redoes its unfinished shards."""
    for pool in pools.values():  # this test needs its own cluster
        pool.close()
    pools.clear()
    ray.shutdown()
    cluster, nodes = _cluster(2, num_cpus=2, resources={"merge": 2})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        pool = WorkerPool(ClusterOptions(workers=2, cpus_per_worker=1, gpus_per_worker=0, placement="spread",
                                         resources_per_worker={"merge": 1}, ready_timeout_s=60))
        where = [i["node_id"] for i in pool.info()]
        assert len(set(where)) == 2
        runs = shard_assignment(job, 2)
        removed: list[str] = []

        def remove_other(index: int, digest: str, pid: int) -> None:
            if not removed:
                victim = where[1 if index in runs[0] else 0]
                node = next(n for n in nodes if n.node_id == victim)
                removed.append(victim)
                cluster.remove_node(node)

        out = distributed_merge(job, tmp_path / "out", pool.options, pool=pool, aim=slow_aim(0.02),
                                progress=False, on_done=remove_other)
        assert_same_checkpoint(reference, out)
        assert {i["node_id"] for i in pool.info()} == set(where) - set(removed)
        pool.close()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_lost_node_without_capacity_moves_its_shards(job, reference, tmp_path):
    """3 nodes with exactly one worker slot each. Removing one mid-merge leaves its worker nowhere to restart
    (Ray would keep it RESTARTING forever): after lost_worker_grace_s the driver kills it, moves its shards to
    the two survivors, and the merge completes with the uninterrupted run's bytes."""
    ray.shutdown()
    cluster, nodes = _cluster(3, num_cpus=1, resources={"slot": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        pool = WorkerPool(ClusterOptions(workers=3, cpus_per_worker=1, gpus_per_worker=0, placement="spread",
                                         resources_per_worker={"slot": 1}, ready_timeout_s=60,
                                         lost_worker_grace_s=3, call_timeout_s=120))
        where = list(pool.nodes)
        assert len(set(where)) == 3
        runs = shard_assignment(job, 3)
        removed: list[str] = []

        def remove_last(index: int, digest: str, pid: int) -> None:
            if not removed and index in runs[0]:  # the first worker has started: remove the third's node
                removed.append(where[2])
                cluster.remove_node(next(n for n in nodes if n.node_id == where[2]))

        started = time.perf_counter()
        with pytest.warns(UserWarning, match=r"worker 2 on node .* is lost \(its node died"):
            out = distributed_merge(job, tmp_path / "out", pool.options, pool=pool, aim=slow_aim(0.05),
                                    progress=False, on_done=remove_last)
        assert time.perf_counter() - started < 100
        assert_same_checkpoint(reference, out)
        assert pool.workers == [0, 1] and set(pool.nodes) == set(where[:2])
        writers = json.loads((out / "merge_report.json").read_text())["service"]["writer_pids"]
        assert {int(i) for i in writers} >= set(runs[2])  # the lost worker's shards were written by others
        pool.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
