"""AIM relaxation (eq. 4) on every tensor of tiny real models, against the formula written out here."""

from __future__ import annotations

import pytest
import torch

from aim_ray.aim import normalize, relax, scale_for, validate_omega
from aim_ray.calibration import collect_activation_scales, collect_sensitivity_scales
from aim_ray.checkpoint import Checkpoint
from aim_ray.errors import ConfigError, ScalesError
from aim_ray.scales import has_tied_embeddings
from aim_ray.worlds.tiny import build_tiny_family

CASES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2"),
    "mistral": dict(family="mistral"),
    "llama_tied": dict(family="llama", tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("aim_models")
    out = {}
    for name, kw in CASES.items():
        base, experts = build_tiny_family(root / name, n_experts=1, num_layers=2, **kw)
        blocks = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
        scales = collect_activation_scales(base, blocks)
        out[name] = (Checkpoint.open(base), Checkpoint.open(experts[0]), scales)
    return out


def expected(name, theta, delta, scales, omega, tied):
    """Eq. 4 written out: theta + (1 - A * (1 - omega)) * delta, A = s / max(s) over input channels."""
    is_embed = "embed_tokens" in name
    if name.endswith(".bias") or (is_embed and not tied):
        return theta + delta
    s = scales["lm_head" if is_embed else name.removesuffix(".weight")]
    factor = 1.0 - (s / s.max()) * (1.0 - omega)
    return theta + (factor[None, :] if theta.dim() == 2 else factor) * delta


def _tensors(base, expert):
    for name in base.names():
        theta = base.read(name).float()
        yield name, theta, expert.read(name).float() - theta


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("omega", [0.0, 0.4, 1.0])
def test_relax_equals_formula_on_every_tensor(families, case, omega):
    base, expert, scales = families[case]
    tied = has_tied_embeddings(base)
    assert tied == (case == "llama_tied")
    relaxed = 0
    for name, theta, delta in _tensors(base, expert):
        choice = scale_for(name, scales, tie_word_embeddings=tied)
        got = relax(name, theta, delta, choice.scale, omega)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected(name, theta, delta, scales, omega, tied)), name
        relaxed += choice.scale is not None
    assert relaxed == len([n for n in base.names() if n.endswith(".weight") and (tied or "embed" not in n)])


@pytest.mark.parametrize("case", list(CASES))
def test_omega_one_is_the_plain_merge_bit_for_bit(families, case):
    base, expert, scales = families[case]
    for name, theta, delta in _tensors(base, expert):
        choice = scale_for(name, scales, tie_word_embeddings=has_tied_embeddings(base))
        assert torch.equal(relax(name, theta, delta, choice.scale, 1.0), theta + delta), name


@pytest.mark.parametrize("case", ["llama", "qwen2", "llama_tied"])
def test_omega_zero_reverts_the_most_salient_channel(families, case):
    base, expert, scales = families[case]
    tied = has_tied_embeddings(base)
    for name, theta, delta in _tensors(base, expert):
        choice = scale_for(name, scales, tie_word_embeddings=tied)
        if choice.scale is None:
            continue
        j = int(choice.scale.argmax())
        got = relax(name, theta, delta, choice.scale, 0.0)
        assert torch.equal(got[..., j], theta[..., j]), name  # column j of a Linear, element j of a norm
        others = torch.ones(theta.shape[-1], dtype=torch.bool)
        others[j] = False
        assert not torch.equal(got[..., others], theta[..., others]), name


def test_tied_embedding_uses_lm_head_scales_explicitly(families):
    base, _, scales = families["llama_tied"]
    assert "lm_head.weight" not in base.names() and "lm_head" in scales
    choice = scale_for("model.embed_tokens.weight", scales, tie_word_embeddings=True)
    assert choice.scale is scales["lm_head"] and choice.key == "lm_head"
    assert "tied embedding model.embed_tokens.weight" in choice.note and "lm_head" in choice.note
    untied = scale_for("model.embed_tokens.weight", families["llama"][2], tie_word_embeddings=False)
    assert untied == (None, None, None)
    q = scale_for("model.layers.0.self_attn.q_proj.weight", scales)
    assert q.key == "model.layers.0.self_attn.q_proj" and q.note is None


def test_shared_inputs_share_scales(families):
    for _, _, scales in families.values():
        for i in range(2):
            p = f"model.layers.{i}."
            assert torch.equal(scales[p + "self_attn.q_proj"], scales[p + "self_attn.k_proj"])
            assert torch.equal(scales[p + "self_attn.k_proj"], scales[p + "self_attn.v_proj"])
            assert torch.equal(scales[p + "mlp.gate_proj"], scales[p + "mlp.up_proj"])


def test_sensitivity_is_elementwise(families):
    base, expert, _ = families["qwen2"]
    blocks = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    sens = collect_sensitivity_scales(base.path, blocks)
    name = "model.layers.1.mlp.down_proj.weight"
    theta = base.read(name).float()
    delta = expert.read(name).float() - theta
    choice = scale_for(name, sens, kind="sensitivity")
    assert choice.key == name and choice.scale.shape == theta.shape
    g = sens[name]
    want = theta + (1.0 - g / g.max() * 0.6) * delta
    assert torch.equal(relax(name, theta, delta, choice.scale, 0.4), want)
    assert scale_for("model.layers.0.self_attn.q_proj.bias", sens, kind="sensitivity").scale is None


def test_dead_module_and_inputs_untouched():
    theta, delta = torch.randn(3, 4), torch.randn(3, 4)
    theta_copy, delta_copy = theta.clone(), delta.clone()
    assert torch.equal(normalize(torch.zeros(4)), torch.zeros(4))
    assert torch.equal(relax("x.weight", theta, delta, torch.zeros(4), 0.0), theta + delta)
    relax("x.weight", theta, delta, torch.rand(4), 0.3)
    assert torch.equal(theta, theta_copy) and torch.equal(delta, delta_copy)
    bf16 = relax("x.weight", theta.bfloat16(), delta.bfloat16(), torch.rand(4), 1.0)
    assert bf16.dtype == torch.float32
    assert torch.equal(bf16, theta.bfloat16().float() + delta.bfloat16().float())


def test_errors():
    for bad in (-0.1, 1.5, float("nan"), True, "0.4"):
        with pytest.raises(ConfigError, match="omega"):
            validate_omega(bad)
    with pytest.raises(ConfigError, match="omega"):
        relax("x.weight", torch.zeros(2, 3), torch.zeros(2, 3), None, 2.0)
    with pytest.raises(ScalesError, match="x.weight: scales of shape \\(2,\\) fit neither"):
        relax("x.weight", torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), 0.5)
    with pytest.raises(ScalesError, match=r"no entry for module 'model.norm' \(needed by tensor 'model.norm"):
        scale_for("model.norm.weight", {}, kind="activation")
    with pytest.raises(ScalesError, match="base shape"):
        relax("x.weight", torch.zeros(2, 3), torch.zeros(3, 2), None, 0.5)
