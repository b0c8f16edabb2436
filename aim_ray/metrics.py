"""Hypervolume, HV gain, Pareto fronts and MergeBench's normalised performance (DESIGN.md section 4).

Scores are maximised and lie in [0, 1]; the reference point is the origin. moocore minimises by default, so every
call passes `maximise=True` (the origin is then dominated by every point with positive scores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import moocore
import numpy as np

from aim_ray.errors import ConfigError

# HV differences below this are float noise of moocore's exact algorithms, not volume.
_HV_EPS = 1e-12


def _points(points: Any) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ConfigError(f"scores must be a 2-D array (models x benchmarks), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError("scores contain NaN or infinite values")
    return arr


def hypervolume(points: Any) -> float:
    """Exact volume dominated by `points` (rows = models, columns = benchmarks), reference point 0."""
    arr = _points(points)
    if arr.shape[0] == 0:
        return 0.0
    arr = np.clip(arr, 0.0, None)  # a negative score dominates nothing above the origin
    return float(moocore.hypervolume(arr, ref=np.zeros(arr.shape[1]), maximise=True))


def pareto_front(points: Any) -> np.ndarray:
    """Boolean mask of the non-dominated rows (maximisation); duplicates of a front point are all kept."""
    arr = _points(points)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(arr, maximise=True, keep_weakly=True), dtype=bool)


def hv_gain(population: Any, candidate: Sequence[float]) -> float:
    """`(HV(S ∪ {M}) - HV(S)) ** (1/d)` (paper eq. 6-7); 0 when M adds no volume."""
    pop = _points(population)
    cand = _points(candidate)
    if cand.shape != (1, pop.shape[1]):
        raise ConfigError(f"candidate has {cand.shape[1]} scores, the population {pop.shape[1]} benchmarks")
    d = pop.shape[1]
    gain = hypervolume(np.vstack([pop, cand])) - hypervolume(pop)
    return float(gain ** (1.0 / d)) if gain > _HV_EPS else 0.0


def normalized_performance(
    merged: Mapping[str, float],
    experts: Mapping[str, Mapping[str, float]] | Mapping[str, float],
    expert_for_task: Mapping[str, str] | None = None,
) -> float:
    """MergeBench: mean over tasks t of merged[t] / experts[expert_for_task[t]][t].

    Without `expert_for_task`, `experts` maps each task directly to its expert's score."""
    if expert_for_task is None:
        refs = dict(experts)
    else:
        refs = {t: experts.get(e, {}).get(t) for t, e in expert_for_task.items()}
    if not refs:
        raise ConfigError("no task to normalise: expert_for_task (or the expert scores) is empty")
    ratios = []
    for task, ref in refs.items():
        if task not in merged:
            raise ConfigError(f"merged model has no score for task {task!r}")
        if ref is None:
            raise ConfigError(f"the expert of task {task!r} has no score for it")
        if ref <= 0:
            raise ConfigError(f"the expert of task {task!r} scores {ref} on it: cannot normalise by it")
        ratios.append(merged[task] / ref)
    return float(np.mean(ratios))


def forgetting(merged: Mapping[str, float], base: Mapping[str, float], general_tasks: Sequence[str]
               ) -> dict[str, float]:
    """MergeBench's forgetting: how much general ability the merged model lost against the base model.

    Returns, over `general_tasks` (the tasks no expert specialises in; none -> an empty dict):
    - `forgetting/<task>`: base score - merged score, in score points of the [0, 1] scale (positive = lost,
      negative = the merge improved on the base);
    - `forgetting`: the mean of those;
    - `general_retention`: the mean over the tasks of merged / base score (1.0 = all kept). A task the base
      scores 0 on has no ratio and is left out of this mean (NaN when every task is).

    MergeBench scores the merged models on general-ability benchmarks and reads them against the base model
    ("knowledge retention"); the copies of the paper reachable here give only its abstract, not the formula, so
    both forms are reported: the difference (`forgetting`, what the issue asks) and the ratio to the base
    (`general_retention`, the same normalisation as MergeBench's normalised performance, with the base as the
    reference)."""
    tasks = list(dict.fromkeys(general_tasks))  # a task listed twice counts once
    out: dict[str, float] = {}
    ratios = []
    for task in tasks:
        for who, scores in (("merged model", merged), ("base model", base)):
            if task not in scores:
                raise ConfigError(f"the {who} has no score for general task {task!r}")
        out[f"forgetting/{task}"] = float(base[task] - merged[task])
        if base[task] != 0:
            ratios.append(merged[task] / base[task])
    if tasks:
        lost = [out[f"forgetting/{t}"] for t in tasks]
        out["forgetting"] = float(sum(lost) / len(lost))
        out["general_retention"] = float(sum(ratios) / len(ratios)) if ratios else float("nan")
    return out


# ---- results tables (rows with model, task, value[, metric]) ----


def as_rows(table: Any) -> list[dict[str, Any]]:
    """Accept a pandas DataFrame, a pyarrow Table or an iterable of dict rows."""
    if hasattr(table, "to_pylist"):  # pyarrow.Table
        return table.to_pylist()
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas.DataFrame
        return table.to_dict("records")
    return [dict(r) for r in table]


def score_matrix(
    table: Any,
    tasks: Sequence[str] | None = None,
    metric: str | Callable[[str], str] | None = None,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """model -> task -> value, plus the task order. With a `metric` column, keep per task the rows of
    `metric` (a name, or a function of the task; default `aim_ray.evaluation.primary_metric`). A later row
    for the same (model, task) replaces an earlier one (re-evaluations append)."""
    rows = as_rows(table)
    for col in ("model", "task", "value"):
        if rows and col not in rows[0]:
            raise ConfigError(f"results table has no {col!r} column")
    if rows and "metric" in rows[0]:
        rows = _select_metric(rows, metric)
    scores: dict[str, dict[str, float]] = {}
    for r in rows:
        scores.setdefault(str(r["model"]), {})[str(r["task"])] = float(r["value"])
    order = list(tasks) if tasks is not None else sorted({t for s in scores.values() for t in s})
    return scores, order


def _select_metric(rows: list[dict[str, Any]], metric: str | Callable[[str], str] | None):
    if metric is None:
        from aim_ray.evaluation import primary_metric

        available: dict[str, set[str]] = {}
        for r in rows:
            available.setdefault(r["task"], set()).add(r["metric"])
        chosen = {t: primary_metric(t, dict.fromkeys(ms, 0.0)) for t, ms in available.items()}
        return [r for r in rows if r["metric"] == chosen[r["task"]]]
    pick = metric if callable(metric) else (lambda _task: metric)
    return [r for r in rows if r["metric"] == pick(r["task"])]


def _vector(scores: dict[str, dict[str, float]], model: str, tasks: Sequence[str]) -> list[float]:
    missing = [t for t in tasks if t not in scores.get(model, {})]
    if missing:
        raise ConfigError(f"model {model!r} has no score for task(s) {missing}")
    return [scores[model][t] for t in tasks]


def hv_gain_table(
    table: Any,
    population: Iterable[str],
    tasks: Sequence[str] | None = None,
    metric: str | Callable[[str], str] | None = None,
) -> dict[str, float]:
    """HV gain of every model of the table that is not in `population` (base + experts), over `tasks`
    (default: every task in the table)."""
    scores, order = score_matrix(table, tasks, metric)
    pop_names = list(population)
    unknown = [m for m in pop_names if m not in scores]
    if unknown:
        raise ConfigError(f"population model(s) {unknown} have no rows in the results table")
    pop = np.array([_vector(scores, m, order) for m in pop_names])
    return {m: hv_gain(pop, _vector(scores, m, order)) for m in scores if m not in pop_names}


def normalized_performance_table(
    table: Any,
    expert_for_task: Mapping[str, str],
    population: Iterable[str] = (),
    metric: str | Callable[[str], str] | None = None,
) -> dict[str, float]:
    """MergeBench normalised performance of every model that is not an expert (nor in `population`)."""
    scores, _ = score_matrix(table, list(expert_for_task), metric)
    skip = set(expert_for_task.values()) | set(population)
    return {m: normalized_performance(s, scores, expert_for_task) for m, s in scores.items() if m not in skip}
