"""Checkpoint I/O: lazy reads, header validation, streaming shard writer, atomic output directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aim_ray.checkpoint import (
    Checkpoint,
    OutputDir,
    OutputTensor,
    ShardWriter,
    plan_shards,
    read_safetensors_header,
)
from aim_ray.errors import CheckpointError, OutputExistsError
from aim_ray.worlds.tiny import build_model, tiny_config


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    model = build_model(tiny_config("llama", num_layers=2), seed=0)
    model.save_pretrained(out, max_shard_size="40KB")
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sharded_checkpoint_lists_and_reads_every_tensor(sharded_model):
    path, state = sharded_model
    ckpt = Checkpoint.open(path)
    assert len(ckpt.files) > 1
    assert set(ckpt.names()) == set(state)
    for name, ref in state.items():
        assert ckpt.info(name).shape == tuple(ref.shape)
        assert torch.equal(ckpt.read(name), ref)
    assert ckpt.architecture == "LlamaForCausalLM"
    assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in state.values())


def test_single_file_checkpoint(llama_family):
    base, _ = llama_family
    ckpt = Checkpoint.open(base)
    assert ckpt.files == [base / "model.safetensors"]
    assert ckpt.read("model.norm.weight").dtype == torch.float32


def test_content_hash_is_stable_and_content_sensitive(llama_family, tmp_path):
    base, experts = llama_family
    assert Checkpoint.open(base).content_hash() == Checkpoint.open(base).content_hash()
    assert Checkpoint.open(base).content_hash() != Checkpoint.open(experts[0]).content_hash()


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "short"])
def test_corrupt_safetensors_is_refused_with_file_name(llama_family, tmp_path, damage):
    base, _ = llama_family
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    file = bad / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) - 100])
    elif damage == "garbage_header":
        file.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint.open(bad)


def test_index_naming_a_missing_shard(sharded_model, tmp_path):
    path, _ = sharded_model
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (bad / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        Checkpoint.open(bad)


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint.open(tmp_path / "empty")


def test_pickle_weights_need_explicit_opt_in(llama_family, tmp_path):
    base, _ = llama_family
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(base / "config.json", pk / "config.json")
    state = load_file(base / "model.safetensors")
    torch.save(state, pk / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint.open(pk)
    ckpt = Checkpoint.open(pk, allow_pickle=True)
    assert torch.equal(ckpt.read("model.norm.weight"), state["model.norm.weight"])


def test_shard_plan_is_greedy_and_deterministic():
    ts = [OutputTensor(f"t{i}", (10,), torch.float32) for i in range(7)]  # 40 bytes each
    plan = plan_shards(ts, 100)
    assert [[t.name for t in s] for s in plan] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]]
    big = [OutputTensor("big", (100,), torch.float32), OutputTensor("small", (1,), torch.float32)]
    assert [len(s) for s in plan_shards(big, 100)] == [1, 1]


def test_shard_writer_streams_a_valid_safetensors_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    plan = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardWriter(tmp_path / "x.safetensors", plan, {"note": "hi"})
    for k, v in tensors.items():
        w.add(k, v)
    digest = w.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert read_safetensors_header(tmp_path / "x.safetensors")["__metadata__"]["note"] == "hi"
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    # same tensors and metadata as the reference library's own writer (header order may differ)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt", "note": "hi"})
    ref = load_file(tmp_path / "ref.safetensors")
    assert all(torch.equal(ref[k], loaded[k]) for k in tensors)


def test_shard_writer_rejects_out_of_plan_tensor(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [OutputTensor("a", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expected"):
        w.add("a", torch.zeros(3))
    w.abort()


def test_output_dir_refuses_existing_and_commits_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "mine.txt"):  # an earlier checkpoint
        (out / name).write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        OutputDir(out)
    o = OutputDir(out, overwrite=True)
    with o.locked():
        work = o.prepare()
        assert work.name.startswith(".") and work.parent == tmp_path
        (work / "new.txt").write_text("merged")
        assert (out / "mine.txt").exists()  # untouched until commit
        o.commit({})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "new.txt").exists() and not (out / "mine.txt").exists()
