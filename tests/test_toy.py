"""The tiny world: real skills measured by lm-eval, caching, atomic builds.

The world is built once per session under the session tmp dir, or reused from `$AIM_RAY_CACHE` when set
(about 75 s on one core the first time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aim_ray.evaluation import evaluate
from aim_ray.worlds import toy, toy_tasks
from aim_ray.worlds.toy import build_toy_world

LIMIT = 100  # the first docs alternate easy and hard examples, so a limit keeps the mix


@pytest.fixture(scope="session")
def toy_scores(toy_world):
    """lm-eval scores (hf backend, CPU) of base and experts: model -> task -> acc."""
    return {name: {t: m["acc"] for t, m in evaluate(path, toy_world.task_names, backend="hf", device="cpu",
                                                      include_path=toy_world.tasks_dir, limit=LIMIT,
                                                      batch_size=64).items()}
            for name, path in toy_world.models.items()}


def test_world_layout_is_plain_hf_checkpoints(toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(toy_world.experts) == set(toy_tasks.SKILLS)
    assert toy_world.task_names == [toy_tasks.task_name(k) for k in toy_tasks.KINDS]
    assert toy_world.expert_for_task == {f"toy_{s}": s for s in toy_tasks.SKILLS}
    for path in toy_world.models.values():
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        assert (path / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(toy_world.experts["add"])
    assert model.config.model_type == "llama" and model.config.hidden_size == toy.MODEL["hidden_size"]
    assert AutoTokenizer.from_pretrained(toy_world.base)("add 1+2=").input_ids  # loads, one token per char
    for name in (*toy_world.task_names, toy_tasks.GROUP):
        assert (toy_world.tasks_dir / f"{name}.yaml").is_file()


def test_each_expert_beats_base_on_its_skill_and_loses_elsewhere(toy_scores, toy_world):
    base = toy_scores["base"]
    for task, skill in toy_world.expert_for_task.items():
        expert = toy_scores[skill]
        assert expert[task] >= base[task] + 0.3, (skill, expert, base)
        others = [t for t in toy_world.task_names if t != task]
        assert min(expert[t] - base[t] for t in others) <= -0.2, (skill, expert, base)
    assert base[toy_world.general_task] >= 0.9  # the base's knowledge, which experts overwrite


def test_lm_eval_acc_equals_greedy_exact_match(toy_scores, toy_world):
    """Independent oracle: lm-eval's loglikelihood acc is the share of targets that are greedy continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world.base)
    model = AutoModelForCausalLM.from_pretrained(toy_world.experts["reverse"])
    for kind in toy_tasks.KINDS:
        expected = toy.greedy_accuracy(model, tok, toy_tasks.eval_examples(kind)[:LIMIT])
        assert toy_scores["reverse"][toy_tasks.task_name(kind)] == pytest.approx(expected)


def test_cached_world_is_reused_and_relocatable(toy_world, tmp_path):
    stamp = (toy_world.base / "model.safetensors").stat().st_mtime_ns
    again = build_toy_world(toy_world.root)
    assert again == toy_world and (again.base / "model.safetensors").stat().st_mtime_ns == stamp
    moved = tmp_path / "elsewhere" / toy.WORLD_NAME
    shutil.copytree(toy_world.root, moved)
    world = build_toy_world(moved)  # YAMLs hold absolute data paths: rewritten for the new place
    text = (world.tasks_dir / "toy_add.yaml").read_text()
    assert json.dumps(str(moved / "data" / "toy_add.jsonl")) in text


def test_interrupted_build_leaves_nothing_that_looks_cached(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during training

    monkeypatch.setattr(toy, "_train", interrupted)
    target = tmp_path / "cache" / toy.WORLD_NAME
    with pytest.raises(KeyboardInterrupt):
        build_toy_world(target)
    assert not target.exists()
    assert list(Path(tmp_path / "cache").iterdir()) == []  # the temporary build dir is gone too


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(toy.CACHE_ENV, str(tmp_path))
    assert toy.default_cache_dir() == tmp_path / toy.WORLD_NAME
    monkeypatch.delenv(toy.CACHE_ENV)
    assert toy.default_cache_dir() == Path.home() / ".cache" / "aim-ray" / toy.WORLD_NAME


def test_eval_sets_are_fixed_and_hard_examples_held_out():
    add = toy_tasks.eval_examples("add")
    assert add == toy_tasks.eval_examples("add") and len(add) == toy_tasks.N_EVAL
    assert len({c for c, _ in add}) == len(add)
    held = toy_tasks.heldout_contexts()
    assert all(c in held for c, _ in add[1::2]) and not any(c in held for c, _ in add[::2])
    import random

    rng = random.Random(0)
    assert all(toy_tasks.training_example("add:hard", rng, held)[0] not in held for _ in range(500))
