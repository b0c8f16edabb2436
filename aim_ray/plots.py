"""PNG figures of evaluation results: Pareto fronts per pair of benchmarks, per-benchmark bars, HV gain vs 1-omega.

Inputs are plain results rows (dicts, a pandas DataFrame or a pyarrow Table with model, task, value[, metric]).
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from aim_ray import metrics
from aim_ray.errors import ConfigError

_POP_COLOR = "#4C72B0"
_MERGED_COLOR = "#DD8452"


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def _staircase(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D Pareto front (maximisation) as a step line from the y axis to the x axis."""
    front = points[metrics.pareto_front(points)]
    front = front[np.lexsort((front[:, 0], -front[:, 1]))]  # y descending (so x ascending)
    xs, ys = [0.0], [front[0, 1]]
    for i, (x, y) in enumerate(front):  # right at height y to x, then down to the next point's height
        nxt = front[i + 1, 1] if i + 1 < len(front) else 0.0
        xs += [x, x]
        ys += [y, nxt]
    return np.array(xs), np.array(ys)


def _pair_axes(ax, scores, population: Sequence[str], merged: Sequence[str], x: str, y: str) -> None:
    pop = np.array([[scores[m][x], scores[m][y]] for m in population])
    sx, sy = _staircase(pop)
    ax.fill_between(sx, sy, step=None, color=_POP_COLOR, alpha=0.08)
    ax.plot(sx, sy, color=_POP_COLOR, lw=1, ls="--")
    ax.scatter(pop[:, 0], pop[:, 1], s=45, color=_POP_COLOR, label="base + experts", zorder=3)
    for name, (px, py) in zip(population, pop, strict=True):
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if merged:
        pts = np.array([[scores[m][x], scores[m][y]] for m in merged])
        ax.scatter(pts[:, 0], pts[:, 1], s=60, marker="*", color=_MERGED_COLOR, label="merged", zorder=4)
        if len(merged) <= 12:
            for name, (px, py) in zip(merged, pts, strict=True):
                ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=_MERGED_COLOR)
    ax.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel=x, ylabel=y)
    ax.grid(alpha=0.3)


def pareto_pairs(rows: Any, path: str | Path, population: Iterable[str], merged: Iterable[str] | None = None,
                 tasks: Sequence[str] | None = None, metric: str | None = None, title: str | None = None) -> Path:
    """One scatter per pair of benchmarks: population (base + experts) with its Pareto front, merged models
    highlighted. `merged` defaults to every model of the table outside the population."""
    scores, order = metrics.score_matrix(rows, tasks, metric)
    pop = list(population)
    others = list(merged) if merged is not None else [m for m in scores if m not in pop]
    return _draw_pairs(scores, pop, others, order, path, title)


def pareto_front(table: Any, population: Mapping[str, Mapping[str, float]] | Iterable[str],
                 tasks: Sequence[str], path: str | Path, title: str | None = None) -> Path:
    """`pareto_pairs` for a sweep: `table` is long rows (model, task, value) or wide, one row per merged
    model with `score/<task>` columns (a Tune results table; rows named by `model`, else `variant` and
    `omega`); `population` maps model -> task -> score, or names models of a long table."""
    order = list(tasks)
    if isinstance(population, Mapping):
        scores = {str(m): {t: float(s[t]) for t in order if t in s} for m, s in population.items()}
        pop = list(scores)
    else:
        scores, pop = {}, list(population)
    records = metrics.as_rows(table)
    if records and any(str(k).startswith("score/") for k in records[0]):
        for i, r in enumerate(records):
            scores[_trial_name(r, i)] = {t: float(r[f"score/{t}"]) for t in order if f"score/{t}" in r}
    else:
        long_scores, _ = metrics.score_matrix(records, order)
        scores.update(long_scores)
    return _draw_pairs(scores, pop, [m for m in scores if m not in pop], order, path, title)


def _trial_name(row: Mapping[str, Any], i: int) -> str:
    if row.get("model") is not None:
        return str(row["model"])
    if row.get("variant") is not None and row.get("omega") is not None:
        return f"{row['variant']} w={float(row['omega']):g}"
    return f"trial {i}"


def _draw_pairs(scores: dict[str, dict[str, float]], pop: list[str], others: list[str], order: list[str],
                path: str | Path, title: str | None) -> Path:
    _require(scores, [*pop, *others], order)
    pairs = list(itertools.combinations(order, 2))
    if not pairs:
        raise ConfigError(f"a Pareto plot needs at least two benchmarks, got {order}")
    cols = min(3, len(pairs))
    rows_n = math.ceil(len(pairs) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows_n))
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, (x, y) in zip(axes, pairs, strict=False):
        _pair_axes(ax, scores, pop, others, x, y)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for the figure, clear of the points
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title or "Pareto fronts per pair of benchmarks")
    return _save(fig, path)


def benchmark_bars(rows: Any, path: str | Path, models: Sequence[str] | None = None,
                   tasks: Sequence[str] | None = None, metric: str | None = None, title: str | None = None) -> Path:
    """Grouped bars: one group per benchmark, one bar per model."""
    scores, order = metrics.score_matrix(rows, tasks, metric)
    names = list(models) if models is not None else list(scores)
    _require(scores, names, order)
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(max(6.0, 1.2 * len(order) * max(1, len(names)) * 0.45 + 2), 4.2))
    ax = fig.subplots()
    xs = np.arange(len(order))
    for i, name in enumerate(names):
        ax.bar(xs + (i - (len(names) - 1) / 2) * width, [scores[name][t] for t in order], width, label=name)
    ax.set_xticks(xs, order)
    ax.set(ylim=(0, 1.05), ylabel="score", title=title or "Score per benchmark")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return _save(fig, path)


def hv_gain_vs_omega(rows: Iterable[Mapping[str, Any]] | Any, path: str | Path, title: str | None = None) -> Path:
    """One line per method (per `variant` when the rows have one, e.g. ties density=0.5): HV gain against
    1 - omega (0 = plain merge, 1 = strongest relaxation)."""
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in metrics.as_rows(rows):
        label = r.get("variant") if r.get("variant") is not None else r.get("method")
        if label is None or "omega" not in r or "hv_gain" not in r:
            raise ConfigError("hv_gain_vs_omega needs method (or variant), omega and hv_gain columns")
        by_method.setdefault(str(label), []).append((1.0 - float(r["omega"]), float(r["hv_gain"])))
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for method, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set(xlabel="1 - omega (relaxation strength)", ylabel="HV gain", xlim=(-0.02, 1.02),
           title=title or "HV gain vs relaxation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _require(scores: dict[str, dict[str, float]], models: Sequence[str], tasks: Sequence[str]) -> None:
    for m in models:
        missing = [t for t in tasks if t not in scores.get(m, {})]
        if missing:
            raise ConfigError(f"model {m!r} has no score for task(s) {missing}")
