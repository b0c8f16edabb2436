"""Plain merges for any architecture: GPT-2, Granite, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, Mixtral and a LLaVA
checkpoint (`language_model.` / `vision_tower.` prefixes), each a tiny random transformers model saved with
`save_pretrained`, base + 2 experts.

Per family: a ties merge equals an independent recomputation per tensor, and the shard plan covers every tensor
once with layers in order. GPT-2 and LLaVA also: the Ray pool (2 workers) writes the same bytes as one process,
and MergeKit's `run_merge` gives the same tensors. AIM: a family without a pipelined stage runner calibrates the
whole model in one stage (with a warning naming it), in process and on the pool alike; GPT-2's Conv1D weights
are relaxed along their input dimension 0.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from aim_ray.aim import relaxation_factor
from aim_ray.architectures import input_axis, is_embedding, is_vocab_tensor, layer_index, num_layers
from aim_ray.calibration import SensitivityStage, StageRunner, collect_activation_scales, collect_sensitivity_scales
from aim_ray.checkpoint import Checkpoint
from aim_ray.config import load_merge_config
from aim_ray.engine import prepare, run_merge
from aim_ray.errors import CalibrationError
from aim_ray.plan import block_of, plan_ranges
from aim_ray.relaxer import aim_for_job
from aim_ray.scales import Scales, expected_shapes
from aim_ray.worlds.tiny import add_expert_delta, build_tokenizer

try:
    from tests.conftest import write_yaml
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from conftest import write_yaml

FAMILIES = ("gpt2", "granite", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "llava", "mistral3")
WEIGHTS = (0.6, 0.4)
DENSITY = 0.5
SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_model(family: str):
    import transformers as tf

    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=256, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2)
    elif family == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=16, patch_size=8, projection_dim=16)
        config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**SMALL), image_token_index=255)
        return tf.LlavaForConditionalGeneration(config)
    elif family == "mistral3":  # LLaVA-style too (Pixtral tower), and a MergeKit architecture
        vision = tf.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=8, head_dim=8)
        config = tf.Mistral3Config(vision_config=vision, text_config=tf.MistralConfig(**SMALL), image_token_index=255,
                                   spatial_merge_size=1)
        return tf.Mistral3ForConditionalGeneration(config)
    else:
        classes = {"granite": tf.GraniteConfig, "qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config,
                   "gemma3_text": tf.Gemma3TextConfig, "phi3": tf.Phi3Config, "mixtral": tf.MixtralConfig}
        extra = {"qwen3": dict(head_dim=8), "gemma2": dict(head_dim=8, sliding_window=8),
                 "gemma3_text": dict(head_dim=8, sliding_window=8, sliding_window_pattern=2),
                 "mixtral": dict(num_local_experts=3, num_experts_per_tok=2)}.get(family, {})
        config = classes[family](**SMALL, **extra)
    return tf.AutoModelForCausalLM.from_config(config)


def build(root: Path, family: str, seed: int = 5) -> tuple[Path, list[Path]]:
    """base + 2 experts (base + distinct random deltas), float32, with a tokenizer."""
    tok = root / "tokenizer"
    if not tok.exists():
        build_tokenizer(tok)
    paths = []
    for i in range(3):
        torch.manual_seed(seed)
        model = tiny_model(family)
        with torch.no_grad():
            for name, p in model.named_parameters():  # norms start at exactly 1 (or 0): make them vary
                if "norm" in name or "ln_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        if i:
            add_expert_delta(model, seed=seed * 100 + i)
        out = root / family / ("base" if i == 0 else f"expert_{i}")
        model.save_pretrained(str(out))
        for f in tok.iterdir():
            shutil.copy(f, out / f.name)
        paths.append(out)
    return paths[0], paths[1:]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("arch")
    return {f: build(root, f) for f in FAMILIES}


def ties_config(tmp_path: Path, base: Path, experts: list[Path], name: str = "ties.yaml", **top) -> Path:
    data = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": DENSITY},
            "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, WEIGHTS)], **top}
    return write_yaml(tmp_path / name, data)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ties_reference(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """DESIGN.md section 2, written out independently: top-k trim, sign consensus, weighted mean."""
    ds = []
    for e, w in zip(experts, WEIGHTS):
        tau = (e - base).double()
        k = max(1, int(DENSITY * tau.numel()))
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[tau.abs().flatten().argsort(descending=True)[:k]] = True
        ds.append(w * tau * keep.view(tau.shape))
    sign = torch.where(sum(ds) >= 0, 1.0, -1.0).double()
    masks = [(torch.sign(d) == sign) for d in ds]
    mixed = sum(m * d for m, d in zip(masks, ds))
    div = sum(m * w for m, w in zip(masks, WEIGHTS))
    div = torch.where(div == 0, torch.ones_like(div), div)
    return (base.double() + mixed / div).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_ties_merge_matches_recomputation(families, family, tmp_path):
    base, experts = families[family]
    out = run_merge(prepare(load_merge_config(ties_config(tmp_path, base, experts))), tmp_path / "out",
                    progress=False)
    merged = read_all(out)
    inputs = [read_all(p) for p in (base, *experts)]
    assert set(merged) == set(inputs[0])
    for name, t in merged.items():
        ref = ties_reference(inputs[0][name], [e[name] for e in inputs[1:]])
        torch.testing.assert_close(t, ref, rtol=0, atol=1e-6, msg=name)


EXPECTED_LAYERS = {"gpt2": 3, "llava": 3}


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_plan_covers_every_tensor_once_layers_in_order(families, family, tmp_path):
    base, experts = families[family]
    job = prepare(load_merge_config(ties_config(tmp_path, base, experts)), shard_size=4_000)
    names = Checkpoint.open(base).names()
    assert job.n_layers == num_layers(Checkpoint.open(base).config) == 3
    planned = [t.name for shard in job.shards for t in shard]
    assert sorted(planned) == sorted(names) and len(planned) == len(set(planned))
    assert len(job.shards) > 3
    blocks = [block_of(n, job.n_layers) for n in planned]
    assert blocks == sorted(blocks) and blocks[0] == 0 and blocks[-1] == job.n_layers + 1
    layers = [layer_index(n) for n in planned if layer_index(n) is not None]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2}
    front = [n for n in planned if block_of(n, job.n_layers) == 0]
    head = [n for n in planned if block_of(n, job.n_layers) == job.n_layers + 1]
    assert any(is_embedding(n) for n in front) and head  # embeddings first; final norm (+ lm_head) last
    assert all("norm" in n or "ln_f" in n or "lm_head" in n for n in head)
    if family in ("llava", "mistral3"):
        assert all(n.startswith(("vision_tower.", "multi_modal_projector.", "language_model.model.embed_tokens"))
                   for n in front)
        assert {n for n in front if "layers.1." in n}  # the tower's layers are not decoder layers
        assert all(n.startswith("language_model.") for n in head)
        assert "language_model.model.norm.weight" in head
    for k in (1, 2, 3):  # contiguous byte-balanced ranges over all blocks, whatever k
        ranges = plan_ranges({t.name: t.nbytes for t in job.outputs}, job.n_layers, k)
        assert ranges[0].start == 0 and ranges[-1].end == job.n_layers + 2
        assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
        assert sum(r.nbytes for r in ranges) == sum(t.nbytes for t in job.outputs)


def test_name_patterns():
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11
    assert layer_index("language_model.model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("model.language_model.layers.2.self_attn.q_proj.weight") == 2
    assert layer_index("backbone.blocks.4.mixer.weight") == 4
    assert layer_index("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight") is None
    assert block_of("transformer.ln_f.weight", 12) == 13 and block_of("transformer.wpe.weight", 12) == 0
    assert block_of("model.layers.9.mlp.up_proj.weight", 12) < block_of("model.layers.10.mlp.up_proj.weight", 12)
    for name in ("transformer.wte.weight", "language_model.model.embed_tokens.weight", "lm_head.weight",
                 "language_model.lm_head.weight", "gpt_neox.embed_in.weight", "embed_out.weight"):
        assert is_vocab_tensor(name), name
    for name in ("transformer.wpe.weight", "vision_tower.embeddings.patch_embedding.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.bias"):
        assert not is_vocab_tensor(name), name
    assert is_embedding("transformer.wpe.weight") and is_embedding("transformer.wte")
    assert not is_embedding("lm_head") and not is_embedding("transformer.h.0.attn.c_attn")
    assert num_layers({"n_layer": 12}) == 12 and num_layers({"text_config": {"num_hidden_layers": 5}}) == 5
    assert num_layers({}, ["model.layers.0.a.weight", "model.layers.3.a.weight"]) == 4
    gpt2 = {"model_type": "gpt2"}
    assert input_axis("transformer.h.0.attn.c_proj.weight", gpt2) == 0
    assert input_axis("transformer.h.0.attn.c_proj.bias", gpt2) == -1
    assert input_axis("transformer.h.0.attn.c_proj.weight", {"model_type": "gpt_bigcode"}) == -1


def test_vocab_tensors_of_other_families_align(families, tmp_path):
    """GPT-2's `wte` is a vocabulary tensor: experts with a different vocabulary are refused (then merged with
    `tokenizer_source: base`)."""
    from safetensors.torch import save_file

    base, experts = families["gpt2"]
    wide = tmp_path / "wide"
    shutil.copytree(experts[0], wide)
    tensors = load_file(wide / "model.safetensors")
    tensors["transformer.wte.weight"] = torch.cat([tensors["transformer.wte.weight"], torch.zeros(4, 32)])
    save_file(tensors, wide / "model.safetensors", metadata={"format": "pt"})
    from aim_ray.errors import CheckpointError

    with pytest.raises(CheckpointError, match="vocabulary has 260 rows but the base .* has 256"):
        prepare(load_merge_config(ties_config(tmp_path, base, [wide, experts[1]])))
    job = prepare(load_merge_config(ties_config(tmp_path, base, [wide, experts[1]], "b.yaml",
                                                tokenizer_source="base")))
    assert job.vocab_rows == 256


def test_llava_vocabulary_union_updates_text_config(families, tmp_path):
    """LLaVA's vocabulary tensors carry the `language_model.` prefix and its vocab_size lives in text_config."""
    import json

    from safetensors.torch import save_file

    base, experts = families["llava"]
    wide = tmp_path / "wide"
    shutil.copytree(experts[0], wide)
    tensors = load_file(wide / "model.safetensors")
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.full((4, 32), 0.5)])
    save_file(tensors, wide / "model.safetensors", metadata={"format": "pt"})
    cfg = ties_config(tmp_path, base, [wide, experts[1]], tokenizer_source="union")
    out = run_merge(prepare(load_merge_config(cfg)), tmp_path / "out", progress=False)
    merged = read_all(out)
    assert merged["language_model.model.embed_tokens.weight"].shape == (260, 32)
    assert merged["language_model.lm_head.weight"].shape == (260, 32)
    assert torch.equal(merged["language_model.lm_head.weight"][256:], torch.full((4, 32), 0.5))
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 260 and "vocab_size" not in config


def test_dry_run_names_the_one_stage(families, tmp_path):
    from aim_ray.driver import ClusterOptions, dry_run_plan

    base, experts = families["gpt2"]
    cfg = ties_config(tmp_path, base, experts, aim={"omega": 0.5, "calibration": {"dataset": "x.jsonl"}})
    text = dry_run_plan(load_merge_config(cfg), ClusterOptions(workers=2))
    assert "one whole-model stage (model_type 'gpt2' has no pipelined stage runner)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and rows[1].split("|")[5].strip() == "-"  # worker 1 holds no calibration stage


# ------------------------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def pool():
    ray = pytest.importorskip("ray")
    from aim_ray.driver import ClusterOptions, WorkerPool

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    made = WorkerPool(ClusterOptions(workers=2, cpus_per_worker=0.5, gpus_per_worker=0, ready_timeout_s=60))
    yield made
    made.close()
    ray.shutdown()


@pytest.mark.parametrize("family", ["gpt2", "llava"])
def test_distributed_is_byte_identical(families, family, pool, tmp_path):
    from aim_ray.driver import distributed_merge, shard_assignment

    base, experts = families[family]
    job = prepare(load_merge_config(ties_config(tmp_path, base, experts)), shard_size=6_000)
    assert all(len(run) for run in shard_assignment(job, 2))  # both workers write shards
    single = run_merge(job, tmp_path / "single", progress=False)
    dist = distributed_merge(job, tmp_path / "dist", pool.options, pool=pool, progress=False)
    files = sorted(p.name for p in single.glob("*.safetensors"))
    assert files == sorted(p.name for p in dist.glob("*.safetensors")) and len(files) > 2
    for f in files:
        assert (single / f).read_bytes() == (dist / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------- MergeKit


def mergekit_merge(cfg: Path, out: Path) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(cfg.read_text()))
    mk_run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return read_all(out)


@pytest.mark.parametrize("family", ["gpt2", "mistral3"])
def test_mergekit_differential(families, family, tmp_path):
    """gpt2 and Mistral3ForConditionalGeneration (LLaVA-style names) are MergeKit architectures: same tensor
    names, dtypes, shapes, values within 1e-6."""
    pytest.importorskip("mergekit")
    base, experts = families[family]
    cfg = ties_config(tmp_path, base, experts, dtype="float32")
    ours = read_all(run_merge(prepare(load_merge_config(cfg)), tmp_path / "ours", progress=False))
    theirs = mergekit_merge(cfg, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert theirs[name].dtype == t.dtype and theirs[name].shape == t.shape
        assert (theirs[name] - t).abs().max().item() <= 1e-6, name


def test_mergekit_differential_llava_tower(families, tmp_path):
    """MergeKit 0.1.5 has no LlavaForConditionalGeneration architecture; the one it infers (from transformers
    5's `model.`-prefixed module names) writes only the vision tower and projector. Those agree within 1e-6."""
    pytest.importorskip("mergekit")
    base, experts = families["llava"]
    cfg = ties_config(tmp_path, base, experts, dtype="float32")
    ours = read_all(run_merge(prepare(load_merge_config(cfg)), tmp_path / "ours", progress=False))
    theirs = {k.removeprefix("model."): v for k, v in mergekit_merge(cfg, tmp_path / "mk").items()}
    assert theirs and set(theirs) == {n for n in ours if n.startswith(("vision_tower.", "multi_modal_projector."))}
    for name, t in theirs.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6, name


# --------------------------------------------------------------------------------------------------- AIM


def _blocks(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def hooked_scales(model_dir: Path, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent oracle: forward hooks on the transformers model, float64 sums of |input| per channel."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sums, counts = {}, {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter) and not isinstance(module, nn.Embedding):
            def hook(mod, inputs, output, name=name):
                x = inputs[0].double().abs().reshape(-1, inputs[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            module.register_forward_hook(hook)
    with torch.no_grad():
        for block in blocks:
            model(block[None])
    return {name: (sums[name] / counts[name]).float() for name in sums}


@pytest.mark.parametrize("family", ["gpt2", "granite", "phi3"])
def test_one_stage_calibration_for_families_without_a_stage_runner(families, family):
    base = families[family][0]
    blocks = _blocks()
    with pytest.warns(UserWarning, match=f"model_type '{family}' has no pipelined stage runner .* the full "
                                         f"model is hooked in one stage"):
        got = collect_activation_scales(base, blocks, layer_ranges=[(0, 1), (1, 3)], micro_batch=2)
    ckpt = Checkpoint.open(base)
    assert {k: tuple(v.shape) for k, v in got.items()} == expected_shapes(ckpt, "activation")
    ref = hooked_scales(base, blocks)
    assert set(got) <= set(ref)
    for key, value in got.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-7)
    if family == "gpt2":  # Conv1D [in, out]: one scale per row
        w = ckpt.info("transformer.h.0.mlp.c_fc.weight").shape
        assert got["transformer.h.0.mlp.c_fc"].shape == (w[0],) and w[0] != w[1]
    with pytest.warns(UserWarning, match="no pipelined stage runner"):
        sens = collect_sensitivity_scales(base, blocks[:2])
    assert {k: tuple(v.shape) for k, v in sens.items()} == expected_shapes(ckpt, "sensitivity")


def test_calibration_refuses_a_multimodal_model_in_one_line(families):
    """LLaVA is no causal LM for transformers (its AIM needs scales from another source): one short line."""
    with pytest.raises(CalibrationError, match=r"transformers cannot build a causal LM of model_type 'llava' "
                                               r"\(ValueError: Unrecognized configuration class") as info:
        StageRunner(families["llava"][0], 0, 3)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_calibration_refuses_fused_modules(families):
    """transformers renames and fuses Mixtral's MoE weights (block_sparse_moe.experts.N.w1 -> mlp.experts.*): no
    per-checkpoint-tensor scales, a clear refusal."""
    with pytest.raises(CalibrationError, match=r"parameter 'model\.layers\.0\.mlp\..*' of the "
                                               r"transformers MixtralForCausalLM is not a tensor of the checkpoint"):
        StageRunner(families["mixtral"][0], 0, 3)


def whole_model_scales(base: Path, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fallback path (the transformers forward, hooked) on a pipelined family."""
    runner = StageRunner(base, 0, 3, whole=True)
    runner.start_recording()
    for start in range(0, blocks.shape[0], 2):
        runner.forward(blocks[start:start + 2])
    return runner.stop_recording()


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text"])
def test_pipelined_stages_are_bit_identical_to_the_full_model(families, family):
    base = families[family][0]
    blocks = _blocks()
    one = collect_activation_scales(base, blocks, micro_batch=2)
    staged = collect_activation_scales(base, blocks, layer_ranges=[(0, 1), (1, 2), (2, 3)], micro_batch=2)
    full = whole_model_scales(base, blocks)
    assert set(one) == set(staged) == set(full) == set(expected_shapes(Checkpoint.open(base), "activation"))
    for key in one:
        assert torch.equal(one[key], staged[key]) and torch.equal(one[key], full[key]), key
    ref = hooked_scales(base, blocks)
    for key in one:
        torch.testing.assert_close(one[key], ref[key], rtol=1e-5, atol=1e-7)
    s_one = collect_sensitivity_scales(base, blocks[:2])
    s_staged = collect_sensitivity_scales(base, blocks[:2], layer_ranges=[(0, 2), (2, 3)])
    whole = SensitivityStage(StageRunner(base, 0, 3, whole=True))
    for block in blocks[:2]:
        whole.last(block[None])
    s_full = whole.scales()
    assert set(s_one) == set(s_staged) == set(s_full)
    for key in s_one:
        assert torch.equal(s_one[key], s_staged[key]) and torch.equal(s_one[key], s_full[key]), key


def test_pool_calibrates_in_one_stage_like_single_process(families, pool):
    from aim_ray.driver import calibration_ranges

    base, experts = families["gpt2"]
    job = prepare(load_merge_config(ties_config(Path(base).parent, base, experts, "pool.yaml")))
    blocks = _blocks()
    with pytest.warns(UserWarning, match="model_type 'gpt2' has no pipelined stage runner .* on one worker"):
        ranges = calibration_ranges(job, 2)
    assert len(ranges) == 1 and ranges[0].has_embed and ranges[0].has_head and len(ranges[0].layers) == 3
    got = pool.calibrate(str(base), ranges, blocks, micro_batch=2, dtype="float32", device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count (their bundle's CPUs): float32 sums depend on the split
    try:
        with pytest.warns(UserWarning):
            local = collect_activation_scales(base, blocks, micro_batch=2)
        assert set(got) == set(local) and all(torch.equal(got[k], local[k]) for k in local)
        got = pool.calibrate(str(base), ranges, blocks[:2], micro_batch=2, dtype="float32", device="cpu",
                             kind="sensitivity")
        with pytest.warns(UserWarning):
            local = collect_sensitivity_scales(base, blocks[:2])
        assert set(got) == set(local) and all(torch.equal(got[k], local[k]) for k in local)
    finally:
        torch.set_num_threads(threads)


def test_gpt2_aim_merge_on_the_pool_is_byte_identical(families, pool, tmp_path, monkeypatch):
    """Calibration (one stage on one worker) + Conv1D relaxation on the pool == the single-process merge."""
    import json

    from aim_ray.driver import distributed_merge, pool_aim
    from aim_ray.relaxer import aim_for_job

    base, experts = families["gpt2"]
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"the quick fox {i} jumps"}) + "\n" for i in range(40)))
    calibration = {"dataset": str(texts), "n_samples": 40, "block_size": 32, "n_blocks": 6, "device": "cpu",
                   "dtype": "float32"}
    cfg = ties_config(tmp_path, base, experts, aim={"omega": 0.4, "calibration": calibration})
    job = prepare(load_merge_config(cfg), shard_size=6_000)
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache_dist"))  # each path calibrates for itself
    with pytest.warns(UserWarning, match="model_type 'gpt2' has no pipelined stage runner"):
        dist = distributed_merge(job, tmp_path / "dist", pool.options, pool=pool, aim=pool_aim(job), progress=False)
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache_single"))
    job = prepare(load_merge_config(cfg), shard_size=6_000)
    with pytest.warns(UserWarning, match="model_type 'gpt2' has no pipelined stage runner"):
        relax, metadata, _ = aim_for_job(job)
    single = run_merge(job, tmp_path / "single", relax=relax, metadata=metadata, progress=False)
    files = sorted(p.name for p in single.glob("*.safetensors"))
    assert len(files) > 2 and files == sorted(p.name for p in dist.glob("*.safetensors"))
    for f in files:
        assert (single / f).read_bytes() == (dist / f).read_bytes(), f
    plain = read_all(run_merge(prepare(load_merge_config(ties_config(tmp_path, base, experts, "p.yaml"))),
                               tmp_path / "plain", progress=False))
    relaxed = read_all(single)
    assert not torch.equal(relaxed["transformer.h.0.attn.c_attn.weight"], plain["transformer.h.0.attn.c_attn.weight"])


def test_gpt2_aim_relaxes_conv1d_rows(families, tmp_path):
    base, experts = families["gpt2"]
    ckpt = Checkpoint.open(base)
    shapes = expected_shapes(ckpt, "activation")
    gen = torch.Generator().manual_seed(3)
    scales = Scales(tensors={k: torch.rand(s, generator=gen) for k, s in shapes.items()}, kind="activation",
                    base_model=str(base), content_hash=ckpt.content_hash(), dataset="x", n_samples=1, block_size=1,
                    n_blocks=1, dtype="float32")
    scales.save(tmp_path / "scales.safetensors")
    omega = 0.3
    cfg = ties_config(tmp_path, base, experts, aim={"omega": omega, "scales": str(tmp_path / "scales.safetensors")})
    job = prepare(load_merge_config(cfg))
    relax, metadata, _ = aim_for_job(job)
    out = read_all(run_merge(job, tmp_path / "aim", relax=relax, metadata=metadata, progress=False))
    plain = read_all(run_merge(prepare(load_merge_config(ties_config(tmp_path, base, experts, "p.yaml"))),
                               tmp_path / "plain", progress=False))
    theta = load_file(base / "model.safetensors")
    name = "transformer.h.1.attn.c_proj.weight"  # square [in, out]: the wrong axis would pass a shape check
    assert out[name].shape[0] == out[name].shape[1]
    factor = relaxation_factor(scales["transformer.h.1.attn.c_proj"], omega)
    expected = theta[name] + factor[:, None] * (plain[name] - theta[name])
    torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
    wrong = theta[name] + factor[None, :] * (plain[name] - theta[name])
    assert not torch.allclose(out[name], wrong, atol=1e-4)
    fc = "transformer.h.0.mlp.c_fc.weight"  # [32, 128]: per row too
    f = relaxation_factor(scales["transformer.h.0.mlp.c_fc"], omega)
    torch.testing.assert_close(out[fc], theta[fc] + f[:, None] * (plain[fc] - theta[fc]), rtol=0, atol=1e-6)
    for emb in ("transformer.wte.weight", "transformer.wpe.weight"):  # wte is tied: relaxed as the head
        assert math.isclose(float((out[emb] - plain[emb]).abs().max()), 0.0) == (emb == "transformer.wpe.weight")
    with safe_open(next((tmp_path / "aim").glob("*.safetensors")), "pt") as f:
        assert f.metadata()["aim_omega"] == repr(omega)


def test_conv1d_scales_on_the_wrong_axis_are_refused():
    from aim_ray.aim import factor_for
    from aim_ray.errors import ScalesError

    with pytest.raises(ScalesError, match=r"c_fc.weight: scales of shape \(128,\) fit neither the tensor's shape "
                                          r"\(32, 128\) nor its input dimension 0 \(Conv1D layout \[in, out\]\)"):
        factor_for("transformer.h.0.mlp.c_fc.weight", (32, 128), torch.rand(128), 0.5, axis=0)
    rows = factor_for("transformer.h.0.mlp.c_fc.weight", (32, 128), torch.rand(32), 0.5, axis=0)
    assert rows.shape == (32, 128) and torch.equal(rows, rows[:, :1].expand(32, 128))
