"""End-to-end merges through `aim-ray merge`: formulas, loadable outputs, validation before any write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from aim_ray.checkpoint import Checkpoint
from aim_ray.cli import main
from aim_ray.errors import IgnoredParameterWarning
from aim_ray.methods import REGISTRY, get_method, resolve_params
from aim_ray.methods.fused import torch_path
from aim_ray.worlds.tiny import build_model, save_model, tiny_config

try:
    from tests.inmemory import InMemoryInputs
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from inmemory import InMemoryInputs


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


def test_task_arithmetic_equals_formula_and_loads(llama_family, make_config, tmp_path):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [{"weight": w} for w in (0.5, 0.3, 0.2)],
                      parameters={"lambda": 0.9})
    out = tmp_path / "out"
    result = run_cli("merge", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    merged, b = state(out), state(base)
    es = [state(e) for e in experts]
    assert merged.keys() == b.keys()
    for name, theta in b.items():
        expected = theta + 0.9 * sum(w * (e[name] - theta) for w, e in zip((0.5, 0.3, 0.2), es))
        assert merged[name].dtype == theta.dtype and merged[name].shape == theta.shape
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert model(torch.tensor([[1, 5, 7]])).logits.shape[-1] == 256
    report = json.loads((out / "merge_report.json").read_text())
    assert report["shards"]["model.safetensors"] and report["versions"]["torch"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _params_for(method: str, n: int) -> tuple[list[dict], dict]:
    per = {"slerp": [{}], "model_stock": [{}] * n, "localize_stitch": [{}] * n,
           "consensus_ta": [{"weight": 1.0}] * n}.get(method, [{"weight": 1.0, "density": 0.7}] * n)
    if method in ("task_arithmetic", "linear", "widen", "consensus_ta"):
        per = [{"weight": 1.0}] * n if method != "widen" else [{}] * n
    if method in ("nuslerp", "multislerp"):
        per = [{"weight": 1.0 + 0.5 * i} for i in range(n)]
    if method in ("karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough", "tsv", "iso_c",
                  "iso_cts"):
        per = [{}] * n
    shared = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.01}, "sce": {"select_topk": 0.5}}.get(method, {})
    return per, shared


# Data-aware methods need each expert's data: end to end in tests/test_data_aware.py.
@pytest.mark.parametrize("method", sorted(m for m in REGISTRY if REGISTRY[m].statistics is None))
def test_every_method_writes_a_loadable_model(method, llama_bf16_family, make_config, tmp_path):
    base, experts = llama_bf16_family
    experts = experts[:REGISTRY[method].max_experts]  # slerp, nearswap, arcee_fusion: 1; nuslerp: 2
    per, shared = _params_for(method, len(experts))
    per = [dict(p) for p in per]
    cfg = make_config(method, None if method == "passthrough" else base, experts, per, parameters=shared)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ref = Checkpoint.open(base)
    got = Checkpoint.open(out)
    assert {n: (i.shape, i.dtype) for n, i in got.tensors.items()} == {
        n: (i.shape, i.dtype) for n, i in ref.tensors.items()}
    assert torch.isfinite(model.lm_head.weight).all()


def _method_on(method: str, name: str, base: torch.Tensor, experts: list[torch.Tensor], per: list[dict],
               shared: dict, has_base: bool = True) -> torch.Tensor:
    """The method on in-memory tensors: the merged float32 tensor."""
    m = get_method(method)
    inputs = InMemoryInputs(name, base, experts)
    return base + m.fn(inputs, resolve_params(m, per, shared, has_base=has_base))


def test_base_model_roles_follow_mergekit(llama_family, make_config, tmp_path):
    """karcher merges a configured base as one more model (appended, or where listed: once); nuslerp takes a
    listed base as the reference, not as an expert, and without base_model interpolates the weights."""
    base, experts = llama_family
    b, es = state(base), [state(e) for e in experts]
    runs = {
        "karcher": make_config("karcher", base, experts[:2], [{}, {}], name="k.yaml"),
        "karcher_listed": make_config("karcher", base, [experts[0], base, experts[1]], [{}] * 3, name="kl.yaml"),
        "nuslerp_listed": make_config("nuslerp", base, [base, *experts[:2]], [{"weight": 1.0}, {"weight": 0.4},
                                                                             {"weight": 0.8}], name="n.yaml"),
        "nuslerp_no_base": make_config("nuslerp", None, experts[:2], [{"weight": 0.4}, {"weight": 0.8}],
                                       name="nb.yaml"),
    }
    out = {}
    for label, cfg in runs.items():
        result = run_cli("merge", cfg, "--out", tmp_path / label, "--quiet")
        assert result.exit_code == 0, result.output
        out[label] = state(tmp_path / label)
    for name, theta in b.items():
        if not theta.is_floating_point():
            continue
        e0, e1 = es[0][name], es[1][name]
        karcher = _method_on("karcher", name, theta, [e0, e1, theta], [{}] * 3, {})
        assert torch.equal(out["karcher"][name], karcher), name
        listed = _method_on("karcher", name, theta, [e0, theta, e1], [{}] * 3, {})
        assert torch.equal(out["karcher_listed"][name], listed), name
        torch.testing.assert_close(listed, karcher, rtol=0, atol=1e-6)  # the same mean, in another order
        per = [{"weight": 0.4}, {"weight": 0.8}]
        assert torch.equal(out["nuslerp_listed"][name], _method_on("nuslerp", name, theta, [e0, e1], per, {})), name
        assert torch.equal(out["nuslerp_no_base"][name],
                           _method_on("nuslerp", name, e0, [e0, e1], per, {}, has_base=False)), name


def test_output_dtype_is_out_dtype_else_dtype_else_the_bases(llama_bf16_family, make_config, tmp_path):
    """MergeKit's rule on a bf16 base: nothing -> bf16; dtype: float32 -> float32; out_dtype wins over dtype.
    The values are the same float32 merge, cast."""
    base, experts = llama_bf16_family
    per = [{"weight": w, "density": 0.6} for w in (0.5, 0.3, 0.2)]
    cases = {"none": ({}, torch.bfloat16), "dtype": ({"dtype": "float32"}, torch.float32),
             "out_dtype": ({"dtype": "float32", "out_dtype": "float16"}, torch.float16)}
    written = {}
    for label, (top, expected) in cases.items():
        cfg = make_config("ties", base, experts, per, name=f"{label}.yaml", **top)
        out = tmp_path / label
        assert run_cli("merge", cfg, "--out", out, "--quiet").exit_code == 0
        written[label] = state(out)
        floats = {n: t.dtype for n, t in written[label].items() if t.is_floating_point()}
        assert floats and set(floats.values()) == {expected}, (label, set(floats.values()))
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(expected).removeprefix("torch.")
    for name, merged in written["dtype"].items():
        assert torch.equal(written["none"][name], merged.to(torch.bfloat16)), name
        assert torch.equal(written["out_dtype"][name], merged.to(torch.float16)), name


def test_slerp_with_a_per_model_weight_warns_once_and_merges_as_without(llama_family, make_config, tmp_path):
    """A MergeKit YAML with `weight` on slerp (MergeKit ignores it) merges, with one warning naming it."""
    base, experts = llama_family
    plain = make_config("slerp", base, experts[:1], [{}], name="plain.yaml", parameters={"t": 0.3})
    weighted = make_config("slerp", base, experts[:1], [{"weight": 0.7}], name="w.yaml", parameters={"t": 0.3})
    assert run_cli("merge", plain, "--out", tmp_path / "plain", "--quiet").exit_code == 0
    with pytest.warns(IgnoredParameterWarning) as caught:
        assert run_cli("merge", weighted, "--out", tmp_path / "w", "--quiet").exit_code == 0
    named = [str(w.message) for w in caught if w.category is IgnoredParameterWarning]
    assert len(named) == 1 and "parameter 'weight' (models[0])" in named[0]
    shard = "model.safetensors"
    assert (tmp_path / "w" / shard).read_bytes() == (tmp_path / "plain" / shard).read_bytes()


def test_sharded_output_and_same_seed_same_bytes(llama_family, make_config, tmp_path):
    base, experts = llama_family
    cfg = make_config("dare_ties", base, experts, [{"weight": 1.0, "density": 0.5}] * 3)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed, threads in ((a, 7, 1), (b, 7, 3), (c, 8, 2)):  # same bytes whatever the threads
        assert run_cli("merge", cfg, "--out", out, "--seed", seed, "--shard-size", "60KB", "--quiet",
                       "--threads", threads).exit_code == 0
    index = json.loads((a / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic"])
def test_fused_kernels_write_the_torch_paths_bytes(llama_family, make_config, tmp_path, method):
    """End to end on a real bf16 checkpoint: the fused path (kernels + fused apply) and the torch reference
    path write identical shards."""
    base, experts = llama_family
    cfg = make_config(method, base, experts, [{"weight": w, "density": 0.4} if method != "task_arithmetic" else
                                              {"weight": w} for w in (1.0, -0.5, 0.7)])
    fused, reference = tmp_path / "fused", tmp_path / "reference"
    assert run_cli("merge", cfg, "--out", fused, "--quiet", "--threads", 2).exit_code == 0
    with torch_path():
        assert run_cli("merge", cfg, "--out", reference, "--quiet", "--threads", 1).exit_code == 0
    files = sorted(p.name for p in fused.glob("*.safetensors"))
    assert files and all((fused / f).read_bytes() == (reference / f).read_bytes() for f in files)


# ------------------------------------------------------------------------------------------ bad inputs


def _expect_error(cfg: Path, out: Path, match: str, *extra: str) -> None:
    result = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 2, result.output
    assert match in result.output, result.output
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def _variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_expert_path(llama_family, make_config, tmp_path):
    base, experts = llama_family
    cfg = make_config("ties", base, [experts[0], tmp_path / "nowhere"])
    _expect_error(cfg, tmp_path / "out", "nowhere")


def test_tensor_missing_in_one_expert(llama_family, make_config, tmp_path):
    base, experts = llama_family
    bad = _variant(experts[1], tmp_path / "bad", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _expect_error(make_config("ties", base, [experts[0], bad]), tmp_path / "out",
                  "'model.layers.1.mlp.up_proj.weight' is missing")


def test_shape_mismatch(llama_family, make_config, tmp_path):
    base, experts = llama_family

    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:, :32].clone()

    bad = _variant(experts[1], tmp_path / "bad", edit)
    _expect_error(make_config("ties", base, [experts[0], bad]), tmp_path / "out", "q_proj.weight' has shape")


def test_nan_in_expert_is_refused_and_leaves_nothing(llama_family, make_config, tmp_path):
    base, experts = llama_family

    def edit(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")

    bad = _variant(experts[1], tmp_path / "bad", edit)
    cfg = make_config("task_arithmetic", base, [experts[0], bad])
    _expect_error(cfg, tmp_path / "out", "NaN or Inf")
    result = run_cli("merge", cfg, "--out", tmp_path / "out", "--quiet", "--allow-nonfinite")
    assert result.exit_code == 0


def test_architecture_mismatch(llama_family, qwen_family, make_config, tmp_path):
    base, experts = llama_family
    _expect_error(make_config("ties", base, [experts[0], qwen_family[1][0]]), tmp_path / "out", "architecture")


@pytest.mark.parametrize("cfg_edit,match", [
    ({"merge_method": "frankenmerge"}, "'frankenmerge' is unknown"),
    ({"parameters": {"bogus": 1}}, "bogus"),
    ({"models_params": {"density": 1.5}}, "density"),
    ({"models_params": {"weight": "heavy"}}, "weight"),
    ({"extra_top": 1}, "extra_top"),
])
def test_bad_config_values(llama_family, make_config, tmp_path, cfg_edit, match):
    base, experts = llama_family
    params = [{"weight": 1.0, "density": 0.5, **cfg_edit.pop("models_params", {})} for _ in experts]
    method = cfg_edit.pop("merge_method", "ties")
    cfg = make_config(method, base, experts, params, **cfg_edit)
    _expect_error(cfg, tmp_path / "out", match)


def test_existing_output_needs_overwrite(llama_family, make_config, tmp_path):
    base, experts = llama_family
    out = tmp_path / "out"
    shutil.copytree(experts[0], out)  # an existing checkpoint
    (out / "keep.txt").write_text("mine")
    cfg = make_config("task_arithmetic", base, experts)
    result = run_cli("merge", cfg, "--out", out, "--quiet")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("merge", cfg, "--out", out, "--quiet", "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "merge_report.json").exists()


# ------------------------------------------------------------------------------------- vocabulary policies


@pytest.fixture(scope="module")
def wide_expert(llama_family, tmp_path_factory):
    """An expert with one extra vocabulary row (32000 vs 32001 in the paper's WizardMath case)."""
    base, _ = llama_family
    out = tmp_path_factory.mktemp("wide") / "wide"
    model = build_model(tiny_config("llama", vocab_size=257), seed=11)
    save_model(model, out, base)
    return out


def test_vocab_mismatch_needs_a_policy(llama_family, wide_expert, make_config, tmp_path):
    base, experts = llama_family
    _expect_error(make_config("task_arithmetic", base, [experts[0], wide_expert]), tmp_path / "out",
                  "tokenizer_source")


def test_vocab_policy_base_drops_extra_rows(llama_family, wide_expert, make_config, tmp_path):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, [experts[0], wide_expert], tokenizer_source="base")
    out = tmp_path / "out"
    assert run_cli("merge", cfg, "--out", out, "--quiet").exit_code == 0
    b, e0, w, m = state(base), state(experts[0]), state(wide_expert), state(out)
    name = "model.embed_tokens.weight"
    assert m[name].shape == b[name].shape
    torch.testing.assert_close(m[name], b[name] + (e0[name] - b[name]) + (w[name][:256] - b[name]), rtol=0,
                               atol=1e-6)


def test_vocab_policy_union_extends_rows(llama_family, wide_expert, make_config, tmp_path):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, [experts[0], wide_expert], tokenizer_source="union")
    out = tmp_path / "out"
    assert run_cli("merge", cfg, "--out", out, "--quiet").exit_code == 0
    w, m = state(wide_expert), state(out)
    name = "lm_head.weight"
    assert m[name].shape[0] == 257
    # the new row: the base takes the mean of the experts that have it; only the wide expert moves it
    torch.testing.assert_close(m[name][256], w[name][256], rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 257
