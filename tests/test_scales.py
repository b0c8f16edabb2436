"""The scales artifact: round trip, validation against a base, and the calibration cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from aim_ray import calibration
from aim_ray.calibration import cached_calibrate
from aim_ray.checkpoint import Checkpoint
from aim_ray.errors import ScalesError
from aim_ray.scales import Scales, cache_dir, cache_key, expected_shapes
from aim_ray.worlds.tiny import build_tiny_family


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scales_models")
    return {
        "llama": build_tiny_family(root / "llama", "llama", n_experts=1, num_layers=2)[0],
        "other_seed": build_tiny_family(root / "other", "llama", n_experts=0, num_layers=2, seed=7)[0],
        "qwen2": build_tiny_family(root / "qwen2", "qwen2", n_experts=0, num_layers=2)[0],
        "deeper": build_tiny_family(root / "deeper", "llama", n_experts=0, num_layers=3)[0],
        "tied": build_tiny_family(root / "tied", "llama", n_experts=0, num_layers=2,
                                  tie_word_embeddings=True)[0],
    }


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scales_data") / "calib.jsonl"
    words = "the quick brown fox jumps over the lazy dog key value".split()
    texts = [" ".join(words[i % 7: i % 7 + 3 + i % 5]) for i in range(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _scales_for(base, kind="activation") -> Scales:
    ckpt = Checkpoint.open(base)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.rand(shape, generator=gen) for k, shape in expected_shapes(ckpt, kind).items()}
    return Scales(tensors=tensors, kind=kind, base_model=str(base), content_hash=ckpt.content_hash(),
                  dataset="calib.jsonl", n_samples=16, block_size=32, n_blocks=4, dtype="float32",
                  n_tokens=128, extra={"split": "validation"})


@pytest.mark.parametrize("kind", ["activation", "sensitivity"])
def test_round_trip_with_metadata(models, tmp_path, kind):
    scales = _scales_for(models["llama"], kind)
    loaded = Scales.load(scales.save(tmp_path / "s.safetensors"))
    assert loaded.keys() == scales.keys()
    assert all(torch.equal(loaded[k], scales[k]) and loaded[k].dtype == torch.float32 for k in scales)
    fields = ("kind", "base_model", "content_hash", "dataset", "n_samples", "block_size", "n_blocks", "dtype",
              "n_tokens", "revision", "aim_ray_version", "extra")
    for field in fields:
        assert getattr(loaded, field) == getattr(scales, field), field
    assert loaded.metadata()["format"] == "aim-ray-scales/1"
    loaded.validate(models["llama"])


def test_expected_entries(models):
    act = expected_shapes(Checkpoint.open(models["llama"]), "activation")
    assert act["model.layers.0.self_attn.q_proj"] == (64,) and act["lm_head"] == (64,)
    assert act["model.layers.1.mlp.down_proj"] == (144,) and "model.embed_tokens" not in act
    sens = expected_shapes(Checkpoint.open(models["qwen2"]), "sensitivity")
    assert sens["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert not any(k.endswith(".bias") for k in sens)
    tied = expected_shapes(Checkpoint.open(models["tied"]), "activation")
    assert tied["lm_head"] == (64,)  # the tied head still needs its scales


def test_validation_errors(models):
    scales = _scales_for(models["llama"])
    bad = dict(scales.tensors)
    bad["model.layers.1.mlp.down_proj"] = torch.ones(64)
    with pytest.raises(ScalesError, match=r"'model.layers.1.mlp.down_proj' have shape \(64,\).*\(144,\)"):
        Scales(**{**scales.__dict__, "tensors": bad}).validate(models["llama"])
    missing = {k: v for k, v in scales.tensors.items() if k != "lm_head"}
    with pytest.raises(ScalesError, match="no entry for module 'lm_head'"):
        Scales(**{**scales.__dict__, "tensors": missing}).validate(models["llama"])
    extra = {**scales.tensors, "model.layers.9.mlp.up_proj": torch.ones(64)}
    with pytest.raises(ScalesError, match="'model.layers.9.mlp.up_proj', which .* does not have"):
        Scales(**{**scales.__dict__, "tensors": extra}).validate(models["llama"])
    with pytest.raises(ScalesError, match="content hash"):
        scales.validate(models["other_seed"])
    with pytest.warns(UserWarning, match="force=True"):
        scales.validate(models["other_seed"], force=True)
    with pytest.raises(ScalesError, match=r"no entry for parameter 'model.layers.2\.[a-z_.]*weight'"):
        _scales_for(models["llama"], "sensitivity").validate(models["deeper"], force=True)


def test_bad_artifacts(models, tmp_path):
    with pytest.raises(ScalesError, match="scales file not found"):
        Scales.load(tmp_path / "nope.safetensors")
    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ScalesError, match="not an aim-ray scales artifact"):
        Scales.load(tmp_path / "plain.safetensors")
    scales = _scales_for(models["llama"])
    for value in (float("nan"), -1.0):
        with pytest.raises(ScalesError, match="negative, NaN or infinite"):
            Scales(**{**scales.__dict__, "tensors": {"lm_head": torch.tensor([1.0, value])}})
    with pytest.raises(ScalesError, match="kind"):
        Scales(**{**scales.__dict__, "kind": "gradient"})


def test_cache_dir_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "scales"
    settings = {"dataset": "x", "n_samples": 1}
    key = cache_key("abc", settings, "activation")
    assert key == cache_key("abc", dict(reversed(settings.items())), "activation")
    assert len({key, cache_key("abd", settings, "activation"), cache_key("abc", settings, "sensitivity"),
                cache_key("abc", {**settings, "n_samples": 2}, "activation")}) == 4


def test_cached_calibrate_computes_once(models, data_file, monkeypatch):
    calls = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(dataset=str(data_file), n_samples=20, block_size=16, n_blocks=2)
    first = cached_calibrate(models["llama"], **kw)
    second = cached_calibrate(models["llama"], micro_batch=1, **kw)  # micro-batching is not in the key
    assert len(calls) == 1
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert len(list(cache_dir().glob("*.safetensors"))) == 1
    second.validate(models["llama"])
    cached_calibrate(models["llama"], **{**kw, "n_blocks": 1})
    cached_calibrate(models["llama"], kind="sensitivity", **kw)
    assert len(calls) == 3
    cached_calibrate(models["llama"], refresh=True, **kw)
    assert len(calls) == 4


def test_cache_key_is_the_compute_dtype_not_the_device(models, data_file, monkeypatch):
    """bfloat16 scales differ from float32 ones: their own key. float32 on cpu and cuda differ only by
    summation order, so they share one (the artifact records the device that computed it)."""
    calls = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: calls.append(k.get("dtype", a[8])) or real(*a, **k))
    ckpt = Checkpoint.open(models["llama"])
    kw = dict(dataset=str(data_file), n_samples=20, block_size=16, n_blocks=2, split="validation",
              kind="activation")
    paths = {dt: calibration.scales_cache_path(ckpt, kw["dataset"], 20, 16, 2, "validation", dt, "activation")
             for dt in ("float32", "bfloat16", "float16")}
    assert len(set(paths.values())) == 3
    assert paths["bfloat16"] == calibration.scales_cache_path(ckpt, kw["dataset"], 20, 16, 2, "validation",
                                                              torch.bfloat16, "activation")
    fp32 = cached_calibrate(models["llama"], dtype="float32", device="cpu", **kw)
    assert cached_calibrate(models["llama"], dtype="auto", device="auto", **kw).metadata() == fp32.metadata()
    bf16 = cached_calibrate(models["llama"], dtype="bf16", device="cpu", **kw)
    assert calls == ["float32", "bfloat16"]  # auto on this CPU machine resolved to the float32 key
    assert sorted(p.name for p in cache_dir().glob("*.safetensors")) == sorted(
        paths[d].name for d in ("float32", "bfloat16"))
    assert Scales.load(paths["bfloat16"]).metadata()["dtype"] == "bfloat16" == bf16.dtype
    assert fp32.metadata()["device"] == "cpu"


def test_older_artifacts_without_a_device_still_load(models, tmp_path):
    scales = _scales_for(models["llama"])
    assert scales.device is None and "device" not in scales.metadata()
    assert Scales.load(scales.save(tmp_path / "old.safetensors")).device is None
