"""MergeKit's `model+lora` inputs (aim_ray/lora.py) against real PEFT adapters made with the installed `peft`:
every tensor read through aim-ray equals PEFT's merge_and_unload() bit for bit (float32 and bfloat16), a merge
of `expert+adapter` equals the same merge of PEFT's merged checkpoint and MergeKit's own `+` merge, and bad
adapters are refused in one line before anything is written."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from checks import assert_same_checkpoint
from click.testing import CliRunner
from conftest import write_yaml
from safetensors.torch import load_file, save_file

from aim_ray.checkpoint import Checkpoint
from aim_ray.cli import main
from aim_ray.config import load_merge_config
from aim_ray.engine import prepare, run_merge
from aim_ray.errors import CheckpointError
from aim_ray.lora import LoraCheckpoint
from aim_ray.worlds.tiny import build_tiny_family

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def make_adapter(model_dir: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A real PEFT LoRA adapter for `model_dir`, its zero-initialised factors (lora_B; an embedding's A) and
    modules_to_save copies randomised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}
    pm = peft.get_peft_model(model, peft.LoraConfig(**settings))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(out))
    return out


def peft_merged(model_dir: Path, adapter: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def assert_reads_equal_peft(model_dir: Path, adapter: Path) -> LoraCheckpoint:
    ckpt = Checkpoint.open(f"{model_dir}+{adapter}")
    assert isinstance(ckpt, LoraCheckpoint)
    expected = peft_merged(model_dir, adapter).state_dict()
    plain = Checkpoint.open(model_dir)
    changed = 0
    for name in ckpt.names():
        got = ckpt.read(name)
        assert got.dtype == plain.info(name).dtype == expected[name].dtype, name
        assert torch.equal(got, expected[name]), name
        changed += not torch.equal(got, plain.read(name))
    assert changed == len(set(ckpt.pairs) | set(ckpt.replaced)) > 0
    return ckpt


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base, experts = build_tiny_family(root / "f32", "llama", n_experts=2, seed=31)
    _, (bf16,) = build_tiny_family(root / "bf16", "llama", n_experts=1, seed=32, dtype=torch.bfloat16)
    adapter = make_adapter(experts[0], root / "adapter", seed=1, modules_to_save=["lm_head"])
    return {"base": base, "expert_0": experts[0], "expert_1": experts[1], "bf16": bf16, "adapter": adapter,
            "bf16_adapter": make_adapter(bf16, root / "bf16_adapter", seed=2, modules_to_save=["lm_head"]),
            "root": root}


# ------------------------------------------------------------------------------------------- PEFT's merge


@pytest.mark.parametrize("which", ["float32", "bfloat16"])
def test_every_tensor_equals_peft_merge_and_unload(fam, which):
    """Linear and embedding targets, the embedding's saved base layer and a modules_to_save head: bit for bit
    (bf16: PEFT adds a float32 delta into a Linear weight, rounding once, but rounds an embedding's delta first)."""
    model, adapter = (fam["expert_0"], fam["adapter"]) if which == "float32" else (fam["bf16"], fam["bf16_adapter"])
    ckpt = assert_reads_equal_peft(model, adapter)
    assert sorted(ckpt.replaced) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert ckpt.pairs["model.embed_tokens.weight"].embedding
    assert ckpt.pairs["model.layers.1.mlp.down_proj.weight"].scale == 2.0


@pytest.mark.parametrize("lora,scale", [
    ({"r": 8, "lora_alpha": 4, "use_rslora": True}, 4 / math.sqrt(8)),
    ({"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 32}}, None),
])
def test_rslora_and_rank_alpha_patterns(fam, tmp_path, lora, scale):
    adapter = make_adapter(fam["expert_0"], tmp_path / "adapter", seed=3, **lora)
    ckpt = assert_reads_equal_peft(fam["expert_0"], adapter)
    pairs = ckpt.pairs
    if scale is not None:  # rslora: alpha / sqrt(r)
        assert pairs["model.layers.0.self_attn.q_proj.weight"].scale == scale
    else:
        assert pairs["model.layers.0.self_attn.v_proj.weight"].scale == 8 / 2
        assert pairs["model.layers.1.self_attn.q_proj.weight"].scale == 32 / 4
        assert pairs["model.layers.0.self_attn.q_proj.weight"].scale == 8 / 4


def test_gpt2_conv1d_layers_take_the_transposed_delta(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(str(tmp_path / "gpt2"))
    adapter = make_adapter(tmp_path / "gpt2", tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True)
    ckpt = assert_reads_equal_peft(tmp_path / "gpt2", adapter)
    assert all(p.transpose for p in ckpt.pairs.values()) and len(ckpt.pairs) == 8


# ------------------------------------------------------------------------------------------------- merges


def _merge_config(expert_0: str, fam: dict[str, Path]) -> dict:
    return {"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "float32",
            "models": [{"model": expert_0, "parameters": {"weight": 0.7, "density": 0.6}},
                       {"model": str(fam["expert_1"]), "parameters": {"weight": 0.5, "density": 0.6}}]}


def _digests(*dirs: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for d in dirs for f in sorted(d.rglob("*"))
            if f.is_file()}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


def test_merge_equals_the_merge_of_peft_merged_checkpoint_and_mergekit(fam, tmp_path):
    """`expert+adapter` in a YAML (paths relative to it) merges exactly as PEFT's merged copy of the expert, and
    within 1e-6 of MergeKit's own `+` merge; the model and adapter are never written to."""
    (tmp_path / "m").symlink_to(fam["expert_0"])
    (tmp_path / "a").symlink_to(fam["adapter"])
    before = _digests(fam["expert_0"], fam["adapter"])
    config = load_merge_config(write_yaml(tmp_path / "merge.yaml", _merge_config("m+a", fam)))
    assert config.models[0].model == f"{(tmp_path / 'm').resolve()}+{(tmp_path / 'a').resolve()}"
    ours = run_merge(prepare(config), tmp_path / "ours", progress=False)
    assert _digests(fam["expert_0"], fam["adapter"]) == before

    peft_merged(fam["expert_0"], fam["adapter"]).save_pretrained(str(tmp_path / "merged_expert"))
    shutil.copy(fam["expert_0"] / "tokenizer.json", tmp_path / "merged_expert")
    reference = run_merge(prepare(load_merge_config(write_yaml(tmp_path / "ref.yaml", _merge_config(
        str(tmp_path / "merged_expert"), fam)))), tmp_path / "reference", progress=False)
    assert_same_checkpoint(ours, reference)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    data = _merge_config(f"{fam['expert_0']}+{fam['adapter']}", fam)
    mergekit_merge(MergeConfiguration.model_validate(data), str(tmp_path / "mergekit"),
                   MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                lora_merge_cache=str(tmp_path / "lora-cache")))
    a, b = _tensors(ours), _tensors(tmp_path / "mergekit")
    assert sorted(a) == sorted(b)
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6


def test_content_hash_covers_model_and_adapter_and_ref_reopens(fam, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(fam["adapter"], adapter)
    ckpt = Checkpoint.open(f"{fam['expert_0']}+{adapter}")
    plain = Checkpoint.open(fam["expert_0"])
    assert ckpt.content_hash() != plain.content_hash()
    again = Checkpoint.open(ckpt.ref)
    assert again.content_hash() == ckpt.content_hash() and ckpt.commit is None
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(again.read(name), ckpt.read(name))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    changed = Checkpoint.open(f"{fam['expert_0']}+{adapter}")
    assert changed.content_hash() != ckpt.content_hash()
    assert not torch.equal(changed.read(name), ckpt.read(name))


def test_pickle_adapter_only_with_allow_pickle(fam, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(fam["adapter"] / "adapter_config.json", adapter)
    torch.save(load_file(fam["adapter"] / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    ref = f"{fam['expert_0']}+{adapter}"
    with pytest.raises(CheckpointError, match=r"only pickle weights \(adapter_model.bin\)"):
        Checkpoint.open(ref)
    ckpt, safe = Checkpoint.open(ref, allow_pickle=True), Checkpoint.open(f"{fam['expert_0']}+{fam['adapter']}")
    assert all(torch.equal(ckpt.read(n), safe.read(n)) for n in ckpt.names())


@pytest.fixture
def hub(fam, tmp_path, monkeypatch):
    """The expert and its adapter as hub repos on a local hub (tests/fakehub.py), with an empty HF cache."""
    from fakehub import FakeHub
    from huggingface_hub import constants

    server = FakeHub()
    server.publish("aim-test/expert", fam["expert_0"])
    server.publish("aim-test/lora", fam["adapter"])
    server.start()
    home, endpoint = tmp_path / "hf", server.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    yield server
    server.stop()


def test_hub_model_and_adapter_are_pinned_together(hub, fam, tmp_path):
    from aim_ray.engine import pinned_revisions

    ref = "aim-test/expert+aim-test/lora"
    ckpt, local = Checkpoint.open(ref), Checkpoint.open(f"{fam['expert_0']}+{fam['adapter']}")
    assert all(torch.equal(ckpt.read(n), local.read(n)) for n in local.names())
    assert ckpt.content_hash() == local.content_hash()  # same bytes, whether from the hub or a local copy
    model, adapter = hub.main["aim-test/expert"], hub.main["aim-test/lora"]
    assert ckpt.commit == f"{model}+{adapter}" and ckpt.ref == f"aim-test/expert@{model}+aim-test/lora@{adapter}"
    job = prepare(load_merge_config_from(_merge_config(ref, fam)))
    pins = pinned_revisions(job)
    assert pins == {ref: ckpt.commit}
    other = make_adapter(fam["expert_0"], tmp_path / "other", seed=9)
    moved = hub.publish("aim-test/lora", other)  # main moves on between the driver and a worker
    assert prepare(job.config, revisions=pins).experts[0].adapter.commit == adapter
    assert Checkpoint.open(ref).adapter.commit == moved
    assert Checkpoint.open(f"aim-test/expert+aim-test/lora@{adapter}").adapter.commit == adapter


# ------------------------------------------------------------------------------------------------- errors


def _bad_adapter(fam: dict[str, Path], tmp_path: Path, case: str) -> str:
    """The model+lora reference of a broken adapter (`case`)."""
    adapter = tmp_path / "bad"
    if case == "missing":
        return f"{fam['expert_0']}+{adapter}"
    if case == "two-plus":
        return f"{fam['expert_0']}+{fam['adapter']}+{fam['adapter']}"
    shutil.copytree(fam["adapter"], adapter)
    cfg_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    cfg, tensors = json.loads(cfg_file.read_text()), load_file(weights)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    if case == "no-config":
        cfg_file.unlink()
    elif case == "not-lora":
        cfg_file.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    elif case == "dora":
        cfg_file.write_text(json.dumps({**cfg, "use_dora": True}))
    elif case == "rank":
        cfg_file.write_text(json.dumps({**cfg, "r": 8}))
    elif case in ("no-target", "shape"):
        if case == "no-target":
            for part in ("lora_A", "lora_B"):
                tensors[f"{q.replace('layers.0', 'layers.7')}.{part}.weight"] = tensors.pop(f"{q}.{part}.weight")
        else:
            tensors[f"{q}.lora_B.weight"] = torch.zeros(48, 4)
        save_file(tensors, weights, metadata={"format": "pt"})
    return f"{fam['expert_0']}+{adapter}"


BAD = {
    "missing": "no such LoRA adapter directory",
    "two-plus": "a LoRA reference is MODEL+ADAPTER (exactly one '+', both given)",
    "no-config": "no adapter_config.json (not a PEFT adapter directory)",
    "not-lora": "peft_type 'IA3' is not LORA",
    "dora": "use_dora: True (DoRA) is not supported",
    "rank": "not rank 8 matrices",
    "no-target": "targets 'model.layers.7.self_attn.q_proj.weight', which",
    "shape": "give a delta of shape (48, 64), but 'model.layers.0.self_attn.q_proj.weight' of the model has "
             "shape (64, 64)",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_one_line_errors_before_any_output(fam, tmp_path, case):
    ref = _bad_adapter(fam, tmp_path, case)
    data = _merge_config(ref, fam)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(write_yaml(tmp_path / "m.yaml", data)), "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aim-ray: error: models[0]: ") and BAD[case] in lines[0], lines
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_base_model_and_slice_sources_take_lora_refs_too(fam):
    ref = f"{fam['base']}+{fam['root'] / 'nope'}"
    with pytest.raises(CheckpointError, match=r"^base_model: .*nope: no such LoRA adapter directory$"):
        prepare(load_merge_config_from({"merge_method": "linear", "base_model": ref,
                                        "models": [{"model": ref, "parameters": {"weight": 1.0}}]}))
    good = f"{fam['expert_0']}+{fam['adapter']}"
    job = prepare(load_merge_config_from({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": good, "layer_range": [0, 2]}]}]}))
    assert isinstance(job.base, LoraCheckpoint)


def load_merge_config_from(data: dict):
    from aim_ray.config import MergeConfig, parse_config

    return parse_config(MergeConfig, data, "test")
