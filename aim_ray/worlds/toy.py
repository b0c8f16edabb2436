"""A tiny world of experts with real skills, built on one CPU core in about 80 s.

A small Llama base is pre-trained on generic synthetic text, made-up facts (its "knowledge") and the easy half of
each skill; each expert is the base fine-tuned on its whole skill and nothing else (see `aim_ray.toy_tasks`).
Fine-tuning lifts the expert's own skill close to 100% (the base scores about 50%, the easy half) and overwrites
knowledge and other skills, so merges face real trade-offs.

The world is cached under `$AIM_RAY_CACHE/toy-world-v1` (default `~/.cache/aim-ray/toy-world-v1`). A build runs in
a temporary sibling directory that is renamed into place only when complete, so an interrupted build is never
taken for a cached world. Training is deterministic: fixed seeds and one intra-op thread (reductions then do
not depend on the number of cores).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from aim_ray.checkpoint import cache_dir
from aim_ray.worlds import World, build_atomically, toy_tasks
from aim_ray.worlds.tiny import build_model, build_tokenizer, save_model, tiny_config

WORLD_NAME = "toy-world-v1"
CACHE_ENV = "AIM_RAY_CACHE"  # the cache root (checkpoint.cache_dir)
MANIFEST = "world.json"

# The base learns only the easy half of each skill, so it scores about 50% on every skill task for structural
# reasons (not by where a short training run happens to stop); each expert clearly beats it on its own skill and
# loses elsewhere. Measured scores are in the manifest (build_scores) and checked in tests/test_toy.py.
PRETRAIN_MIX = {"text": 1.0, "know": 1.0, "add:easy": 0.2, "reverse:easy": 0.2, "shift:easy": 0.2}
MODEL = {"family": "llama", "hidden_size": 128, "num_layers": 2}
PRETRAIN = {"steps": 800, "lr": 3e-3, "batch_size": 64, "seed": 0}
FINETUNE = {"steps": 250, "lr": 1e-3, "batch_size": 64, "seed": 1}
FINETUNE_MIX = {"hard": 1.0, "easy": 0.3}  # an expert masters its whole skill and trains on nothing else
_WARMUP = 20
_PAD = 3  # tiny.tiny_config's pad_token_id


ToyWorld = World


def default_cache_dir() -> Path:
    return cache_dir() / WORLD_NAME


def build_toy_world(cache_dir: str | Path | None = None, force: bool = False) -> ToyWorld:
    """Return the cached world at `cache_dir` (default: `default_cache_dir()`), building it first if needed."""
    final = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()
    build_atomically(final, MANIFEST, lambda tmp: _build(tmp, final), force)
    return _load(final)


def _load(root: Path) -> ToyWorld:
    manifest = json.loads((root / MANIFEST).read_text())
    tasks_dir = root / "tasks"
    if manifest["root"] != str(root):  # the cache was moved: the YAMLs hold absolute data paths
        toy_tasks.write_yamls(tasks_dir, root / "data")
    return World(
        name="toy 2-layer Llama",
        root=root,
        base=root / "base",
        experts={s: root / "experts" / s for s in manifest["skills"]},
        tasks_dir=tasks_dir,
        task_names=list(manifest["task_names"]),
        expert_for_task=dict(manifest["expert_for_task"]),
        general_task=toy_tasks.task_name(toy_tasks.GENERAL),
        calibration=calibration_text(root / "calibration.jsonl"),
        suite="toy",
        build_scores=manifest.get("build_scores", {}),
    )


def calibration_text(path: Path, n: int = 400) -> Path:
    """Task-agnostic calibration data for the toy world: its generic synthetic text (the role pile-val plays
    for real models), as a local .jsonl with a `text` field. Written on first use (older caches lack it)."""
    if not path.exists():
        rng = random.Random(42)
        lines = [json.dumps({"text": toy_tasks.GENERATORS["text"](rng, False)[1]}) for _ in range(n)]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return path


@contextmanager
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _build(tmp: Path, final: Path) -> None:
    start = time.perf_counter()
    tmp.mkdir(parents=True)
    tok = build_tokenizer(tmp / "tokenizer", vocab_size=256)  # byte-level: one token per character
    toy_tasks.write_data(tmp / "data")
    names = toy_tasks.write_yamls(tmp / "tasks", final / "data")  # paths valid once renamed into place
    exclude = toy_tasks.heldout_contexts()
    config = tiny_config(MODEL["family"], vocab_size=len(tok), hidden_size=MODEL["hidden_size"],
                         num_layers=MODEL["num_layers"])
    with _single_thread():
        base = build_model(config, seed=PRETRAIN["seed"])
        _train(base, tok, PRETRAIN_MIX, exclude, **PRETRAIN)
        models = {"base": base}
        for skill in toy_tasks.SKILLS:
            expert = copy.deepcopy(base)
            mix = {f"{skill}:{level}": w for level, w in FINETUNE_MIX.items()}
            _train(expert, tok, mix, exclude, **FINETUNE)
            models[skill] = expert
        scores = {name: _task_scores(model, tok) for name, model in models.items()}
    save_model(models.pop("base"), tmp / "base", tmp / "tokenizer")
    for skill, model in models.items():
        save_model(model, tmp / "experts" / skill, tmp / "tokenizer")
    manifest = {
        "version": WORLD_NAME, "root": str(final), "skills": list(toy_tasks.SKILLS), "task_names": names,
        "expert_for_task": {toy_tasks.task_name(s): s for s in toy_tasks.SKILLS},
        "build_scores": scores, "build_seconds": round(time.perf_counter() - start, 1),
        "recipe": {"model": MODEL, "pretrain": PRETRAIN, "pretrain_mix": PRETRAIN_MIX, "finetune": FINETUNE,
                   "finetune_mix": FINETUNE_MIX},
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _batch(tok, rng: random.Random, mix: dict[str, float], exclude: set[str], size: int):
    """Right-padded token ids and a loss mask on the targets (prompts of random strings are unpredictable)."""
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=size)
    rows = []
    for kind in kinds:
        context, target = toy_tasks.training_example(kind, rng, exclude)
        ctx = tok(context).input_ids if context else []
        tgt = tok(target).input_ids
        rows.append((ctx + tgt, [0.0] * len(ctx) + [1.0] * len(tgt)))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((size, width), _PAD)
    mask = torch.zeros(size, width)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_mask)] = torch.tensor(row_mask)
    return ids, mask


def _train(model, tok, mix, exclude, *, steps: int, lr: float, batch_size: int, seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / _WARMUP) * (1 - s / steps))
    model.train()
    for _ in range(steps):
        ids, mask = _batch(tok, rng, mix, exclude, batch_size)
        logits = model(input_ids=ids).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        loss = (losses * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def greedy_accuracy(model, tok, examples: list[tuple[str, str]], batch_size: int = 100) -> float:
    """Share of examples whose target is the model's greedy continuation (what lm-eval's loglikelihood acc
    reports for these tasks; computed here without lm-eval)."""
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        pairs = [(tok(c).input_ids, tok(t).input_ids) for c, t in chunk]
        width = max(len(c) + len(t) for c, t in pairs)
        ids = torch.full((len(pairs), width), _PAD)
        for j, (c, t) in enumerate(pairs):
            ids[j, : len(c) + len(t)] = torch.tensor(c + t)
        pred = model(input_ids=ids).logits.argmax(-1)
        for j, (c, t) in enumerate(pairs):
            hits += int(torch.equal(pred[j, len(c) - 1 : len(c) + len(t) - 1], torch.tensor(t)))
    return hits / len(examples)


def _task_scores(model, tok) -> dict[str, float]:
    return {toy_tasks.task_name(k): round(greedy_accuracy(model, tok, toy_tasks.eval_examples(k)), 4)
            for k in toy_tasks.KINDS}
