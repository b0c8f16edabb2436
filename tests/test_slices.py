"""MergeKit's slices, passthrough frankenmerges, gradient and filter parameters: differential against MergeKit's own
`run_merge` on tiny 4-layer Llama checkpoints (float32, every output tensor within 1e-6), and the bad inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from aim_ray.checkpoint import Checkpoint
from aim_ray.cli import main
from aim_ray.config import MergeConfig, parse_config
from aim_ray.engine import prepare, run_merge
from aim_ray.errors import ConfigError
from aim_ray.slices import evaluate
from aim_ray.worlds.tiny import build_tiny_family

pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge as mergekit_run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

TOL = 1e-6
MAX_DIFF: dict[str, float] = {}  # per case, printed with -s


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[str, list[str]]:
    base, experts = build_tiny_family(tmp_path_factory.mktemp("llama4"), "llama", n_experts=2, seed=5,
                                      num_layers=4)
    return str(base), [str(e) for e in experts]


def state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


def ours(data: dict, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = prepare(parse_config(MergeConfig, data, "test"))
    return run_merge(job, out, progress=False)


def mergekit(data: dict, out: Path) -> Path:
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit_run_merge(MergeConfiguration.model_validate(data), str(out), options=options)
    return out


def check_against_mergekit(label: str, data: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    data = {"dtype": "float32", **data}
    a, b = state(ours(data, tmp_path / "ours")), state(mergekit(data, tmp_path / "mergekit"))
    assert sorted(a) == sorted(b)
    worst = 0.0
    for name, theta in b.items():
        assert a[name].dtype == theta.dtype and a[name].shape == theta.shape, name
        worst = max(worst, (a[name] - theta).abs().max().item())
    MAX_DIFF[label] = worst
    print(f"{label}: max |ours - mergekit| = {worst:.3g}")
    assert worst <= TOL, label
    layers = [json.loads((tmp_path / d / "config.json").read_text()).get("num_hidden_layers")
              for d in ("ours", "mergekit")]
    assert layers[0] == layers[1]
    return a


def test_evaluate_follows_mergekit():
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as mk

    settings = [0.5, [0.1, 0.9], [0.2, 1.0, 0.4], [True, False], [{"filter": "mlp", "value": [0.3, 0.6]},
                                                                  {"value": 0.1}]]
    for setting in settings:
        mk_setting = ([ConditionalParameter(**c) for c in setting]
                      if isinstance(setting, list) and isinstance(setting[0], dict) else setting)
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
            for t in (0.0, 1 / 3, 0.5, 2 / 3, 1.0):
                assert evaluate(name, setting, t) == mk(name, mk_setting, t, validate=lambda v: v), (setting, t)


def test_passthrough_frankenmerge(family, tmp_path):
    """Two overlapping layer ranges of two models stacked into 6 layers; a scale on the second slice."""
    _, (e0, e1) = family
    data = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": e0, "layer_range": [0, 3]}]},
        {"sources": [{"model": e1, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]}
    out = check_against_mergekit("passthrough", data, tmp_path)
    assert sum(n.endswith("self_attn.q_proj.weight") for n in out) == 6
    src0, src1 = state(Path(e0)), state(Path(e1))
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], src0["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], src1["model.layers.1.mlp.up_proj.weight"] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], src0["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], src1["lm_head.weight"] * 0.5)  # from the last slice, its scale


def test_ties_gradient_density(family, tmp_path):
    base, (e0, e1) = family
    data = {"merge_method": "ties", "base_model": base, "models": [
        {"model": e0, "parameters": {"weight": 0.7, "density": [0.2, 0.9]}},
        {"model": e1, "parameters": {"weight": [0.3, 0.5, 1.0], "density": 0.5}}],
        "parameters": {"normalize": False}}
    check_against_mergekit("ties_gradient", data, tmp_path)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_filtered_weights(family, tmp_path, method):
    base, (e0, e1) = family
    weight = [{"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": [0.1, 0.6]}, {"value": 0.4}]
    data = {"merge_method": method, "base_model": base, "models": [
        {"model": e0, "parameters": {"weight": weight}}, {"model": e1, "parameters": {"weight": 0.3}}]}
    if method == "linear":
        data["models"].append({"model": base, "parameters": {"weight": 0.2}})
    check_against_mergekit(f"{method}_filter", data, tmp_path)


def test_slice_precedence(family, tmp_path):
    """Source parameters over slice parameters over global ones (a source's filter list that matches nothing
    falls through); the second slice shifts the layers (output layer 2 is input layer 1), and a per-model filter
    is matched against that model's input tensor name, as in MergeKit."""
    base, (e0, e1) = family
    data = {"merge_method": "ties", "base_model": base,
            "parameters": {"weight": 0.1, "density": [0.3, 0.8], "lambda": 0.9},
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 2]},
                             {"model": e0, "layer_range": [0, 2],
                              "parameters": {"weight": [{"filter": "down_proj", "value": 1.5}]}},
                             {"model": e1, "layer_range": [0, 2], "parameters": {"density": 0.4}}],
                 "parameters": {"weight": 0.6}},
                {"sources": [{"model": base, "layer_range": [1, 3]},
                             {"model": e0, "layer_range": [1, 3], "parameters": {"weight": [0.2, 0.9]}},
                             {"model": e1, "layer_range": [1, 3],  # matched on its input names
                              "parameters": {"weight": [{"filter": "layers.1.", "value": 1.3}]}}],
                 "parameters": {"density": 0.7, "lambda": 1.2}}]}
    check_against_mergekit("slice_precedence", data, tmp_path)


def test_scalar_models_config_keeps_the_single_params(family):
    base, (e0, e1) = family
    job = prepare(parse_config(MergeConfig, {"merge_method": "ties", "base_model": base, "models": [
        {"model": e0, "parameters": {"weight": 0.5}}, {"model": e1, "parameters": {"weight": 0.5}}]}, "t"))
    assert job.plan is None and job.out_layers is None


# ----------------------------------------------------------------------------------------------- bad input


def refused(data: dict, tmp_path: Path) -> str:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(json.dumps(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert not out.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_layer_range_outside_the_model(family, tmp_path):
    _, (e0, _) = family
    msg = refused({"merge_method": "passthrough", "slices": [{"sources": [{"model": e0, "layer_range": [2, 5]}]}]},
                  tmp_path)
    assert "slices[0].sources[0].layer_range [2, 5] is outside" in msg and "(4 layers)" in msg


def test_sources_of_one_slice_disagree(family, tmp_path):
    base, (e0, _) = family
    msg = refused({"merge_method": "task_arithmetic", "base_model": base, "slices": [{"sources": [
        {"model": base, "layer_range": [0, 2]}, {"model": e0, "layer_range": [0, 3]}]}]}, tmp_path)
    assert "slices[0].sources: layer ranges cover different numbers of layers ([2, 3])" in msg


def test_filter_matching_no_tensor(family, tmp_path):
    base, (e0, _) = family
    msg = refused({"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": e0, "parameters": {"weight": [{"filter": "mlpx", "value": 0.5}, {"value": 1.0}]}}]}, tmp_path)
    assert "models[0].parameters.weight: filter 'mlpx' matches no tensor" in msg


def test_gradient_on_a_model_without_layers(family, tmp_path):
    base, (e0, e1) = family
    from safetensors.torch import load_file, save_file

    for path in (base, e0):  # copies without decoder layers: no num_hidden_layers, no layer tensors
        dst = tmp_path / Path(path).name
        dst.mkdir()
        for f in Path(path).iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((dst / "config.json").read_text())
        del cfg["num_hidden_layers"]
        (dst / "config.json").write_text(json.dumps(cfg))
        tensors = load_file(dst / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if ".layers." not in k}, dst / "model.safetensors",
                  metadata={"format": "pt"})
    msg = refused({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "models": [
        {"model": str(tmp_path / "expert_0"), "parameters": {"weight": [0.1, 0.9]}}]}, tmp_path)
    assert "models[0].parameters.weight: a gradient (list of values) needs a model with decoder layers" in msg


def test_aim_refused_with_passthrough(family, tmp_path):
    base, (e0, _) = family
    msg = refused({"merge_method": "passthrough", "base_model": base, "models": [{"model": e0}],
                   "aim": {"omega": 0.5, "scales": "x.safetensors"}}, tmp_path)
    assert msg.endswith("aim: merge_method passthrough copies tensors (no delta from a base to relax); remove aim:")


def test_malformed_setting_and_models_with_slices(family):
    base, (e0, _) = family
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: expected a value"):
        prepare(parse_config(MergeConfig, {"merge_method": "linear", "models": [
            {"model": e0, "parameters": {"weight": [{"filter": "mlp"}]}}]}, "t"))
    with pytest.raises(ConfigError, match="give exactly one of models, slices or modules"):
        parse_config(MergeConfig, {"merge_method": "linear", "models": [e0],
                                   "slices": [{"sources": [{"model": e0, "layer_range": [0, 1]}]}]}, "t")


def test_missing_source_is_named(family, tmp_path):
    _, (e0, _) = family
    msg = refused({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": e0, "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tmp_path / "nowhere"), "layer_range": [0, 2]}]}]}, tmp_path)
    assert msg.endswith("error: slices[1].sources[0]: " + str(tmp_path / "nowhere") + ": no such checkpoint directory")


def test_relative_source_paths_resolve_against_the_yaml(family, tmp_path):
    from aim_ray.config import load_merge_config

    _, (e0, _) = family
    (tmp_path / "m").symlink_to(e0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "m", "layer_range": [0, 2]}]}]}))
    assert load_merge_config(cfg).slices[0].sources[0].model == str(Path(e0).resolve())


def test_passthrough_with_another_base_model_is_refused_as_mergekit(family, tmp_path):
    """MergeKit adds a base_model missing from `models` as one more input: two inputs for passthrough."""
    base, (e0, _) = family
    msg = refused({"merge_method": "passthrough", "base_model": base, "models": [{"model": e0}]}, tmp_path)
    assert "error: base_model: merge_method passthrough takes one model" in msg
    with pytest.raises(ValueError, match="requires exactly 1 inputs .*; got 2"):
        mergekit({"merge_method": "passthrough", "base_model": base, "models": [{"model": e0}]}, tmp_path / "mk")


def test_per_model_filters_match_input_names_even_from_global_parameters(family, tmp_path):
    """Output layers 2-3 are input layers 1-2: a global per-model filter on "layers.3." matches no input of that
    slice (MergeKit: density keeps its default there), while the shared `lambda` filter matches output names."""
    base, (e0, e1) = family
    srcs = [{"model": m, "layer_range": [0, 2]} for m in (base, e0, e1)]
    shifted = [{"model": m, "layer_range": [1, 3]} for m in (base, e0, e1)]
    data = {"merge_method": "ties", "base_model": base, "slices": [{"sources": srcs}, {"sources": shifted}],
            "parameters": {"weight": 0.6, "density": [{"filter": "layers.3.", "value": 0.3}],
                           "lambda": [{"filter": "layers.3.", "value": 0.5}, {"value": 1.0}]}}
    check_against_mergekit("input_name_filters", data, tmp_path)


def test_passthrough_models_with_a_gradient_scale(family, tmp_path):
    _, (e0, _) = family
    check_against_mergekit("passthrough_gradient", {"merge_method": "passthrough", "models": [
        {"model": e0, "parameters": {"scale": [1.0, 0.25]}}]}, tmp_path)


# ------------------------------------------------------------------------------ a slice's own base_model


def test_slice_base_model_overrides_the_global_one(family, tmp_path):
    """Slice 1 merges base and e1 as task vectors from e0 (its own base_model); slice 0 uses the global base.
    The embeddings follow the first slice's base, the final norm and lm_head the last slice's."""
    base, (e0, e1) = family
    data = {"merge_method": "ties", "base_model": base, "parameters": {"weight": 0.7, "density": 0.6},
            "slices": [
                {"sources": [{"model": m, "layer_range": [0, 2]} for m in (base, e0, e1)]},
                {"base_model": e0, "sources": [{"model": m, "layer_range": [2, 4]} for m in (base, e0, e1)]}]}
    out = check_against_mergekit("slice_base_model", data, tmp_path)
    again = state(ours({**data, "dtype": "float32", "slices": [{**data["slices"][0]}, {
        "sources": data["slices"][1]["sources"]}]}, tmp_path / "global"))
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], again["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(out["model.layers.3.mlp.up_proj.weight"], again["model.layers.3.mlp.up_proj.weight"])
    assert not torch.equal(out["lm_head.weight"], again["lm_head.weight"])


def test_slice_base_models_without_a_global_one(family, tmp_path):
    """Every slice names its base; a model is the base of one slice and a merged model of the other."""
    base, (e0, e1) = family
    data = {"merge_method": "task_arithmetic", "parameters": {"weight": [0.3, 0.9]}, "slices": [
        {"base_model": e1, "sources": [{"model": m, "layer_range": [1, 3]} for m in (e0, e1, base)]},
        {"base_model": base, "sources": [{"model": m, "layer_range": [0, 4]} for m in (base, e0, e1)],
         "parameters": {"weight": 0.5}}]}
    check_against_mergekit("slice_base_no_global", data, tmp_path)


@pytest.mark.parametrize("method", ["multislerp", "nuslerp"])
def test_slice_base_model_of_an_optional_base_method(family, tmp_path, method):
    """nuslerp / multislerp interpolate task vectors from a slice's own base (nuslerp's second slice: from e1),
    the weights themselves where a slice has none (multislerp's second slice merges all three models)."""
    base, (e0, e1) = family
    first = {"base_model": base, "sources": [
        {"model": m, "layer_range": [0, 2], "parameters": {"weight": w}} for m, w in ((base, 1.0), (e0, 0.4),
                                                                                         (e1, 0.6))]}
    order = ((e1, 1.0), (e0, 0.3), (base, 0.7)) if method == "nuslerp" else ((e0, 0.4), (e1, 0.6), (base, 0.2))
    second = {"sources": [{"model": m, "layer_range": [2, 4], "parameters": {"weight": w}} for m, w in order]}
    if method == "nuslerp":
        second["base_model"] = e1
    check_against_mergekit(f"{method}_slice_base", {"merge_method": method, "slices": [first, second]}, tmp_path)


def test_residual_weight_and_an_ignored_slice_base_warn(family, tmp_path):
    """MergeKit 0.1.5 accepts `residual_weight` and never reads it; linear ignores a base (IGNORED policy)."""
    base, (e0, e1) = family
    data = {"merge_method": "linear", "dtype": "float32", "slices": [
        {"residual_weight": 0.5, "base_model": base,
         "sources": [{"model": m, "layer_range": [0, 4], "parameters": {"weight": w}} for m, w in ((e0, 1), (e1, 2))]}]}
    job = None
    with pytest.warns(UserWarning) as caught:
        job = prepare(parse_config(MergeConfig, data, "t"))
    messages = sorted(str(w.message) for w in caught)
    assert any(m.startswith("slices[0].base_model: merge_method linear merges the slice's sources") for m in messages)
    assert "slices[0].residual_weight: MergeKit accepts and ignores it; ignored" in messages
    assert job is not None
    check_against_mergekit("residual_weight", data, tmp_path)


def test_slice_base_model_missing_from_its_sources(family, tmp_path):
    base, (e0, e1) = family
    msg = refused({"merge_method": "ties", "base_model": base, "slices": [
        {"base_model": e1, "sources": [{"model": m, "layer_range": [0, 4]} for m in (base, e0)]}]}, tmp_path)
    assert msg.endswith(f"slices[0].sources: merge_method 'ties' needs slices[0].base_model {e1} among the "
                        f"slice's sources")
    with pytest.raises(ValueError, match="Base input is not present in merge inputs"):
        mergekit({"merge_method": "ties", "base_model": base, "slices": [
            {"base_model": e1, "sources": [{"model": m, "layer_range": [0, 4]} for m in (base, e0)]}]},
            tmp_path / "mk")
    msg = refused({"merge_method": "ties", "slices": [
        {"base_model": base, "sources": [{"model": m, "layer_range": [0, 2]} for m in (base, e0)]},
        {"sources": [{"model": m, "layer_range": [2, 4]} for m in (base, e0)]}]}, tmp_path)
    assert msg.endswith("merge_method 'ties' needs base_model (globally or as slices[1].base_model)")


def test_last_slice_with_more_sources_than_the_first(family, tmp_path):
    """Documented difference: the final norm and lm_head merge every source of the last slice. MergeKit 0.1.5
    zips the last slice's models with the first slice's list, so it drops the sources beyond that count."""
    base, (e0, e1) = family
    data = {"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [{"model": m, "layer_range": [0, 2], "parameters": {"weight": 1.0}} for m in (e0, e1)]},
        {"sources": [{"model": m, "layer_range": [2, 4], "parameters": {"weight": 1.0}} for m in (e0, e1, base)]}]}
    a, b = state(ours(data, tmp_path / "ours")), state(mergekit(data, tmp_path / "mk"))
    heads = [state(Path(m))["lm_head.weight"] for m in (e0, e1, base)]
    assert (a["lm_head.weight"] - sum(heads) / 3).abs().max().item() <= TOL
    assert (b["lm_head.weight"] - sum(heads[:2]) / 2).abs().max().item() <= TOL
    assert (a["model.layers.3.mlp.up_proj.weight"] - b["model.layers.3.mlp.up_proj.weight"]).abs().max() <= TOL


# ------------------------------------------------------------------ other families, MergeKit's `modules:`


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[str, list[str]]]:
    """Tiny GPT-2 (`transformer.h.N`), LLaVA (`language_model.model.layers.N`, a CLIP tower) and Mistral3 (a
    MergeKit `modules` architecture: text_decoder, vision_tower, multi_modal_projector), 3 layers each."""
    try:
        from tests.test_architectures import build
    except ImportError:  # tests/ is not a package: pytest puts it on sys.path
        from test_architectures import build

    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in ("gpt2", "llava", "mistral3"):
        base, experts = build(root, family)
        out[family] = (str(base), [str(e) for e in experts])
    return out


def _layers(path: Path, *keys: str) -> list[int]:
    cfg = json.loads((path / "config.json").read_text())
    return [cfg[k] if "." not in k else cfg[k.split(".")[0]][k.split(".")[1]] for k in keys]


@pytest.mark.parametrize("method", ["passthrough", "ties"])
def test_gpt2_slices(families, tmp_path, method):
    """`transformer.h.N` layers stacked (passthrough: 4 output layers from two models) or merged per slice with
    a gradient and a slice base_model; config.json's `n_layer` follows."""
    base, (e0, e1) = families["gpt2"]
    if method == "passthrough":
        data = {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": e0, "layer_range": [0, 2]}]},
            {"sources": [{"model": e1, "layer_range": [1, 3], "parameters": {"scale": 0.5}}]}]}
    else:
        data = {"merge_method": "ties", "base_model": base, "parameters": {"density": [0.3, 0.9], "weight": 0.5},
                "slices": [{"sources": [{"model": m, "layer_range": [0, 2]} for m in (base, e0, e1)]},
                           {"base_model": e0,
                            "sources": [{"model": m, "layer_range": [2, 3]} for m in (base, e0, e1)]}]}
    out = check_against_mergekit(f"gpt2_{method}", data, tmp_path)
    n = 4 if method == "passthrough" else 3
    assert _layers(tmp_path / "ours", "n_layer") == _layers(tmp_path / "mergekit", "n_layer") == [n]
    if method == "passthrough":
        fc = "transformer.h.{}.mlp.c_fc.weight"
        assert torch.equal(out[fc.format(3)], state(Path(e1))[fc.format(2)] * 0.5)


def test_llava_slices(families, tmp_path):
    """MergeKit 0.1.5 has no LLaVA architecture (so no differential): the language model's layers are stacked,
    the vision tower and projector come with the embeddings from the first slice, `text_config` gets the count,
    and transformers loads the result."""
    import transformers

    _, (e0, e1) = families["llava"]
    data = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": e0, "layer_range": [0, 3]}]}, {"sources": [{"model": e1, "layer_range": [1, 3]}]}]}
    out = state(ours(data, tmp_path / "ours"))
    src0, src1 = state(Path(e0)), state(Path(e1))
    q = "language_model.model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[q.format(4)], src1[q.format(2)]) and torch.equal(out[q.format(1)], src0[q.format(1)])
    assert all(torch.equal(out[n], src0[n]) for n in src0 if n.startswith(("vision_tower.", "multi_modal_projector.")))
    assert torch.equal(out["language_model.lm_head.weight"], src1["language_model.lm_head.weight"])
    assert _layers(tmp_path / "ours", "text_config.num_hidden_layers") == [5]
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert len(model.model.language_model.layers) == 5


def mistral3_modules(base: str, experts: list[str]) -> dict:
    e0, e1 = experts
    trio = (base, e0, e1)
    return {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5, "weight": 0.5}, "modules": {
        "text_decoder": {"slices": [
            {"sources": [{"model": m, "layer_range": [0, 2]} for m in trio]},
            {"sources": [{"model": m, "layer_range": [1, 3]} for m in trio], "parameters": {"density": [0.2, 0.8]}}]},
        "vision_tower": {"parameters": {"weight": 0.9}, "slices": [
            {"sources": [{"model": m, "layer_range": [0, 2]} for m in trio]},
            {"base_model": e1, "sources": [{"model": m, "layer_range": [1, 2]} for m in trio]}]},
        "multi_modal_projector": {"models": [{"model": e0}, {"model": e1, "parameters": {"weight": 0.3}}],
                                  "parameters": {"density": 0.3}}}}


def test_mistral3_modules(families, tmp_path):
    """MergeKit's `modules:` on its Mistral3 architecture: per-module slices (4 text layers, 3 vision tower
    layers, one with its own base_model), module parameters between the slice's and the global ones, and a
    module given as `models:`; both layer counts in config.json."""
    base, experts = families["mistral3"]
    check_against_mergekit("mistral3_modules", mistral3_modules(base, experts), tmp_path)
    keys = ("text_config.num_hidden_layers", "vision_config.num_hidden_layers")
    assert _layers(tmp_path / "ours", *keys) == _layers(tmp_path / "mergekit", *keys) == [4, 3]


def test_modules_bad_input(families, family, tmp_path):
    base, experts = families["mistral3"]
    data = mistral3_modules(base, experts)
    del data["modules"]["multi_modal_projector"]
    msg = refused(data, tmp_path)
    assert msg.endswith("belongs to module 'multi_modal_projector', which is not listed; list it (MergeKit would "
                        "leave it out of the output)")
    data = mistral3_modules(base, experts)
    data["modules"]["audio_tower"] = data["modules"].pop("multi_modal_projector")
    msg = refused(data, tmp_path)
    assert msg.endswith(f"modules.audio_tower: no tensor of {base} belongs to it (its modules: text_decoder, "
                        f"multi_modal_projector, vision_tower)")
    data = mistral3_modules(base, experts)
    data["modules"]["vision_tower"]["slices"][1]["sources"][0]["layer_range"] = [1, 3]
    msg = refused(data, tmp_path)
    assert "modules.vision_tower.slices[1].sources[0].layer_range [1, 3] is outside" in msg and "(2 layers)" in msg
    llama, (e0, _) = family  # MergeKit's single-module name `default` is the whole model
    check_against_mergekit("default_module", {"merge_method": "task_arithmetic", "base_model": llama, "modules": {
        "default": {"slices": [{"sources": [{"model": m, "layer_range": [0, 4]} for m in (llama, e0)]}],
                    "parameters": {"weight": 0.4}}}}, tmp_path)
