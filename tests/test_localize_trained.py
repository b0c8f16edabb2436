"""Localize-and-Stitch with trained masks: the mask training against plain autograd on the whole transformers
model, the zero-epoch masks against the dataless variant, the stitch against its formula, 1 vs 2 Ray workers,
AIM on top, and the bad-input rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checks import assert_same_checkpoint
from safetensors.torch import load_file

from aim_ray.aim import relax, scale_for
from aim_ray.calibration import StageRunner, calibrate, load_calibration_blocks, load_tokenizer
from aim_ray.config import MergeConfig, parse_config
from aim_ray.errors import AimRayError
from aim_ray.localize import MaskStage, MaskTraining, localized_parameters, run_epoch
from aim_ray.scales import Scales, open_checkpoint
from aim_ray.service import merge_from_config
from aim_ray.statistics import ModelStatistics
from aim_ray.worlds.tiny import build_tiny_family, write_expert_data

BLOCK = 64
N_BLOCKS = 4
WORDS = "alpha beta gamma delta the quick brown fox jumps over lazy dog key value recall answer".split()
# Small enough logits and a large enough step that a few hundred of the ~137k entries flip in one epoch.
TRAINING = {"sigmoid_bias": 1.0, "lr": 2000.0, "l1_strength": 0.01, "epochs": 1}
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """A float32 tiny Llama (3 layers, untied) with 2 experts, each with its own small text file."""
    root = tmp_path_factory.mktemp("localize")
    base, experts = build_tiny_family(root, "llama", n_experts=2, seed=7, num_layers=3)
    data = write_expert_data(root, 2, lines=60)
    return base, experts, data


def _data(path: Path) -> dict:
    return {"dataset": str(path), "n_samples": 48, "block_size": BLOCK, "n_blocks": N_BLOCKS}


def _config(family, method: str = "localize_stitch_trained", params: dict | None = None,
            densities=(0.2, 0.3), **top) -> MergeConfig:
    base, experts, data = family
    raw = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "data": _data(d), "parameters": {"density": k}}
                      for e, d, k in zip(experts, data, densities, strict=True)],
           "parameters": {**TRAINING, **(params or {})} if method == "localize_stitch_trained" else {},
           "dtype": "float32", **top}
    return parse_config(MergeConfig, raw, "test")


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model / "model.safetensors"))


def _masks(family, cache: Path | None = None) -> list[ModelStatistics]:
    """The experts' mask artifacts trained with TRAINING (epochs 1), from the statistics cache."""
    base, experts, _ = family
    cache = cache or Path(os.environ["AIM_RAY_CACHE"]) / "statistics"
    found = {}
    for m in map(ModelStatistics.load, cache.glob("*.safetensors")):
        if m.kind == "mask" and {k: v for k, v in m.settings["training"].items() if k != "density"} == TRAINING:
            assert m.settings["base"] == open_checkpoint(base).content_hash()
            found[(m.model, m.settings["training"]["density"])] = m
    return [found[(str(e), density)] for e, density in zip(experts, (0.2, 0.3), strict=True)]


# ------------------------------------------------------------------------------------------ training


def _top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    top = torch.zeros(tau.numel(), dtype=torch.bool)
    top[torch.topk(tau.abs().flatten(), max(1, int(density * tau.numel()))).indices] = True
    return top.view(tau.shape)


def _reference_logits(base: Path, expert: Path, blocks: torch.Tensor, t: MaskTraining) -> dict[str, torch.Tensor]:
    """The paper's localization recomputed in float64 on the whole transformers model with plain autograd."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64).eval()
    params = {n: p for n, p in model.named_parameters() if "embed" not in n}
    pre, fine = _weights(base), _weights(expert)
    taus = {n: fine[n].double() - pre[n].double() for n in params}
    logits = {n: torch.where(_top_k(tau, t.density), t.sigmoid_bias, -t.sigmoid_bias).double()
              for n, tau in taus.items()}
    for _ in range(t.epochs):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(pre[n].double() + torch.sigmoid(logits[n]) * taus[n])
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for block in blocks:
            loss = model(block.unsqueeze(0), labels=block.unsqueeze(0)).loss  # mean over the T - 1 next tokens
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                grads[n] += g
        for n, s in logits.items():
            sig = torch.sigmoid(s)
            logits[n] = s - sig * (1 - sig) * (t.lr * grads[n] * taus[n] + t.l1_strength)
    return logits


def test_mask_training_equals_autograd_on_whole_model(family):
    base, experts, data = family
    blocks = load_calibration_blocks(load_tokenizer(base), str(data[0]), 48, BLOCK, 3)
    t = MaskTraining(0.2, **{**TRAINING, "epochs": 2})
    stages = [MaskStage(StageRunner(base, a, b), experts[0], t) for a, b in [(0, 1), (1, 3)]]
    start = {n: s.clone() for st in stages for n, s in st.logits.items()}
    for _ in range(t.epochs):
        run_epoch(stages, blocks)
    mine = {n: s for st in stages for n, s in st.logits.items()}
    masks = {n: m for st in stages for n, m in st.scales().items()}
    ref = _reference_logits(base, experts[0], blocks, t)
    assert set(mine) == set(ref) and EMBED not in mine and "lm_head.weight" in mine
    flipped = 0
    for n in ref:
        assert torch.allclose(mine[n].double(), ref[n], rtol=1e-5, atol=1e-5), n
        assert torch.equal(masks[n], torch.round(torch.sigmoid(ref[n])).bool()), n
        flipped += int((masks[n] != (start[n] > 0)).sum())
    assert 50 < flipped < 5000  # the training moved some entries across, not all


def test_tied_head_and_embedding_are_not_localized(tmp_path):
    base, _ = build_tiny_family(tmp_path, "qwen2", n_experts=1, seed=3, tie_word_embeddings=True)
    names = set(localized_parameters(StageRunner(base, 0, 2)))
    assert names and not any("embed" in n or "lm_head" in n for n in names)
    assert "model.norm.weight" in names and "model.layers.0.self_attn.q_proj.bias" in names


# -------------------------------------------------------------------------------------------- merges


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory) -> Path:
    return merge_from_config(_config(family), tmp_path_factory.mktemp("trained") / "out", progress=False)


def test_zero_epochs_is_the_dataless_merge(family, tmp_path):
    base = _weights(family[0])
    zero = _weights(merge_from_config(_config(family, params={"epochs": 0}), tmp_path / "zero", progress=False))
    dataless = _weights(merge_from_config(_config(family, "localize_stitch"), tmp_path / "dataless",
                                          progress=False))
    assert set(zero) == set(dataless)
    for name, t in zero.items():
        if name == EMBED:  # not localized: the base's, where the dataless variant stitches it too
            assert torch.equal(t, base[name]) and not torch.equal(dataless[name], base[name])
        else:
            assert torch.equal(t, dataless[name]), name


def test_stitch_equals_its_formula(family, trained):
    base_path, experts, _ = family
    masks = _masks(family)
    for m in masks:
        assert m.kind == "mask" and m.n_blocks == N_BLOCKS and m.settings["training"]["lr"] == TRAINING["lr"]
        assert all(t.dtype == torch.bool for t in m.tensors.values()) and EMBED not in m.tensors
    base, merged = _weights(base_path), _weights(trained)
    thetas = [_weights(e) for e in experts]
    report = json.loads((trained / "merge_report.json").read_text())
    assert report["statistics"]["kind"] == "mask"
    for name, t in merged.items():
        if name == EMBED:
            assert torch.equal(t, base[name])
            continue
        ms = [m.tensors[name].double() for m in masks]
        taus = [th[name].double() - base[name].double() for th in thetas]
        expected = base[name].double() + sum(m * tau for m, tau in zip(ms, taus, strict=True)) / sum(ms).clamp(min=1)
        assert torch.allclose(t.double(), expected, rtol=0, atol=1e-6), name
    # trained, not the top-k start
    for m, th, density in zip(masks, thetas, (0.2, 0.3), strict=True):
        start = {n: _top_k(th[n].double() - base[n].double(), density) for n in m.tensors}
        assert sum(int((m.tensors[n] != start[n]).sum()) for n in m.tensors) > 50


def test_two_ray_workers_give_the_same_bytes(family, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache"))  # the workers train the masks again
    out = merge_from_config(_config(family), tmp_path / "ray", workers=2, progress=False)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["service"]["workers"] == 2
    assert_same_checkpoint(trained, out)
    for mine, theirs in zip(_masks(family, tmp_path / "cache" / "statistics"), _masks(family), strict=True):
        assert mine.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(mine.tensors[n], theirs.tensors[n]) for n in mine.tensors)


def test_aim_relaxes_the_stitched_delta(family, trained, tmp_path):
    base_path, _, data = family
    scales = calibrate(base_path, str(data[0]), 48, BLOCK, N_BLOCKS, device="cpu", dtype="float32")
    path = scales.save(tmp_path / "scales.safetensors")
    out = merge_from_config(_config(family, aim={"omega": 0.5, "scales": str(path)}), tmp_path / "aim",
                            progress=False)
    base, plain, relaxed = _weights(base_path), _weights(trained), _weights(out)
    loaded = Scales.load(path)
    changed = 0
    for name, t in relaxed.items():
        choice = scale_for(name, loaded.tensors, kind="activation")
        expected = relax(name, base[name], plain[name] - base[name], choice.scale, 0.5)
        assert torch.allclose(t, expected, rtol=0, atol=1e-6), name
        changed += not torch.equal(t, plain[name])
    assert changed > 20


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_writing(family, tmp_path):
    out = tmp_path / "out"
    raw = _config(family).model_dump(mode="json")
    no_data = {**raw, "models": [{**raw["models"][0], "data": None}, raw["models"][1]]}
    with pytest.raises(AimRayError, match=r"localize_stitch_trained needs data: models entry .*expert_0"):
        merge_from_config(parse_config(MergeConfig, no_data, "t"), out, progress=False)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "alpha beta"}) + "\n")
    too_short = {**raw, "models": [{**raw["models"][0], "data": _data(short)}, raw["models"][1]]}
    with pytest.raises(AimRayError, match=r"expert_0.*fewer than one block") as e:
        merge_from_config(parse_config(MergeConfig, too_short, "t"), out, progress=False)
    assert "\n" not in str(e.value)
    filtered = {**raw, "parameters": {**raw["parameters"], "lr": [{"filter": "mlp", "value": 1.0}, {"value": 2.0}]}}
    with pytest.raises(AimRayError, match=r"localize_stitch_trained: density, sigmoid_bias, lr.*one value"):
        merge_from_config(parse_config(MergeConfig, filtered, "t"), out, progress=False)
    assert not out.exists()
