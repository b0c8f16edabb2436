"""The real world's four domains and the lm-eval tasks that score them.

Three skills, one expert each, the paper's domains in miniature (data generated with fixed seeds):

- `math`: arithmetic word problems with a numeric answer ("Tom has 7 cups and gets 5 more. ..." -> " 12");
- `code`: what a short Python snippet prints (`print(max([3, 8, 2]))` -> " 8");
- `instruct`: instructions with a checkable answer, in IFEval's style: all capitals, a word exactly N times,
  the first N words of a list, a JSON object with given keys.

`general` is what the base already does well, on real English text that nobody here wrote: predict the next word
of a passage of Python's own documentation (`pydoc_data`), where the word occurred earlier in the passage (as in
LAMBADA). Calibration text comes from the same documentation, from a disjoint set of topics.

Every example is a pair `(context, target)`; a model "has" it when the target is its greedy continuation, which is
what lm-eval's `acc` of a loglikelihood task measures (one forward pass, no generation loop).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from aim_ray.worlds.tasks import write_task_data, write_task_yamls

SKILLS = ("math", "code", "instruct")
GENERAL = "general"
KINDS = (*SKILLS, GENERAL)
GROUP = "real"
N_EVAL = {"math": 40, "code": 40, "instruct": 40, "general": 50}  # one evaluation: ~20 s on one core
GENERAL_CONTEXT_WORDS = 20
_EVAL_SEED = 2024

Example = tuple[str, str]

_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma", "Leo", "Zoe", "Omar", "Nina")
_OBJECTS = ("apple", "book", "coin", "pen", "card", "ball", "cup", "shell", "stone", "toy", "egg", "key")
_CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Berlin")
_WORDS = ("house", "river", "green", "table", "music", "light", "water", "paper", "garden", "window", "summer",
          "school", "bread", "train", "cloud", "horse", "chair", "money", "story", "dream", "apple", "ocean",
          "silver", "forest", "winter", "planet", "orange", "bridge", "island", "market")


def task_name(kind: str) -> str:
    return f"real_{kind}"


def _math(rng: random.Random) -> Example:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    name, thing = rng.choice(_NAMES), rng.choice(_OBJECTS)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing}s and gets {b} more. How many {thing}s now?\nAnswer:", f" {a + b}"
    return f"{name} has {a + b} {thing}s and gives away {b}. How many {thing}s left?\nAnswer:", f" {a}"


def _code(rng: random.Random) -> Example:
    kind, words = rng.randrange(5), rng.sample(_WORDS, 2)
    items = [rng.randint(1, 9) for _ in range(rng.randint(3, 5))]
    if kind == 0:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        snippet, out = f"x = {a}\nx = x + {b}\nprint(x)", str(a + b)
    elif kind == 1:
        i = rng.randrange(len(items))
        snippet, out = f"a = {items}\nprint(a[{i}])", str(items[i])
    elif kind == 2:
        snippet, out = f"print(max({items}))", str(max(items))
    elif kind == 3:
        snippet, out = f'print("{words[0]}" + "{words[1]}")', words[0] + words[1]
    else:
        snippet, out = f'print("{words[0]}".upper())', words[0].upper()
    return f"Python code:\n{snippet}\nIt prints:", f" {out}"


def _instruct(rng: random.Random) -> Example:
    kind, words = rng.randrange(4), rng.sample(_WORDS, 4)
    if kind == 0:
        return f"Write in capital letters: {' '.join(words[:3])}\nResponse:", " " + " ".join(words[:3]).upper()
    if kind == 1:
        n = rng.randint(2, 4)
        return f"Write the word {words[0]} exactly {n} times.\nResponse:", " " + " ".join([words[0]] * n)
    if kind == 2:
        n = rng.randint(1, 3)
        return f"Answer with exactly {n} words, the first {n} of: {' '.join(words)}\nResponse:", \
            " " + " ".join(words[:n])
    name, city = rng.choice(_NAMES), rng.choice(_CITIES)
    return (f'Give a JSON object with the keys "name" and "city" for {name} from {city}.\nResponse:',
            " " + json.dumps({"name": name, "city": city}))


GENERATORS: dict[str, Callable[[random.Random], Example]] = {"math": _math, "code": _code, "instruct": _instruct}


# ------------------------------------------------------------------------------------------ real English text


def _topic_half(topic: str) -> str:
    """Each documentation topic belongs to the evaluation half or the calibration half, by a stable hash."""
    return "eval" if hashlib.sha256(topic.encode()).digest()[0] % 2 == 0 else "calibration"


@cache
def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {k: re.sub(r"\s+", " ", v).strip() for k, v in sorted(topics.items())}


def _general_items() -> list[Example]:
    """Next-word items from the evaluation topics: the previous GENERAL_CONTEXT_WORDS words, then a lower-case
    word of 4+ letters that already occurred in them."""
    items = []
    for topic, text in _topics().items():
        if _topic_half(topic) != "eval":
            continue
        words = text.split(" ")
        for i in range(GENERAL_CONTEXT_WORDS, len(words)):
            window = words[i - GENERAL_CONTEXT_WORDS : i]
            if re.fullmatch(r"[a-z]{4,}", words[i]) and words[i] in window:
                items.append((" ".join(window), " " + words[i]))
    return items


def calibration_texts(max_chars: int = 1200) -> list[str]:
    """Passages of the calibration topics (disjoint from the evaluated ones), at most `max_chars` each."""
    out = []
    for topic, text in _topics().items():
        if _topic_half(topic) == "calibration":
            out.extend(text[i : i + max_chars].strip() for i in range(0, len(text), max_chars))
    return [t for t in out if t]


# ------------------------------------------------------------------------------------------ datasets


def _distinct(kind: str, n: int, seed: str) -> list[Example]:
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    while len(seen) < n:
        context, target = GENERATORS[kind](rng)
        seen.setdefault(context, target)
    return list(seen.items())


@cache
def eval_examples(kind: str) -> list[Example]:
    """The fixed evaluation set of a task (its own seed; never shown in training)."""
    if kind == GENERAL:
        items = _general_items()
        random.Random(_EVAL_SEED).shuffle(items)
        return items[: N_EVAL[kind]]
    return _distinct(kind, N_EVAL[kind], f"{_EVAL_SEED}-{kind}")


def heldout_contexts() -> set[str]:
    return {c for kind in SKILLS for c, _ in eval_examples(kind)}


def training_example(kind: str, rng: random.Random, exclude: set[str]) -> Example:
    while True:
        context, target = GENERATORS[kind](rng)
        if context not in exclude:
            return context, target


def write_data(data_dir: Path) -> dict[str, Path]:
    """One JSONL file per task (fields `context`, `target`); returns task name -> file."""
    return write_task_data(data_dir, {task_name(kind): eval_examples(kind) for kind in KINDS})


def write_calibration(path: Path) -> Path:
    """The calibration set as a local .jsonl with a `text` field (the format of pile-val)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts()))
    return path


def write_yamls(tasks_dir: Path, data_dir: Path) -> list[str]:
    return write_task_yamls(tasks_dir, data_dir, [task_name(k) for k in KINDS], GROUP)
