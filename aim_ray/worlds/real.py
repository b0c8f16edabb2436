"""The real world: SmolLM2-135M-Instruct and three experts fine-tuned from it here (math, code, instruct).

Each expert is a full fine-tune of the base (every parameter, the tied embedding too) on its own skill only
(`aim_ray.worlds.real_tasks`): it learns the skill's answer format and the skill, and loses some of the base's
general ability. Training runs in one subprocess per expert with one intra-op thread each, two at a time on a
2-core machine (two threads in one process were 3-7x slower here under load); fixed seeds, so a rebuild gives the
same experts on the same machine and package versions.

The world is cached under `$AIM_RAY_CACHE/real-world-v1` (the base checkpoint beside it), built in a temporary
sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import time
from pathlib import Path

from aim_ray.checkpoint import cache_dir
from aim_ray.errors import AimRayError
from aim_ray.worlds import World, build_atomically, real_tasks
from aim_ray.worlds.smollm2 import CACHE_NAME as BASE_CACHE_NAME
from aim_ray.worlds.smollm2 import NAME as BASE_NAME
from aim_ray.worlds.smollm2 import smollm2_checkpoint

WORLD_NAME = "real-world-v1"
MANIFEST = "world.json"
TRAIN_DIR = "train"
# Steps and learning rates per expert: enough for each to beat the base by 40+ points on its task while the whole
# world builds in about 3.5 minutes on 2 cores (three trainings side by side, about 3 s per step in all). Measured:
# at lr 5e-4 and above the math expert wrecks the base (general ability 0.46 -> 0.39 at 5e-4, 0.03 at 1e-3)
# before it learns its skill; at 1e-4 it reaches 0.82.
RECIPE = {"batch_size": 16, "warmup": 5, "seed": 1, "max_grad_norm": 1.0,
          "lr": {"math": 1e-4, "code": 2e-4, "instruct": 1e-4},
          "steps": {"math": 32, "code": 24, "instruct": 12}}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                 "manifest.json")


def default_cache_dir() -> Path:
    return cache_dir() / WORLD_NAME


def build_real_world(cache_dir: str | Path | None = None, force: bool = False, echo=print,
                     progress: bool = True) -> World:
    """Return the cached real world at `cache_dir` (default: `default_cache_dir()`), building it first."""
    final = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()
    if force or not (final / MANIFEST).is_file():
        base = smollm2_checkpoint(final.parent / BASE_CACHE_NAME, echo=echo)  # beside the world, shared
        build_atomically(final, MANIFEST, lambda tmp: _build(tmp, final, base, echo, progress), force)
    return _load(final)


def _load(root: Path) -> World:
    manifest = json.loads((root / MANIFEST).read_text())
    tasks_dir = root / "tasks"
    if manifest["root"] != str(root):  # the cache was moved: the YAMLs hold absolute data paths
        real_tasks.write_yamls(tasks_dir, root / "data")
    return World(
        name=BASE_NAME,
        root=root,
        base=root.parent / BASE_CACHE_NAME,
        experts={s: root / "experts" / s for s in manifest["skills"]},
        tasks_dir=tasks_dir,
        task_names=list(manifest["task_names"]),
        expert_for_task=dict(manifest["expert_for_task"]),
        general_task=real_tasks.task_name(real_tasks.GENERAL),
        calibration=root / "calibration.jsonl",
        suite="real",
        training_data=write_training_data(root),
    )


def _build(tmp: Path, final: Path, base: Path, echo, progress: bool) -> None:
    start = time.perf_counter()
    tmp.mkdir(parents=True)
    real_tasks.write_data(tmp / "data")
    names = real_tasks.write_yamls(tmp / "tasks", final / "data")  # paths valid once renamed into place
    real_tasks.write_calibration(tmp / "calibration.jsonl")
    echo(f"fine-tuning {len(real_tasks.SKILLS)} experts from {BASE_NAME} ({', '.join(real_tasks.SKILLS)}) ...")
    train_experts(base, {s: tmp / "experts" / s for s in real_tasks.SKILLS}, progress=progress)
    manifest = {
        "version": WORLD_NAME, "root": str(final), "base": BASE_NAME, "skills": list(real_tasks.SKILLS),
        "task_names": names, "expert_for_task": {real_tasks.task_name(s): s for s in real_tasks.SKILLS},
        "recipe": RECIPE, "build_seconds": round(time.perf_counter() - start, 1),
        "versions": {"torch": _version("torch"), "transformers": _version("transformers")},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ------------------------------------------------------------------------------------------ training


def train_experts(base: Path, outs: dict[str, Path], recipe: dict | None = None, slots: int | None = None,
                  progress: bool = True) -> None:
    """Fine-tune one expert per skill, `slots` subprocesses at a time (default: all at once; the OS shares the
    cores, so the total time does not depend on how the steps split), one intra-op thread each; one progress bar
    (with ETA) over all their steps."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    recipe = recipe or RECIPE
    pending = sorted(outs, key=lambda s: -recipe["steps"][s])
    slots = slots or len(outs)
    running: dict[str, mp.process.BaseProcess] = {}
    total = sum(recipe["steps"][s] for s in outs)
    with tqdm(total=total, desc="fine-tuning experts", unit="step", disable=not progress) as bar:
        while pending or running:
            while pending and len(running) < slots:
                skill = pending.pop(0)
                args = (str(base), skill, str(outs[skill]), recipe, messages)
                running[skill] = ctx.Process(target=_train_main, args=args, daemon=True)
                running[skill].start()
            _drain(messages, bar, recipe, timeout=1.0)
            for skill, proc in list(running.items()):
                if not proc.is_alive():
                    proc.join()
                    _drain(messages, bar, recipe, timeout=0.0)
                    if proc.exitcode != 0:
                        raise AimRayError(f"fine-tuning the {skill} expert failed (exit code {proc.exitcode})")
                    del running[skill]


def _drain(messages, bar, recipe: dict, timeout: float) -> None:
    try:
        while True:
            skill, step = messages.get(timeout=timeout)
            bar.update(1)
            bar.set_postfix_str(f"{skill} {step}/{recipe['steps'][skill]}")
            timeout = 0.0
    except queue.Empty:
        pass


def _train_main(base: str, skill: str, out: str, recipe: dict, messages) -> None:
    import torch

    torch.set_num_threads(1)
    train_expert(Path(base), skill, Path(out), recipe, on_step=lambda step: messages.put((skill, step)))


def train_expert(base: Path, skill: str, out: Path, recipe: dict | None = None, on_step=lambda step: None) -> Path:
    """Full fine-tune of `base` on `skill` (loss on the answer tokens only); writes a bf16 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe or RECIPE
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    steps = recipe["steps"][skill]
    torch.manual_seed(recipe["seed"])
    batches = training_batches(skill, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"][skill], weight_decay=0.0)
    warmup = recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))
    model.train()
    for step in range(steps):
        examples = next(batches)
        ids, targets = answer_batch(tok, examples)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        keep = targets[:, 1:]
        logits = model.lm_head(hidden[keep])  # the head only where there is an answer token (1/8 of positions)
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
        opt.step()
        sched.step()
        on_step(step + 1)
    model.eval()
    save_expert(model.to(torch.bfloat16), base, out)
    return out


def training_batches(skill: str, recipe: dict | None = None):
    """The expert's training batches, in order: a fixed seed per skill, contexts held out of evaluation."""
    recipe = recipe or RECIPE
    rng = random.Random(f"{recipe['seed']}-{skill}")
    exclude = real_tasks.heldout_contexts()
    for _ in range(recipe["steps"][skill]):
        yield [real_tasks.training_example(skill, rng, exclude) for _ in range(recipe["batch_size"])]


def write_training_data(root: Path, recipe: dict | None = None) -> dict[str, Path]:
    """Each expert's own training examples (context + answer, as trained) as `root/train/<skill>.jsonl` with a
    `text` field: the per-model data of the data-aware merges (MergeBench samples the experts' training data).
    Replayed from the recipe's seeds, so a world built before this existed gets them too; written atomically."""
    out = {}
    for skill in real_tasks.SKILLS:
        path = root / TRAIN_DIR / f"{skill}.jsonl"
        if not path.is_file():
            texts = [c + t for batch in training_batches(skill, recipe) for c, t in batch]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
            os.replace(tmp, path)
        out[skill] = path
    return out


def answer_batch(tok, examples: list[tuple[str, str]]):
    """Right-padded ids and a mask of the answer tokens (+ EOS). Split as lm-eval does: the context's tokens are
    the prefix of the whole text's tokens, the rest is the answer."""
    import torch

    rows = []
    for context, target in examples:
        whole = tok(context + target).input_ids
        n_context = len(tok(context).input_ids)
        rows.append((whole + [tok.eos_token_id], n_context))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    targets = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, n_context) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        targets[i, n_context : len(row)] = True
    return ids, targets


def save_expert(model, base: Path, out: Path) -> None:
    """The expert's weights and config, with the base's tokenizer files (chat template included)."""
    model.save_pretrained(out)
    for file in sorted(base.iterdir()):
        if file.is_file() and file.name not in _WEIGHT_FILES:
            shutil.copy2(file, out / file.name)
