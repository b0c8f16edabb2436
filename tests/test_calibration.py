"""Calibration data, the pipeline stage runner and scale collection, against plainly written oracles."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from aim_ray import calibration
from aim_ray.calibration import (
    StageRunner,
    calibrate,
    collect_activation_scales,
    collect_sensitivity_scales,
    load_calibration_blocks,
    tokenize_blocks,
)
from aim_ray.checkpoint import Checkpoint
from aim_ray.errors import CalibrationError
from aim_ray.worlds.tiny import build_tiny_family

WORDS = "the quick brown fox jumps over lazy dog merge experts with activation informed key value".split()
FAMILIES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "mistral": dict(family="mistral", sliding_window=8),
    "llama_tied": dict(family="llama", tie_word_embeddings=True),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_models")
    return {name: build_tiny_family(root / name, n_experts=0, num_layers=4, **kw)[0]
            for name, kw in FAMILIES.items()}


@pytest.fixture(scope="session")
def tokenizer(bases):
    return AutoTokenizer.from_pretrained(str(bases["llama"]))


@pytest.fixture(scope="session")
def texts():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(60)]


def _blocks(n: int = 5, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------- data


def reference_blocks(texts, tok, n_samples, block_size, n_blocks=None):
    """The AWQ recipe written plainly: datasets' shuffle(seed=42) is numpy's default_rng(42) permutation."""
    samples = []
    for i in np.random.default_rng(42).permutation(len(texts)):
        line = texts[i].strip()
        ids = tok.encode(line)
        if not line or len(ids) > block_size:
            continue
        samples.append(ids)
        if len(samples) == n_samples:
            break
    cat = [t for s in samples for t in s]
    n = len(cat) // block_size
    blocks = torch.tensor(cat[: n * block_size]).view(n, block_size)
    return blocks[:n_blocks] if n_blocks else blocks


def _write_all_formats(texts, d):
    d.mkdir()
    rows = [json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(texts)]
    (d / "c.jsonl").write_text("".join(rows))
    (d / "c.json").write_text(json.dumps([{"text": t} for t in texts]))
    (d / "c.txt").write_text("".join(t + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), d / "c.parquet")
    (d / "hub").mkdir()  # laid out like the hub dataset repo: val.jsonl is the `validation` split
    (d / "hub" / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [d / "c.jsonl", d / "c.json", d / "c.txt", d / "c.parquet", d / "hub"]


def test_all_formats_give_the_reference_blocks(texts, tokenizer, tmp_path):
    expected = reference_blocks(texts, tokenizer, n_samples=20, block_size=32)
    assert expected.shape[0] >= 3
    for source in _write_all_formats(texts, tmp_path / "data"):
        got = load_calibration_blocks(tokenizer, str(source), n_samples=20, block_size=32)
        assert got.dtype == torch.long and torch.equal(got, expected), source


def test_n_blocks_cap_and_tokenizer_path(texts, tokenizer, bases, tmp_path):
    src = _write_all_formats(texts, tmp_path / "data")[0]
    full = load_calibration_blocks(tokenizer, str(src), n_samples=40, block_size=16)
    capped = load_calibration_blocks(bases["llama"], str(src), n_samples=40, block_size=16, n_blocks=2)
    assert torch.equal(capped, full[:2])
    assert torch.equal(full, reference_blocks(texts, tokenizer, 40, 16))


def test_skip_long_and_empty_texts_and_drop_remainder(tokenizer):
    short, other = "the fox", "lazy dog"
    long = " ".join(WORDS * 3)
    assert len(tokenizer.encode(long)) > 8
    texts = ["", "   ", long, short, "\n", other, short]
    got = tokenize_blocks(iter(texts), tokenizer, n_samples=2, block_size=8)
    ids = tokenizer.encode(short) + tokenizer.encode(other)  # n_samples counts kept texts only
    n = len(ids) // 8
    assert n >= 1 and torch.equal(got, torch.tensor(ids[: n * 8]).view(n, 8))


def test_too_few_tokens_error(tokenizer):
    n = len(tokenizer.encode("the fox"))
    with pytest.raises(CalibrationError, match=rf"found only {n} tokens in 1 usable texts.*block_size=512"):
        tokenize_blocks(iter(["the fox", ""]), tokenizer, n_samples=256, block_size=512)


def test_data_errors(tokenizer, tmp_path):
    bad = tmp_path / "c.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(CalibrationError, match="unsupported calibration file type '.csv'"):
        load_calibration_blocks(tokenizer, str(bad))
    with pytest.raises(CalibrationError, match="missing.jsonl: calibration file not found"):
        load_calibration_blocks(tokenizer, str(tmp_path / "missing.jsonl"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(CalibrationError, match="no 'text' field"):
        load_calibration_blocks(tokenizer, str(tmp_path / "c.jsonl"))
    with pytest.raises(CalibrationError, match="block_size must be a positive integer"):
        tokenize_blocks(iter(["a"]), tokenizer, block_size=0)


# ------------------------------------------------------------------------------------------------- stages


def _full(base, attn="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def _chain(base, ranges, **kw):
    runners = [StageRunner(base, a, b, is_first=k == 0, is_last=k == len(ranges) - 1, **kw)
               for k, (a, b) in enumerate(ranges)]

    def run(x):
        for r in runners:
            x = r.forward(x)
        return x

    return run


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stages_reproduce_full_model_logits(bases, name):
    ids = _blocks(3, 24)
    with torch.no_grad():
        ref = _full(bases[name])(ids).logits
    got = _chain(bases[name], [(0, 1), (1, 3), (3, 4)])(ids)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_eager_attention_and_embed_or_head_only_stages(bases):
    ids = _blocks(2, 24)
    with torch.no_grad():
        ref = _full(bases["llama"], "eager")(ids).logits
    got = _chain(bases["llama"], [(0, 0), (0, 2), (2, 4), (4, 4)], attn_implementation="eager")(ids)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_causal_mask(bases):
    run = _chain(bases["qwen2"], [(0, 2), (2, 4)])
    ids = _blocks(1, 24)
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 256
    a, b = run(ids), run(changed)
    assert torch.equal(a[0, :12], b[0, :12]) and not torch.allclose(a[0, 12:], b[0, 12:])


def test_stage_loads_only_its_weights(bases, monkeypatch):
    ckpt = Checkpoint.open(bases["llama"])
    reads = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, n: reads.append(n) or original(self, n))
    runner = StageRunner(ckpt, 1, 3)
    own = ("model.layers.1.", "model.layers.2.")
    assert sorted(reads) == sorted(n for n in ckpt.names() if n.startswith(own))
    assert not runner.is_first and not runner.is_last
    assert not any(p.is_meta for m in runner.modules.values() for p in m.parameters())
    with pytest.raises(CalibrationError, match="takes hidden states"):
        runner.forward(_blocks(1, 8))


def test_unsupported_model_and_bad_range(bases, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CalibrationError, match=r"model_type 'gpt2' has no pipelined stage runner; it calibrates "
                                               r"in one stage \(layers \[0, 2\)\)"):
        StageRunner(tmp_path / "gpt2", 0, 1)
    with pytest.raises(CalibrationError, match=r"stage layers \[3, 5\) are not a valid range of the 4"):
        StageRunner(bases["llama"], 3, 5)
    with pytest.raises(CalibrationError, match="contiguous"):
        collect_activation_scales(bases["llama"], _blocks(), layer_ranges=[(0, 2), (3, 4)])


# ------------------------------------------------------------------------------------------------- scales


def hooked_full_model_scales(base, blocks):
    """Independent oracle: forward hooks on the full HF model, float64 sums of |input| per channel."""
    model = _full(base)
    sums, counts, handles = {}, {}, []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and not isinstance(module, nn.Embedding):
            def hook(mod, inputs, output, name=name):
                x = inputs[0].double().abs().reshape(-1, inputs[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for block in blocks:
            model(block[None])
    return {name: (sums[name] / counts[name]).float() for name in sums}


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_tied"])
def test_activation_scales_match_hooked_full_model(bases, name):
    blocks = _blocks(5, 24)
    ref = hooked_full_model_scales(bases[name], blocks)
    whole = collect_activation_scales(bases[name], blocks, micro_batch=5)
    ranges = [(0, 1), (1, 3), (3, 4)]
    staged = collect_activation_scales(bases[name], blocks, layer_ranges=ranges, micro_batch=2)
    assert set(ref) == set(whole) == set(staged)
    assert "lm_head" in ref and "model.norm" in ref and "model.layers.3.post_attention_layernorm" in ref
    for key in ref:
        assert whole[key].dtype == torch.float32
        torch.testing.assert_close(whole[key], ref[key], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(staged[key], whole[key], rtol=1e-5, atol=1e-7)
    for i in range(4):
        p = f"model.layers.{i}."
        assert torch.equal(whole[p + "self_attn.q_proj"], whole[p + "self_attn.k_proj"])
        assert torch.equal(whole[p + "self_attn.q_proj"], whole[p + "self_attn.v_proj"])
        assert torch.equal(whole[p + "mlp.gate_proj"], whole[p + "mlp.up_proj"])


def direct_sensitivity(base, blocks, untie):
    model = _full(base)
    if untie:  # the tied tensor is relaxed as the head: its head-only gradient
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    params = {n: p for n, p in model.named_parameters() if n.endswith(".weight") and "embed_tokens" not in n}
    if untie:
        params["lm_head.weight"] = model.lm_head.weight
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for block in blocks:
        logits = model(block[None]).logits
        p = torch.softmax(logits, -1)
        entropy = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
        for n, g in zip(params, torch.autograd.grad(entropy, list(params.values())), strict=True):
            total[n] += g.abs()
    return total


@pytest.mark.parametrize("name", ["qwen2", "llama_tied"])
def test_sensitivity_matches_direct_autograd(bases, name):
    blocks = _blocks(3, 16)
    ref = direct_sensitivity(bases[name], blocks, untie=name == "llama_tied")
    got = collect_sensitivity_scales(bases[name], blocks)
    assert set(got) == set(ref) and "lm_head.weight" in got
    assert not any(k.endswith(".bias") for k in got)
    for key in ref:
        # What matters is A = G / max(G): compare relative to the tensor's max.
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5 * float(ref[key].max()))


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_tied"])
def test_staged_sensitivity_is_bit_identical(bases, name):
    """Stage k gets the gradient of its output, backpropagates through its own layers and hands back the
    gradient of its input: the same ops as the whole-model backward, so the very same bits (float32, CPU)."""
    blocks = _blocks(3, 16)
    whole = collect_sensitivity_scales(bases[name], blocks)
    for ranges in ([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)], [(0, 0), (0, 4), (4, 4)]):
        staged = collect_sensitivity_scales(bases[name], blocks, layer_ranges=ranges)
        assert set(staged) == set(whole)
        assert all(torch.equal(staged[k], whole[k]) for k in whole), ranges


def test_sensitivity_stage_misuse(bases):
    first = calibration.SensitivityStage(StageRunner(bases["llama"], 0, 2))
    with pytest.raises(CalibrationError, match="no forward kept for block 7"):
        first.backward(7, torch.zeros(1, 4, 64))
    with pytest.raises(CalibrationError, match="last\\(\\) is for the stage that owns lm_head"):
        first.last(_blocks(1))
    last = calibration.SensitivityStage(StageRunner(bases["llama"], 2, 4))
    with pytest.raises(CalibrationError, match="call last\\(\\)"):
        last.forward(0, torch.zeros(1, 4, 64))


def test_calibrate_end_to_end(bases, texts, tmp_path):
    src = _write_all_formats(texts, tmp_path / "data")[0]
    scales = calibrate(bases["llama"], str(src), n_samples=30, block_size=16, n_blocks=3, micro_batch=2)
    blocks = load_calibration_blocks(bases["llama"], str(src), n_samples=30, block_size=16, n_blocks=3)
    assert scales.kind == "activation" and scales.n_blocks == 3 and scales.n_tokens == 48
    assert scales.content_hash == Checkpoint.open(bases["llama"]).content_hash()
    scales.validate(bases["llama"])
    ref = hooked_full_model_scales(bases["llama"], blocks)
    for key in ref:
        torch.testing.assert_close(scales[key], ref[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(CalibrationError, match="aim.kind"):
        calibration.calibrate(bases["llama"], dataset=str(src), n_samples=30, block_size=16, kind="gradient")
