"""Data-aware merges (regmean, fisher): the experts' statistics against independent whole-model computations,
the merges against their papers' formulas recomputed in float64, the Ray pipeline against one process, and
the bad-input rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aim_ray.calibration import load_calibration_blocks, load_tokenizer
from aim_ray.config import MergeConfig, parse_config
from aim_ray.errors import AimRayError, StatisticsError
from aim_ray.scales import open_checkpoint
from aim_ray.service import merge_from_config
from aim_ray.statistics import ModelStatistics, collect_statistics, finish_fisher
from aim_ray.worlds.tiny import build_tiny_family, write_expert_data

BLOCK = 64
WORDS = "alpha beta gamma delta the quick brown fox jumps over lazy dog key value recall answer".split()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """A float32 tiny Llama (3 layers, untied) with 2 experts, each with its own small text file."""
    root = tmp_path_factory.mktemp("data_aware")
    base, experts = build_tiny_family(root, "llama", n_experts=2, seed=7, num_layers=3)
    data = write_expert_data(root, 2, lines=120)
    return base, experts, data


def _data(path: Path, n_samples: int = 48) -> dict:
    return {"dataset": str(path), "n_samples": n_samples, "block_size": BLOCK, "micro_batch": 2}


def _config(method: str, family, params: dict | None = None, **top) -> MergeConfig:
    base, experts, data = family
    raw = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "data": _data(d), "parameters": {"weight": w}}
                      for e, d, w in zip(experts, data, (1.0, 0.5), strict=True)],
           "parameters": params or {}, "dtype": "float32", **top}
    return parse_config(MergeConfig, raw, "test")


def _blocks(model: Path, data: Path) -> torch.Tensor:
    return load_calibration_blocks(load_tokenizer(model), str(data), 48, BLOCK)


def _hf(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ statistics


def test_gram_equals_hooked_whole_model(family):
    base, experts, data = family
    blocks = _blocks(experts[0], data[0])
    tensors, aliases = collect_statistics(experts[0], blocks, "gram", micro_batch=2)
    model = _hf(experts[0])
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, m in linears.items():
        m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(blocks)
    assert set(aliases) == {f"model.layers.{i}.{m}" for i in range(3)
                            for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert all(c.endswith(("q_proj", "gate_proj")) for c in aliases.values())
    assert set(tensors) == set(linears) - set(aliases)
    for name in linears:
        mine = tensors[aliases.get(name, name)].double()
        ref = sums[name] / counts[name]
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), name


def test_fisher_equals_autograd_on_whole_model(family):
    base, experts, data = family
    blocks = _blocks(experts[1], data[1])[:6]
    tensors, _ = collect_statistics(experts[1], blocks, "fisher", layer_ranges=[(0, 1), (1, 3)])
    model = _hf(experts[1])
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for block in blocks:
        loss = model(block.unsqueeze(0), labels=block.unsqueeze(0)).loss  # HF shifts: mean over T - 1 tokens
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads, strict=True):
            ref[n] += g.double() ** 2
    assert set(tensors) == set(params)
    for n in params:
        expected = ref[n] / blocks.shape[0]
        assert torch.allclose(tensors[n].double(), expected, rtol=1e-4, atol=1e-6 * float(expected.max())), n


def test_tied_fisher_adds_the_head_to_the_embedding(tmp_path):
    base, experts = build_tiny_family(tmp_path, "qwen2", n_experts=1, seed=3, tie_word_embeddings=True)
    sums = {"model.embed_tokens.weight": torch.ones(2), "lm_head.weight": torch.full((2,), 3.0)}
    ckpt = open_checkpoint(experts[0])
    assert "lm_head.weight" not in ckpt.names()
    fisher = finish_fisher(ckpt, sums, 2)
    assert list(fisher) == ["model.embed_tokens.weight"]
    assert fisher["model.embed_tokens.weight"].tolist() == [2.0, 2.0]


# -------------------------------------------------------------------------------------------- merges


def _stats(kind: str) -> dict[str, ModelStatistics]:
    """The cached artifacts of `kind`, by model (the session's cache: each test's data is distinct)."""
    cache = Path(os.environ["AIM_RAY_CACHE"]) / "statistics"
    return {s.model: s for s in map(ModelStatistics.load, cache.glob("*.safetensors")) if s.kind == kind}


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model / "model.safetensors"))


@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_regmean_equals_its_formula(family, tmp_path, alpha):
    base, experts, _ = family
    out = merge_from_config(_config("regmean", family, {"alpha": alpha}), tmp_path / "out", progress=False)
    stats = _stats("gram")
    merged = _weights(out)
    thetas = [_weights(e) for e in experts]
    weights = (1.0, 0.5)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["statistics"]["kind"] == "gram"
    checked = 0
    for name, t in merged.items():
        module = name.removesuffix(".weight")
        grams = []
        for e in experts:
            s = stats[str(e)]
            g = s.tensors.get(s.aliases.get(module, module)) if name.endswith(".weight") else None
            grams.append(g)
        if any(g is None for g in grams) or t.dim() != 2:
            expected = sum(w * th[name].double() for w, th in zip(weights, thetas, strict=True)) / sum(weights)
        else:
            gs = [w * (alpha * g.double().numpy() + (1 - alpha) * np.diag(np.diag(g.double().numpy())))
                  for w, g in zip(weights, grams, strict=True)]
            num = sum(th[name].double().numpy() @ g for th, g in zip(thetas, gs, strict=True))
            expected = torch.from_numpy(num @ np.linalg.inv(sum(gs)))
            checked += 1
        assert torch.allclose(t.double(), expected, rtol=1e-5, atol=1e-5), name
    assert checked == 3 * 7 + 1  # every Linear of 3 layers and the head


def test_fisher_merge_equals_its_formula(family, tmp_path):
    base, experts, _ = family
    eps = 1e-6
    out = merge_from_config(_config("fisher", family, {"epsilon": eps}), tmp_path / "out", progress=False)
    stats = _stats("fisher")
    merged = _weights(out)
    thetas = [_weights(e) for e in experts]
    fishers = [stats[str(e)] for e in experts]
    norms = [np.sqrt(sum(float((t.double() ** 2).sum()) for t in f.tensors.values())) for f in fishers]
    for name, t in merged.items():
        fs = [w * np.maximum(f.tensors[name].double().numpy() / n, eps)
              for w, f, n in zip((1.0, 0.5), fishers, norms, strict=True)]
        expected = sum(f * th[name].double().numpy() for f, th in zip(fs, thetas, strict=True)) / sum(fs)
        assert np.allclose(t.double().numpy(), expected, rtol=1e-5, atol=1e-6), name


def test_regmean_singular_gram_is_refused():
    from aim_ray.methods import get_method, resolve_params

    class Inputs:
        name = "model.layers.0.mlp.down_proj.weight"
        n_experts = 2

        def base(self):
            return torch.zeros(3, 4)

        def expert(self, i):
            return torch.ones(3, 4)

        def statistic(self, i):
            g = torch.eye(4)
            g[2, 2] = 0.0  # channel 2 never active in any expert's data
            return g

    method = get_method("regmean")
    params = resolve_params(method, [{}, {}], {"alpha": 1.0})
    with pytest.raises(StatisticsError, match="down_proj.weight.*singular"):
        method.fn(Inputs(), params)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_data_is_refused_before_writing(family, tmp_path):
    base, experts, data = family
    out = tmp_path / "out"
    raw = _config("regmean", family).model_dump(mode="json")
    no_data = {**raw, "models": [{**raw["models"][0], "data": None}, raw["models"][1]]}
    with pytest.raises(AimRayError, match=r"regmean needs data: models entry .*expert_0"):
        merge_from_config(parse_config(MergeConfig, no_data, "t"), out, progress=False)
    missing = {**raw, "models": [{**raw["models"][0], "data": str(tmp_path / "nope.jsonl")}, raw["models"][1]]}
    with pytest.raises(AimRayError, match=r"expert_0.*data file .*nope.jsonl not found"):
        merge_from_config(parse_config(MergeConfig, missing, "t"), out, progress=False)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "alpha beta"}) + "\n")
    too_short = {**raw, "models": [{**raw["models"][0], "data": {**_data(short)}}, raw["models"][1]]}
    with pytest.raises(AimRayError, match=r"expert_0.*fewer than one block"):
        merge_from_config(parse_config(MergeConfig, too_short, "t"), out, progress=False)
    assert not out.exists()


def test_mergebench_demo_gives_each_expert_its_training_data(tmp_path):
    from dataclasses import replace

    from aim_ray.demo import SETUPS, demo_config, run_demo
    from aim_ray.worlds import World

    experts = {s: tmp_path / s for s in ("math", "code")}
    world = World("w", tmp_path, tmp_path / "base", experts, tmp_path / "tasks", ["t_math", "t_code", "t_gen"],
                  {"t_math": "math", "t_code": "code"}, "t_gen", tmp_path / "calib.jsonl", "real",
                  training_data={s: tmp_path / f"{s}.jsonl" for s in experts})
    cfg = demo_config(world, SETUPS["mergebench"])
    assert set(cfg.methods) == {"task_arithmetic", "ties", "localize_stitch", "localize_stitch_trained", "regmean",
                                "fisher", "tsv", "iso_c"}
    assert 1.0 in cfg.omegas and min(cfg.omegas) < 1.0  # with and without AIM
    assert [(m.model, m.data.dataset, m.data.n_blocks) for m in cfg.models] == [
        (str(experts[s]), str(tmp_path / f"{s}.jsonl"), 8) for s in ("math", "code")]
    assert all(m.data is None for m in demo_config(replace(world, training_data={})).models)  # the paper suite
    with pytest.raises(AimRayError, match="--suite mergebench runs on the real world"):
        run_demo(tmp_path / "out", world="tiny", suite="mergebench")
