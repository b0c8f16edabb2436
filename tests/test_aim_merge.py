"""Merge + AIM in one pass, `aim-ray calibrate` and `aim-ray relax`: exact formulas and clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from aim_ray.checkpoint import Checkpoint, read_safetensors_header
from aim_ray.cli import main
from aim_ray.scales import Scales

CAL = ["--n-samples", "64", "--block-size", "16"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def state(path):
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.fixture(scope="module")
def calib_data(tmp_path_factory):
    rng = random.Random(0)
    words = "the quick brown fox merge experts add numbers reverse string key value recall answer".split()
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 9)))}) + "\n"
                            for _ in range(200)))
    return path


@pytest.fixture(scope="module")
def llama_scales(llama_family, calib_data, tmp_path_factory):
    base, _ = llama_family
    out = tmp_path_factory.mktemp("scales") / "scales.safetensors"
    result = cli("calibrate", base, "--out", out, "--data", calib_data, *CAL)
    assert result.exit_code == 0, result.output
    return out


def aim_config(make_config, base, experts, omega, scales, method="ties"):
    return make_config(method, base, experts, [{"weight": 1.0, "density": 0.6}] * len(experts),
                       aim={"omega": omega, "scales": str(scales)})


def expected_relaxed(plain: dict, base: dict, scales: Scales, omega: float) -> dict:
    """Eq. 4 written out: column j of each Linear (element j of each norm) scaled by 1 - A_j (1 - omega)."""
    out = {}
    for name, merged in plain.items():
        theta, delta = base[name].float(), merged.float() - base[name].float()
        module = name.removesuffix(".weight")
        if "embed_tokens" in name or module not in scales:
            out[name] = merged
            continue
        s = scales[module].float()
        factor = 1 - (s / s.max()) * (1 - omega)
        out[name] = (theta + factor * delta).to(merged.dtype)
    return out


def test_one_pass_merge_plus_aim_equals_formula(llama_family, llama_scales, make_config, tmp_path):
    base, experts = llama_family
    plain_cfg = make_config("ties", base, experts, [{"weight": 1.0, "density": 0.6}] * 3, name="plain.yaml")
    assert cli("merge", plain_cfg, "--out", tmp_path / "plain", "--quiet").exit_code == 0
    out = tmp_path / "aim"
    result = cli("merge", aim_config(make_config, base, experts, 0.4, llama_scales), "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    got, want = state(out), expected_relaxed(state(tmp_path / "plain"), state(base), Scales.load(llama_scales), 0.4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-7, msg=name)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], state(tmp_path / "plain")[
        "model.layers.0.mlp.up_proj.weight"])
    header = read_safetensors_header(out / "model.safetensors")["__metadata__"]
    assert header["aim_omega"] == "0.4" and header["aim_kind"] == "activation"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["aim"]["omega"] == 0.4


def test_omega_one_is_the_plain_merge_bit_for_bit(llama_bf16_family, make_config, calib_data, tmp_path):
    base, experts = llama_bf16_family
    scales = tmp_path / "s.safetensors"
    assert cli("calibrate", base, "--out", scales, "--data", calib_data, *CAL).exit_code == 0
    plain_cfg = make_config("dare_ties", base, experts, [{"weight": 1.0, "density": 0.6}] * 3, name="p.yaml")
    assert cli("merge", plain_cfg, "--out", tmp_path / "plain", "--quiet").exit_code == 0
    cfg = aim_config(make_config, base, experts, 1.0, scales, method="dare_ties")
    assert cli("merge", cfg, "--out", tmp_path / "aim", "--quiet").exit_code == 0
    plain, aim = state(tmp_path / "plain"), state(tmp_path / "aim")
    assert all(torch.equal(plain[n], aim[n]) for n in plain)


def test_relax_any_merged_checkpoint_equals_one_pass(llama_family, llama_scales, make_config, tmp_path):
    base, experts = llama_family
    plain_cfg = make_config("ties", base, experts, [{"weight": 1.0, "density": 0.6}] * 3, name="plain.yaml")
    assert cli("merge", plain_cfg, "--out", tmp_path / "plain", "--quiet").exit_code == 0
    result = cli("relax", "--base", base, "--merged", tmp_path / "plain", "--scales", llama_scales, "--omega", 0.3,
                 "--out", tmp_path / "relaxed", "--quiet")
    assert result.exit_code == 0, result.output
    assert cli("merge", aim_config(make_config, base, experts, 0.3, llama_scales), "--out", tmp_path / "one",
               "--quiet").exit_code == 0
    two_pass, one_pass = state(tmp_path / "relaxed"), state(tmp_path / "one")
    # float32 model: merged - base round-trips through the stored merged weights, so allow ulp-level noise
    for name in one_pass:
        torch.testing.assert_close(two_pass[name], one_pass[name], rtol=0, atol=1e-6)


def test_merge_with_calibration_section_uses_the_cache(llama_family, calib_data, make_config, tmp_path):
    base, experts = llama_family
    cal = {"dataset": str(calib_data), "n_samples": 64, "block_size": 16}
    cfg = make_config("task_arithmetic", base, experts, aim={"omega": 0.5, "calibration": cal})
    assert cli("merge", cfg, "--out", tmp_path / "a", "--quiet").exit_code == 0
    assert cli("merge", cfg, "--out", tmp_path / "b", "--quiet").exit_code == 0
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_tied_embedding_relaxation_is_recorded(qwen_family, calib_data, make_config, tmp_path):
    base, experts = qwen_family
    scales = tmp_path / "s.safetensors"
    assert cli("calibrate", base, "--out", scales, "--data", calib_data, *CAL).exit_code == 0
    cfg = make_config("task_arithmetic", base, experts, aim={"omega": 0.0, "scales": str(scales)})
    out = tmp_path / "out"
    assert cli("merge", cfg, "--out", out, "--quiet").exit_code == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert any("tied embedding" in n for n in report["aim"]["notes"])
    assert "lm_head" in read_safetensors_header(out / "model.safetensors")["__metadata__"]["aim_note"]
    s = Scales.load(scales)["lm_head"]
    top = int(torch.argmax(s))
    emb = "model.embed_tokens.weight"
    # omega = 0 reverts the most salient column of the tied embedding to the base
    assert torch.equal(state(out)[emb][:, top], state(base)[emb][:, top])


def _store_lm_head_too(src, dst):
    """A copy of a tied checkpoint that also stores `lm_head.weight` (as some exporters do)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tied_checkpoint_storing_both_tensors_loads_relaxed(qwen_family, calib_data, make_config, tmp_path):
    """tie_word_embeddings with both tensors stored: transformers ties the head to the embedding on load, so
    the embedding must be relaxed (with the head's scales) exactly like the head, and the loaded model must
    carry the relaxed matrix."""
    from transformers import AutoModelForCausalLM

    base, experts = (_store_lm_head_too(p, tmp_path / p.name) for p in (qwen_family[0], qwen_family[1][0]))
    scales = tmp_path / "s.safetensors"
    assert cli("calibrate", base, "--out", scales, "--data", calib_data, *CAL).exit_code == 0
    cfg = make_config("task_arithmetic", base, [experts], aim={"omega": 0.0, "scales": str(scales)})
    out = tmp_path / "out"
    result = cli("merge", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    got, b, e = state(out), state(base), state(experts)
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    s = Scales.load(scales)["lm_head"].float()
    want = b[emb] + (1 - s / s.max()) * (e[emb] - b[emb])  # omega 0: factor 1 - A
    torch.testing.assert_close(got[emb], want, rtol=0, atol=2e-7)
    assert torch.equal(got[emb], got[head])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.get_output_embeddings().weight.detach(), got[emb])
    assert torch.equal(model.get_input_embeddings().weight.detach(), got[emb])


def test_aim_with_linear_and_no_base_is_refused(llama_family, make_config, tmp_path):
    _, experts = llama_family
    cfg = make_config("linear", None, experts, aim={"omega": 0.4})
    result = cli("merge", cfg, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "aim: merge_method 'linear' without base_model has no base to relax toward" in result.output
    assert not (tmp_path / "out").exists()


def test_bias_and_embedding_keep_the_merged_value(qwen_family, calib_data, make_config, tmp_path):
    base, experts = qwen_family
    plain = make_config("task_arithmetic", base, experts, name="p.yaml")
    cal = {"dataset": str(calib_data), "n_samples": 64, "block_size": 16}
    relaxed = make_config("task_arithmetic", base, experts, aim={"omega": 0.0, "calibration": cal})
    assert cli("merge", plain, "--out", tmp_path / "p", "--quiet").exit_code == 0
    assert cli("merge", relaxed, "--out", tmp_path / "r", "--quiet").exit_code == 0
    p, r = state(tmp_path / "p"), state(tmp_path / "r")
    biases = [n for n in p if n.endswith(".bias")]
    assert biases and all(torch.equal(p[n], r[n]) for n in biases)


# ------------------------------------------------------------------------------------------ bad inputs


def test_scales_for_another_base_need_force(llama_family, llama_scales, make_config, tmp_path):
    base, experts = llama_family
    other = tmp_path / "other.safetensors"
    s = Scales.load(llama_scales)  # same modules and shapes, but recorded for other weights
    s.content_hash = "0" * 64
    s.save(other)
    cfg = aim_config(make_config, base, experts, 0.4, other)
    result = cli("merge", cfg, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "content hash" in result.output, result.output
    assert not (tmp_path / "out").exists()
    forced = make_config("ties", base, experts, [{"weight": 1.0, "density": 0.6}] * 3, name="f.yaml",
                         aim={"omega": 0.4, "scales": str(other), "force": True})
    assert cli("merge", forced, "--out", tmp_path / "out", "--quiet").exit_code == 0


def test_scales_of_another_architecture_are_refused(llama_family, qwen_family, calib_data, make_config, tmp_path):
    base, experts = llama_family
    qs = tmp_path / "q.safetensors"
    assert cli("calibrate", qwen_family[0], "--out", qs, "--data", calib_data, *CAL).exit_code == 0
    cfg = aim_config(make_config, base, experts, 0.4, qs)
    result = cli("merge", cfg, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "scales" in result.output.lower(), result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("omega", [-0.1, 1.5])
def test_omega_out_of_range(llama_family, llama_scales, make_config, tmp_path, omega):
    base, experts = llama_family
    result = cli("merge", aim_config(make_config, base, experts, omega, llama_scales), "--out", tmp_path / "o")
    assert result.exit_code == 2 and "omega" in result.output
    result = cli("relax", "--base", base, "--merged", experts[0], "--scales", llama_scales, "--omega", omega,
                 "--out", tmp_path / "o")
    assert result.exit_code == 2 and "omega" in result.output
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_data(llama_family, tmp_path):
    base, _ = llama_family
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    result = cli("calibrate", base, "--out", tmp_path / "s.safetensors", "--data", tiny, "--block-size", "512")
    assert result.exit_code == 2 and "tokens" in result.output, result.output
    assert not (tmp_path / "s.safetensors").exists()


def test_calibrate_refuses_to_overwrite(llama_scales, llama_family, calib_data):
    result = cli("calibrate", llama_family[0], "--out", llama_scales, "--data", calib_data, *CAL)
    assert result.exit_code == 2 and "--overwrite" in result.output
