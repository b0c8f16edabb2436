"""Hub checkpoints against a local hub-compatible server (tests/fakehub.py), through huggingface_hub's own code.

The family is served twice: as local sharded directories and as hub repos with the same bytes, so every hub
result is checked against the local one. Each test starts with an empty HF cache (HF_HOME in its tmp dir).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch
import yaml
from checks import assert_same_checkpoint
from huggingface_hub import constants

from aim_ray.actors import MergeOptions
from aim_ray.calibration import StageRunner
from aim_ray.checkpoint import Checkpoint
from aim_ray.config import MergeConfig, load_merge_config
from aim_ray.driver import ClusterOptions, distributed_merge, shard_assignment
from aim_ray.engine import prepare, run_merge, set_merge_threads, write_shard
from aim_ray.errors import CheckpointError
from aim_ray.hub import HubCheckpoint
from aim_ray.worlds.tiny import build_tiny_family

try:
    from tests.fakehub import FakeHub
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from fakehub import FakeHub

REPOS = ("aim-test/base", "aim-test/expert-0", "aim-test/expert-1")
SHARD = 60_000  # output shard size (bytes): several output shards, each from a few input files


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """Tiny Llama base + 2 experts, each saved as 4 safetensors shards with an index."""
    base, experts = build_tiny_family(tmp_path_factory.mktemp("hubfam"), "llama", n_experts=2, seed=21,
                                      max_shard_size="150KB")
    return [base, *experts]


@pytest.fixture(scope="module")
def server(family):
    hub = FakeHub()
    for repo, path in zip(REPOS, family):
        hub.publish(repo, path)
    hub.start()
    yield hub
    hub.stop()


def _point_at(monkeypatch, endpoint: str, home: Path, offline: bool = False) -> dict[str, str]:
    """huggingface_hub reads these settings once, at import: set the env (for new processes, e.g. Ray
    workers) and this process's constants alike."""
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    return env


@pytest.fixture
def hub(server, tmp_path, monkeypatch) -> FakeHub:
    """The local hub as HF_ENDPOINT, an empty HF cache, and a working dir without an `aim-test/` folder."""
    server.log.clear()
    server.env = _point_at(monkeypatch, server.endpoint, tmp_path / "hf")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return server


def _config(refs: list[str] | list[Path]) -> MergeConfig:
    base, *experts = [str(r) for r in refs]
    return MergeConfig.model_validate({
        "merge_method": "dare_ties", "base_model": base,
        "models": [{"model": e, "parameters": {"weight": 0.6, "density": 0.5}} for e in experts]})


def _weight_files(hub: FakeHub, repo: str) -> list[str]:
    return sorted(f"{repo}/{n}" for n in hub.repos[repo][hub.main[repo]] if n.endswith(".safetensors"))


def _all_weight_files(hub: FakeHub) -> list[str]:
    return sorted(f for repo in REPOS for f in _weight_files(hub, repo))




# ------------------------------------------------------------------------------------------- validation


def test_prepare_reads_remote_headers_only(hub, family):
    local = prepare(_config(family), seed=3, shard_size=SHARD)
    remote = prepare(_config(list(REPOS)), seed=3, shard_size=SHARD)
    assert hub.downloads() == []  # not one weight file: only ranged reads of the headers
    reads = hub.weight_reads()
    assert len(reads) == len(_all_weight_files(hub)) and {h.range for h in reads} == {"bytes=0-100000"}
    blobs = {p.name for p in Path(constants.HF_HUB_CACHE).glob("models--*/blobs/*")}
    weights = {f.sha256 for repo in REPOS for n, f in hub.repos[repo][hub.main[repo]].items()
               if n.endswith(".safetensors")}
    assert blobs and not blobs & weights
    # the same plan as from the local copies: names, shapes, dtypes, shards, vocabulary, output dtype
    assert remote.outputs == local.outputs and remote.shards == local.shards
    assert (remote.vocab_rows, remote.out_dtype) == (local.vocab_rows, local.out_dtype)
    assert [c.architecture for c in remote.experts] == [c.architecture for c in local.experts]
    base = remote.base
    assert isinstance(base, HubCheckpoint) and base.commit == hub.main["aim-test/base"]
    assert base.ref == f"aim-test/base@{base.commit}" and base.source == "aim-test/base"
    assert (remote.tokenizer_src / "tokenizer.json").read_bytes() == (family[0] / "tokenizer.json").read_bytes()
    # content hashes from the hub's sha256s, without downloads, equal to the local copies'
    assert [c.content_hash() for c in [remote.base, *remote.experts]] == \
        [c.content_hash() for c in [local.base, *local.experts]]
    assert hub.downloads() == []


def test_a_worker_downloads_only_the_files_of_its_shards(hub, tmp_path):
    job = prepare(_config(list(REPOS)), seed=3, shard_size=SHARD)
    write_shard(job, tmp_path, 0)
    needed = sorted({f"{c.repo_id}/{c.info(t.name).file.name}" for c in [job.base, *job.experts]
                     for t in job.shards[0]})
    assert hub.downloads() == needed
    assert len(needed) < len(_all_weight_files(hub))  # a strict subset: the other files stay on the hub


def test_calibration_stage_opens_the_pinned_ref_and_reads_its_layers_only(hub):
    base = Checkpoint.open("aim-test/base")
    stage = StageRunner(base.ref, 0, 1, is_first=True, is_last=False)
    assert stage.checkpoint.commit == base.commit
    owned = [n for n in base.names() if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert hub.downloads() == sorted({f"aim-test/base/{base.info(n).file.name}" for n in owned})


def test_workers_pin_the_commit_the_driver_resolved(hub, family, tmp_path):
    job = prepare(_config(list(REPOS)), seed=3)
    old = job.base.commit
    try:
        moved = hub.publish("aim-test/base", family[1])  # main moves on between the driver and a worker
        assert MergeOptions.of(job).prepare(job.config).base.commit == old
        assert prepare(job.config).base.commit == moved
    finally:
        del hub.repos["aim-test/base"][hub.main["aim-test/base"]]
        hub.main["aim-test/base"] = old


# ------------------------------------------------------------------------------------------------ merge


def test_concurrent_first_reads_download_once(hub):
    """Two checkpoints (no lock shared in this process) read the same tensor from 4 threads while the download
    is slow: huggingface_hub's per-blob file lock makes one download and the others wait for it."""
    hub.delay_s = 0.5
    try:
        a, b = (Checkpoint.open("aim-test/base") for _ in range(2))
        name = "model.embed_tokens.weight"
        with ThreadPoolExecutor(4) as pool:
            first, *others = pool.map(lambda c: c.read(name), [a, b, a, b])
    finally:
        hub.delay_s = 0.0
    assert all(torch.equal(first, t) for t in others)
    assert hub.downloads() == [f"aim-test/base/{a.info(name).file.name}"]


def test_merge_through_hub_ids_equals_local_merge(hub, family, tmp_path):
    reference = run_merge(prepare(_config(family), seed=3, shard_size=SHARD), tmp_path / "local", progress=False)
    set_merge_threads(3)  # concurrent first reads of one file: downloaded once all the same
    try:
        out = run_merge(prepare(_config(list(REPOS)), seed=3, shard_size=SHARD), tmp_path / "hub", progress=False)
    finally:
        set_merge_threads(1)
    assert_same_checkpoint(reference, out)
    assert hub.downloads() == _all_weight_files(hub)  # every weight file exactly once


def test_two_ray_workers_download_each_file_once(hub, family, tmp_path, monkeypatch):
    reference = run_merge(prepare(_config(family), seed=3, shard_size=SHARD), tmp_path / "local", progress=False)
    job = prepare(_config(list(REPOS)), seed=3, shard_size=SHARD)
    files = [{c.info(t.name).file.name for i in run for t in job.shards[i]} for run in shard_assignment(job, 2)
             for c in [job.base]]
    assert files[0] & files[1]  # a file both workers read: downloaded once all the same
    hub.log.clear()
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # Ray puts the driver's cwd (this checkout) on the
    # workers' sys.path; the repo root has no `aim-test/` folder, so the ids stay hub ids
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": hub.env})  # both workers share this test's HF_HOME
    try:
        out = distributed_merge(job, tmp_path / "ray", ClusterOptions(workers=2, gpus_per_worker=0,
                                                                      ready_timeout_s=120), progress=False)
    finally:
        ray.shutdown()
    assert_same_checkpoint(reference, out)
    assert hub.downloads() == _all_weight_files(hub)
    prepares = [h for h in hub.log if h.path.startswith("/api/models/aim-test/base")]
    assert len(prepares) == 2  # each worker validated the job again, from headers


# ------------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("ref", ["./base-typo", "../base-typo", "/no/such/base", "~/no-such-aim-ray-model",
                                 "models/llama-typo", "llama-typo", "aim-test/base/extra", "aim-test/base@"])
def test_path_like_refs_are_local_errors_never_hub_lookups(hub, ref):
    Path("models").mkdir()
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Checkpoint.open(ref)
    with pytest.raises(CheckpointError, match=r"^base_model: .*no such checkpoint directory"):
        prepare(_config([ref, "aim-test/expert-0"]))
    assert hub.log == []


def test_a_relative_path_whose_parent_exists_is_not_a_hub_id(hub):
    Path("aim-test").mkdir()  # now `aim-test/base` reads as a local path with a typo
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory \(./aim-test exists here"):
        Checkpoint.open("aim-test/base")
    assert hub.log == []


def test_hub_errors_are_one_line(hub):
    with pytest.raises(CheckpointError, match=r"^aim-test/nope: no such local directory, and no such model on the "
                                              r"Hugging Face hub") as e:
        Checkpoint.open("aim-test/nope")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"^aim-test/base: revision 'v9' not found on the Hugging Face hub"):
        Checkpoint.open("aim-test/base@v9")


# ---------------------------------------------------------------------------------------------- offline


def test_offline_and_unreachable_hub_use_the_warm_cache(hub, family, tmp_path, monkeypatch):
    online = run_merge(prepare(_config(list(REPOS)), seed=3, shard_size=SHARD), tmp_path / "online", progress=False)
    hashes = [Checkpoint.open(r).content_hash() for r in REPOS]
    home = Path(constants.HF_HUB_CACHE).parent
    for name, endpoint, offline in [("offline", hub.endpoint, True), ("unreachable", "http://127.0.0.1:9", False)]:
        _point_at(monkeypatch, endpoint, home, offline)
        hub.log.clear()
        job = prepare(_config(list(REPOS)), seed=3, shard_size=SHARD)
        assert job.base.commit == hub.main["aim-test/base"]
        assert [c.content_hash() for c in [job.base, *job.experts]] == hashes  # from the cache's blob names
        assert_same_checkpoint(online, run_merge(job, tmp_path / name, progress=False))
        assert hub.log == []


def test_offline_needs_the_weights_in_the_cache(hub, tmp_path, monkeypatch):
    prepare(_config(list(REPOS)))  # online: config, tokenizer and index cached, no weights
    _point_at(monkeypatch, hub.endpoint, Path(constants.HF_HUB_CACHE).parent, offline=True)
    with pytest.raises(CheckpointError, match=r"^base_model: aim-test/base@\w{12}: offline \(HF_HUB_OFFLINE=1\), and "
                                              r"the HF cache does not hold the whole checkpoint .*model-0000"):
        prepare(_config(list(REPOS)))
    _point_at(monkeypatch, hub.endpoint, tmp_path / "cold", offline=True)
    with pytest.raises(CheckpointError, match=r"aim-test/base: config.json is not in the HF cache .* and offline"):
        Checkpoint.open("aim-test/base")


def test_config_yaml_with_hub_ids_loads(hub, tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "aim-test/base@main",
                                    "models": [{"model": r, "parameters": {"weight": 1.0, "density": 0.5}}
                                               for r in REPOS[1:]]}))
    job = prepare(load_merge_config(path))
    assert job.base.commit == hub.main["aim-test/base"] and job.base.source == "aim-test/base@main"
