"""MergeKit's `tokenizer:` section and `chat_template`, differential against MergeKit's own `run_merge` (CPU).

Experts carry extra tokens (added with `add_tokens` + `resize_token_embeddings`). Every output tensor is compared
with MergeKit's row by token (MergeKit's union order of new tokens follows a Python set of models, so ids may
differ between its runs; the vocabularies must be equal as token sets and every token's row within 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoTokenizer

from aim_ray.chat_template import BUILTIN, check_parses
from aim_ray.cli import main
from aim_ray.worlds.tiny import add_expert_delta, build_model, build_tokenizer, tiny_config

N_TOKENS = 260  # the tiny tokenizer's length: every model's rows equal its tokenizer (MergeKit's KeyError otherwise)
CHATML_LIKE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _model(root: Path, name: str, tok_dir: Path, seed: int, new_tokens: list[str] | None = None,
           special: list[str] | None = None, template: str | None = None) -> Path:
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if new_tokens:
        tok.add_tokens(new_tokens)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    if template:
        tok.chat_template = template
    model = build_model(tiny_config("llama", vocab_size=N_TOKENS), seed=0)
    if seed:
        add_expert_delta(model, seed=seed)
    if len(tok) != N_TOKENS:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                p[N_TOKENS:] = torch.randn_like(p[N_TOKENS:])  # distinct rows per expert
    out = root / name
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokfam")
    build_tokenizer(root / "tok")
    return {
        "base": _model(root, "base", root / "tok", 0, template=CHATML_LIKE),
        "a": _model(root, "a", root / "tok", 1, ["<think>", "<tool>"], template=BUILTIN["chatml"]),
        "b": _model(root, "b", root / "tok", 2, ["<tool>", "<code>"], special=["<|sep|>"],
                    template=BUILTIN["chatml"]),
        # the base's vocabulary (no tokenizer section needed), chatml twice: `auto` picks it over the base's
        "c": _model(root, "c", root / "tok", 3, template=BUILTIN["chatml"]),
        "d": _model(root, "d", root / "tok", 4, template=BUILTIN["chatml"]),
    }


def _config(fam: dict[str, Path], experts: str = "ab", base: str = "base", **top) -> dict:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(fam[base]), "dtype": "float32",
           "models": [{"model": str(fam[experts[0]]), "parameters": {"weight": 0.7}},
                      {"model": str(fam[experts[1]]), "parameters": {"weight": 0.5}}]}
    cfg.update(top)
    return cfg


def _ours(cfg: dict, tmp_path: Path) -> Path:
    out = tmp_path / "ours"
    result = CliRunner().invoke(main, ["merge", str(write_yaml(tmp_path / "m.yaml", cfg)), "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _mergekit(cfg: dict, tmp_path: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = tmp_path / "mergekit"
    run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(quiet=True, write_model_card=False))
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _compare(ours: Path, theirs: Path) -> float:
    """Max |diff| over every tensor, vocabulary rows matched by token; asserts names, shapes and vocabularies."""
    a, b = _state(ours), _state(theirs)
    assert set(a) == set(b)
    va = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    vb = AutoTokenizer.from_pretrained(str(theirs)).get_vocab()
    assert set(va) == set(vb)
    ca, cb = (json.loads((p / "config.json").read_text())["vocab_size"] for p in (ours, theirs))
    assert ca == cb
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        x, y = a[name], b[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            ids = list(va)
            pad = slice(len(va), None)
            worst = max(worst, float((x[pad] - y[pad]).abs().max()) if x.shape[0] > len(va) else 0.0)
            x, y = x[[va[t] for t in ids]], y[[vb[t] for t in ids]]
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    assert worst <= 1e-6, worst
    return worst


TOKEN_CASES = {
    "base": {"tokenizer_source": "base"},
    "union": {"tokenizer_source": "union"},
    "model": {"tokenizer": {"source": "b"}},
    "union_ties": {"tokenizer_source": "union", "merge_method": "ties", "parameters": {"density": 0.5}},
    "tokens_force_pad": {"tokenizer": {
        "source": "union", "pad_to_multiple_of": 64,
        "tokens": {"<tool>": {"source": "a"},
                   "<s>": {"source": {"kind": "zero"}, "force": True},
                   "</s>": {"source": "b", "force": True},
                   "<new>": {"source": {"kind": "model_token", "model": "b", "token": "<code>"}}}}},
}


def _fill(value, fam):
    if isinstance(value, dict):
        return {k: _fill(v, fam) for k, v in value.items()}
    return str(fam[value]) if isinstance(value, str) and value in ("a", "b") else value


def test_union_prefers_the_base_row(family, tmp_path):
    """Base a: <tool> is in a and b, not c: every model lacking it takes the base's row (not the mean)."""
    cfg = _config(family, "bc", base="a", tokenizer_source="union")
    ours = _ours(cfg, tmp_path)
    _compare(ours, _mergekit(cfg, tmp_path))
    vocab = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    a, b = (load_file(family[k] / "model.safetensors")["lm_head.weight"] for k in "ab")
    ta, tb = (AutoTokenizer.from_pretrained(str(family[k])).get_vocab() for k in "ab")
    row = a[ta["<tool>"]]
    torch.testing.assert_close(_state(ours)["lm_head.weight"][vocab["<tool>"]],
                               row + 0.7 * (b[tb["<tool>"]] - row), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_tokenizer_section_equals_mergekit(family, tmp_path, case):
    cfg = _config(family, **_fill(TOKEN_CASES[case], family))
    ours, theirs = _ours(cfg, tmp_path), _mergekit(cfg, tmp_path)
    _compare(ours, theirs)
    vocab = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    rows = _state(ours)["model.embed_tokens.weight"].shape[0]
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == rows
    expected = {"base": N_TOKENS, "union": N_TOKENS + 4, "union_ties": N_TOKENS + 4, "model": N_TOKENS + 3,
                "tokens_force_pad": 320}[case]
    assert rows == expected and len(vocab) == (expected if case != "tokens_force_pad" else N_TOKENS + 5)


def test_forced_and_sourced_rows(family, tmp_path):
    """The exact rows: a forced zero, a forced source, a donor, a model_token copy, mean padding."""
    cfg = _config(family, **_fill(TOKEN_CASES["tokens_force_pad"], family))
    out = _ours(cfg, tmp_path)
    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    m = _state(out)["model.embed_tokens.weight"]
    b = load_file(family["b"] / "model.safetensors")["model.embed_tokens.weight"]
    a = load_file(family["a"] / "model.safetensors")["model.embed_tokens.weight"]
    tb = AutoTokenizer.from_pretrained(str(family["b"])).get_vocab()
    ta = AutoTokenizer.from_pretrained(str(family["a"])).get_vocab()
    assert torch.equal(m[vocab["<s>"]], torch.zeros(64))
    # every model gets b's row: base + 0.7 (row - row) + 0.5 (row - row)
    torch.testing.assert_close(m[vocab["</s>"]], b[tb["</s>"]], rtol=0, atol=1e-6)
    torch.testing.assert_close(m[vocab["<new>"]], b[tb["<code>"]], rtol=0, atol=1e-6)
    torch.testing.assert_close(m[vocab["<think>"]], a[ta["<think>"]], rtol=0, atol=1e-6)
    # <tool>: configured from a; the base lacks it and takes a's row, a and b keep their own
    base_row, a_row, b_row = a[ta["<tool>"]], a[ta["<tool>"]], b[tb["<tool>"]]
    torch.testing.assert_close(m[vocab["<tool>"]], base_row + 0.7 * (a_row - base_row) + 0.5 * (b_row - base_row),
                               rtol=0, atol=1e-6)
    n = len(vocab)
    assert torch.equal(m[n:], m[n:n + 1].expand(m.shape[0] - n, -1))


def _template_of(path: Path) -> str | None:
    return AutoTokenizer.from_pretrained(str(path)).chat_template


MESSAGES = [
    [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}],
    [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "yo "}],
]


def _renders(path: Path) -> list[str]:
    tok = AutoTokenizer.from_pretrained(str(path))
    return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g) for m in MESSAGES
            for g in (False, True)]


@pytest.mark.parametrize("template", ["auto", "chatml", "llama3", "alpaca", "mistral", "exaone", CHATML_LIKE])
def test_chat_template_equals_mergekit(family, tmp_path, template):
    cfg = _config(family, "cd", chat_template=template)
    ours, theirs = _ours(cfg, tmp_path), _mergekit(cfg, tmp_path)
    _compare(ours, theirs)
    assert (ours / "chat_template.jinja").exists()
    if template in BUILTIN:  # written here from the public formats: the same prompts, not the same text
        assert _renders(ours) == _renders(theirs)
    else:
        assert _template_of(ours) == _template_of(theirs)
        assert _template_of(ours) == (BUILTIN["chatml"] if template == "auto" else CHATML_LIKE)


def test_chat_template_with_tokenizer_section(family, tmp_path):
    cfg = _config(family, tokenizer={"source": "union"}, chat_template="llama3")
    ours, theirs = _ours(cfg, tmp_path), _mergekit(cfg, tmp_path)
    _compare(ours, theirs)
    assert _renders(ours) == _renders(theirs)


def test_builtin_templates_parse():
    for text in BUILTIN.values():
        check_parses(text)


BAD = [
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "b",
                                                                    "token": "<nope>"}}}}},
     "tokenizer.tokens['<x>'].source.token: '<nope>' is not in the tokenizer of"),
    ({"tokenizer": {"source": "union", "tokens": {"<think>": {"source": "b"}}}},
     "tokenizer.tokens['<think>'].source: '<think>' is not in the tokenizer of"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "a",
                                                                    "token_id": 262}}}}},
     "tokenizer.tokens['<x>'].source: token id 262 is outside"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "/no/such/model"}}}},
     "is not one of the merged models"),
    ({"chat_template": "{% for m in messages %}{{ m['content'] }"}, "chat_template: the Jinja template does not parse"),
    ({"chat_template": "vicuna"}, "chat_template 'vicuna': not a built-in template"),
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "either tokenizer_source or tokenizer"),
    ({"tokenizer": {"source": "nowhere"}}, "tokenizer.source 'nowhere'"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
]


@pytest.mark.parametrize("top,message", BAD)
def test_bad_input_is_refused_before_writing(family, tmp_path, top, message):
    cfg = _config(family, "cd" if "chat_template" in top else "ab", **_fill(top, family))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(write_yaml(tmp_path / "m.yaml", cfg)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) <= 3, result.output
    assert not out.exists()


def test_ray_workers_write_the_same_bytes(family, tmp_path):
    """Workers prepare the job themselves (tokenizers included): same shards as one process."""
    import ray

    from aim_ray.config import MergeConfig, parse_config
    from aim_ray.driver import ClusterOptions
    from aim_ray.service import merge_from_config

    cfg = _config(family, chat_template="chatml", **_fill(TOKEN_CASES["tokens_force_pad"], family))
    one = _ours(cfg, tmp_path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = merge_from_config(parse_config(MergeConfig, cfg, "cfg"), tmp_path / "two", progress=False,
                                cluster=ClusterOptions(workers=2, cpus_per_worker=0.5, ready_timeout_s=120))
    finally:
        ray.shutdown()
    for f in sorted(one.glob("*.safetensors")):
        assert (two / f.name).read_bytes() == f.read_bytes(), f.name
    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
