"""Synthetic skills of the tiny world and the lm-eval tasks that score them.

Every example is a pair `(context, target)`; a model "has" it when the target is its greedy continuation of the
context. Skills (one expert each), with an easy and a hard half:

- `add`: "add 3+5=" -> "8." (one digit, easy) / "add 27+38=" -> "65." (two digits, hard);
- `reverse`: "rev ab=" -> "ba." (2 letters, easy) / 5 letters (hard);
- `shift`: each of 4 letters to the next one, "rot abc=" -> "bcd." (letters a-m, easy / n-z, hard).

`know` is the base model's knowledge: made-up facts ("the zoba is" -> " red.") seen only in pre-training, which
fine-tuning on a skill overwrites. The base is pre-trained on the easy halves, the experts on their whole skill.

Evaluation sets are fixed (their own seeds); hard examples are held out from training, easy ones and the facts are
evaluated as taught, as knowledge benchmarks do. `aim_ray.worlds.tasks` writes the lm-eval tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from aim_ray.worlds.tasks import write_task_data, write_task_yamls

SKILLS = ("add", "reverse", "shift")
GENERAL = "know"
KINDS = (*SKILLS, GENERAL)
GROUP = "toy"
N_FACTS = 80
N_EVAL = 200

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold")
_FACT_SEED = 7
_EVAL_SEED = 1234

Example = tuple[str, str]


def task_name(kind: str) -> str:
    return f"toy_{kind}"


def _word(rng: random.Random, n: int, letters: str) -> str:
    return "".join(rng.choice(letters) for _ in range(n))


def _facts() -> dict[str, str]:
    rng = random.Random(_FACT_SEED)
    names: set[str] = set()
    while len(names) < N_FACTS:
        names.add("".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2)))
    return {name: rng.choice(_COLORS) for name in sorted(names)}


FACTS = _facts()
_ENTITIES = sorted(FACTS)


def _add(rng: random.Random, hard: bool) -> Example:
    hi = 49 if hard else 9
    a, b = rng.randint(10 if hard else 0, hi), rng.randint(10 if hard else 0, hi)
    return f"add {a}+{b}=", f"{a + b}."


def _reverse(rng: random.Random, hard: bool) -> Example:
    s = _word(rng, 5 if hard else 2, _LETTERS)
    return f"rev {s}=", s[::-1] + "."


def _shift(rng: random.Random, hard: bool) -> Example:
    s = _word(rng, 4, _LETTERS[13:] if hard else _LETTERS[:13])
    return f"rot {s}=", "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in s) + "."


def _know(rng: random.Random, hard: bool = False) -> Example:
    e = rng.choice(_ENTITIES)
    return f"the {e} is", f" {FACTS[e]}."


_SUBJ = ("the cat", "a dog", "the bird", "my friend", "the king", "a child")
_VERB = ("sees", "likes", "finds", "takes", "wants")
_ADJ = ("small", "red", "old", "big", "new")
_OBJ = ("ball", "tree", "house", "book", "road", "cake")


def _text(rng: random.Random, hard: bool = False) -> Example:
    """Generic synthetic text for pre-training (no context: the whole sentence is predicted)."""
    return "", f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} the {rng.choice(_ADJ)} {rng.choice(_OBJ)}."


GENERATORS: dict[str, Callable[[random.Random, bool], Example]] = {
    "add": _add, "reverse": _reverse, "shift": _shift, "know": _know, "text": _text,
}


def _distinct(kind: str, hard: bool, n: int) -> list[Example]:
    rng = random.Random(f"{_EVAL_SEED}-{kind}-{hard}")
    seen: dict[str, str] = {}
    while len(seen) < n:
        context, target = GENERATORS[kind](rng, hard)
        seen.setdefault(context, target)
    return list(seen.items())


def eval_examples(kind: str, n: int = N_EVAL) -> list[Example]:
    """The fixed evaluation set of a task: all facts for `know`; for a skill, easy and hard examples
    alternating (so that lm-eval's `limit`, which keeps the first docs, keeps the mix)."""
    if kind == GENERAL:
        return [(f"the {e} is", f" {FACTS[e]}.") for e in _ENTITIES]
    easy, hard = _distinct(kind, False, n // 2), _distinct(kind, True, n - n // 2)
    return [ex for pair in zip(easy, hard, strict=True) for ex in pair]


def heldout_contexts() -> set[str]:
    """Hard skill contexts that training must never show. Easy ones are evaluated as taught (like the facts):
    the base learns them in pre-training, so it knows each skill in part."""
    return {c for kind in SKILLS for c, _ in _distinct(kind, True, N_EVAL - N_EVAL // 2)}


def training_example(source: str, rng: random.Random, exclude: set[str]) -> Example:
    """One example of `source`: "text", "know", or "<skill>:easy" / "<skill>:hard"."""
    kind, _, level = source.partition(":")
    while True:
        context, target = GENERATORS[kind](rng, level == "hard")
        if context not in exclude:
            return context, target


def write_data(data_dir: Path) -> dict[str, Path]:
    """One JSONL file per task (fields `context`, `target`); returns task name -> file."""
    return write_task_data(data_dir, {task_name(kind): eval_examples(kind) for kind in KINDS})


def write_yamls(tasks_dir: Path, data_dir: Path) -> list[str]:
    """Write the lm-eval YAMLs pointing at `data_dir` (absolute, as the tasks will read it); return task names."""
    return write_task_yamls(tasks_dir, data_dir, [task_name(kind) for kind in KINDS], GROUP)
