"""lm-eval YAML tasks of the worlds: one loglikelihood task per JSONL file (`context`, `target`) and a group."""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

_TEMPLATES = Path(__file__).parent / "templates"


def write_task_data(data_dir: Path, examples: dict[str, list[tuple[str, str]]]) -> dict[str, Path]:
    """One JSONL file per task (fields `context`, `target`); returns task name -> file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, pairs in examples.items():
        files[name] = data_dir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in pairs))
    return files


def write_task_yamls(tasks_dir: Path, data_dir: Path, names: list[str], group: str) -> list[str]:
    """Write one task YAML per name, reading `data_dir/<name>.jsonl` by absolute path (datasets resolves
    relative data_files against the working directory, not the YAML), and the group; returns the names."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    task_tmpl = Template((_TEMPLATES / "task.yaml.tmpl").read_text())
    group_tmpl = Template((_TEMPLATES / "group.yaml.tmpl").read_text())
    for name in names:
        data_file = json.dumps(str(Path(data_dir).absolute() / f"{name}.jsonl"))  # a valid YAML string
        (tasks_dir / f"{name}.yaml").write_text(task_tmpl.substitute(task=name, data_file=data_file))
    task_list = "\n".join(f"  - {name}" for name in names)
    (tasks_dir / f"{group}.yaml").write_text(group_tmpl.substitute(group=group, task_list=task_list))
    return list(names)
