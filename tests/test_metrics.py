"""Hypervolume, HV gain, Pareto fronts and normalised performance against hand computations."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from aim_ray.errors import ConfigError
from aim_ray.metrics import (
    forgetting,
    hv_gain,
    hv_gain_table,
    hypervolume,
    normalized_performance,
    normalized_performance_table,
    pareto_front,
)


def union_volume(points) -> float:
    """Independent oracle: inclusion-exclusion over the boxes [0, p] (exact, exponential in the point count)."""
    pts = np.asarray(points, dtype=float)
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in itertools.combinations(range(len(pts)), k):
            total += (-1) ** (k + 1) * float(np.prod(pts[list(subset)].min(axis=0)))
    return total


def axis_points(d: int, low: float = 0.2) -> np.ndarray:
    """Point i is `low` everywhere but 1.0 on axis i: every intersection of two boxes is the cube low**d."""
    pts = np.full((d, d), low)
    np.fill_diagonal(pts, 1.0)
    return pts


def test_hypervolume_2d_by_hand():
    # Two boxes 0.5x0.8 and 0.9x0.3 overlapping on 0.5x0.3.
    assert hypervolume([[0.5, 0.8], [0.9, 0.3]]) == pytest.approx(0.4 + 0.27 - 0.15)
    assert hypervolume([[0.5, 0.5]]) == pytest.approx(0.25)
    assert hypervolume(np.zeros((0, 2))) == 0.0


def test_hypervolume_3d_by_hand():
    assert hypervolume([[0.5, 0.5, 0.5], [1.0, 0.2, 0.2]]) == pytest.approx(0.125 + 0.04 - 0.5 * 0.2 * 0.2)


def test_hypervolume_6d_axis_points():
    pts = axis_points(6)
    by_hand = 0.2**6 + 6 * (0.2**5 - 0.2**6)  # the shared cube once, plus each box's own part
    assert hypervolume(pts) == pytest.approx(by_hand, rel=1e-12)
    assert union_volume(pts) == pytest.approx(by_hand, rel=1e-12)


def test_hypervolume_matches_inclusion_exclusion_on_random_6d_sets():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pts = rng.uniform(0, 1, size=(7, 6))
        assert hypervolume(pts) == pytest.approx(union_volume(pts), rel=1e-10)


def test_hv_gain_2d_extends_front():
    pop = [[0.5, 0.8], [0.9, 0.3]]
    # Staircase after adding (0.7, 0.7): 0.5*0.8 + 0.2*0.7 + 0.2*0.3 = 0.6; before: 0.52.
    assert hv_gain(pop, [0.7, 0.7]) == pytest.approx((0.6 - 0.52) ** 0.5)


def test_hv_gain_3d_and_root_d():
    gain = hv_gain([[0.5, 0.5, 0.5]], [1.0, 0.2, 0.2])
    assert gain == pytest.approx((0.04 - 0.02) ** (1 / 3))


def test_hv_gain_6d_last_axis_point():
    pts = axis_points(6)
    pop = np.vstack([np.full(6, 0.2), pts[:5]])  # base = the shared cube, five experts
    assert hv_gain(pop, pts[5]) == pytest.approx((0.2**5 - 0.2**6) ** (1 / 6), rel=1e-9)


def test_hv_gain_zero_when_nothing_added():
    pop = [[0.5, 0.8], [0.9, 0.3]]
    assert hv_gain(pop, [0.4, 0.2]) == 0.0  # dominated
    assert hv_gain(pop, [0.5, 0.3]) == 0.0  # on the boundary of the dominated region
    rng = np.random.default_rng(1)
    many = rng.uniform(0, 1, size=(20, 6))
    for row in many:  # re-adding a member: float noise must not turn into a positive gain
        assert hv_gain(many, row) == 0.0


def test_hv_gain_rejects_mismatched_dimensions():
    with pytest.raises(ConfigError, match="benchmarks"):
        hv_gain([[0.5, 0.5]], [0.5, 0.5, 0.5])


def test_pareto_front():
    pts = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]]
    assert pareto_front(pts).tolist() == [True, True, True, False, True]


def test_normalized_performance():
    merged = {"a": 0.5, "b": 0.9}
    experts = {"ea": {"a": 1.0, "b": 0.1}, "eb": {"a": 0.2, "b": 0.9}}
    assert normalized_performance(merged, experts, {"a": "ea", "b": "eb"}) == pytest.approx((0.5 + 1.0) / 2)
    assert normalized_performance(merged, {"a": 1.0, "b": 0.9}) == pytest.approx(0.75)  # task -> expert score
    with pytest.raises(ConfigError, match="no score"):
        normalized_performance({"a": 0.5}, experts, {"a": "ea", "b": "eb"})


def test_forgetting_against_the_base_by_hand():
    # dyadic scores: every difference and ratio below is exact in binary floating point
    base = {"gen": 0.5, "prose": 0.75, "math": 0.25}
    merged = {"gen": 0.25, "prose": 1.0, "math": 0.75}
    got = forgetting(merged, base, ["gen", "prose"])
    assert got == {"forgetting/gen": 0.25, "forgetting/prose": -0.25,  # lost 0.25; gained 0.25
                   "forgetting": 0.0, "general_retention": (0.5 + 4 / 3) / 2}
    assert forgetting(merged, base, ["gen", "gen"]) == {"forgetting/gen": 0.25, "forgetting": 0.25,
                                                         "general_retention": 0.5}  # listed twice, counted once
    assert forgetting(merged, base, []) == {}  # no general task: no forgetting columns
    assert forgetting(base, base, ["gen", "prose"])["general_retention"] == 1.0


def test_forgetting_guards_a_zero_base_score_and_missing_scores():
    base, merged = {"gen": 0.0, "prose": 0.5}, {"gen": 0.25, "prose": 0.25}
    got = forgetting(merged, base, ["gen", "prose"])
    assert got["forgetting/gen"] == -0.25 and got["forgetting"] == 0.0
    assert got["general_retention"] == 0.5  # "gen" has no ratio to a zero base: left out of the mean
    assert np.isnan(forgetting(merged, base, ["gen"])["general_retention"])
    with pytest.raises(ConfigError, match="the merged model has no score for general task 'nope'"):
        forgetting(merged, {**base, "nope": 0.5}, ["nope"])
    with pytest.raises(ConfigError, match="the base model has no score for general task 'nope'"):
        forgetting({**merged, "nope": 0.5}, base, ["nope"])


def _rows():
    scores = {
        "base": {"t1": 0.5, "t2": 0.5},
        "e1": {"t1": 0.9, "t2": 0.1},
        "e2": {"t1": 0.1, "t2": 0.9},
        "merged": {"t1": 0.7, "t2": 0.7},
        "bad_merge": {"t1": 0.2, "t2": 0.2},
    }
    rows = []
    for model, tasks in scores.items():
        for task, value in tasks.items():
            rows.append({"model": model, "task": task, "metric": "acc", "value": value})
            rows.append({"model": model, "task": task, "metric": "acc_norm", "value": 1.0})  # not primary
    return rows


def test_hv_gain_table_from_rows_pandas_and_arrow():
    pop_hv = union_volume([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]])
    expected = (union_volume([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9], [0.7, 0.7]]) - pop_hv) ** 0.5
    rows = _rows()
    for table in (rows, pa.Table.from_pylist(rows)):
        gains = hv_gain_table(table, population=["base", "e1", "e2"])
        assert gains == {"merged": pytest.approx(expected), "bad_merge": 0.0}
    pd = pytest.importorskip("pandas")
    assert hv_gain_table(pd.DataFrame(rows), ["base", "e1", "e2"])["merged"] == pytest.approx(expected)


def test_hv_gain_table_later_rows_win_and_missing_scores_fail():
    rows = _rows() + [{"model": "merged", "task": "t1", "metric": "acc", "value": 0.1}]
    assert hv_gain_table(rows, ["base", "e1", "e2"])["merged"] == 0.0  # (0.1, 0.7) is dominated by e2
    with pytest.raises(ConfigError, match="no score for task"):
        hv_gain_table(_rows(), ["base", "e1", "e2"], tasks=["t1", "t2", "t3"])
    with pytest.raises(ConfigError, match="population"):
        hv_gain_table(_rows(), ["base", "nobody"])


def test_normalized_performance_table():
    perf = normalized_performance_table(_rows(), {"t1": "e1", "t2": "e2"}, population=["base"])
    assert perf == {"merged": pytest.approx((0.7 / 0.9 + 0.7 / 0.9) / 2),
                    "bad_merge": pytest.approx((0.2 / 0.9 + 0.2 / 0.9) / 2)}


def test_plots_write_pngs(tmp_path):
    from aim_ray.plots import benchmark_bars, hv_gain_vs_omega, pareto_front, pareto_pairs

    rows = [r for r in _rows() if r["metric"] == "acc"]
    rows += [{"model": m, "task": "t3", "metric": "acc", "value": v}
             for m, v in {"base": 0.9, "e1": 0.3, "e2": 0.4, "merged": 0.6, "bad_merge": 0.5}.items()]
    sweep = [{"method": method, "omega": om, "hv_gain": g * (1 - om)}
             for method, g in (("ties", 0.2), ("task_arithmetic", 0.1)) for om in (0.0, 0.2, 0.4, 1.0)]
    paths = [
        pareto_pairs(rows, tmp_path / "pareto.png", population=["base", "e1", "e2"]),
        benchmark_bars(rows, tmp_path / "bars.png"),
        hv_gain_vs_omega(sweep, tmp_path / "hv.png"),
    ]
    for p in paths:
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    population = {"base": {"t1": 0.5, "t2": 0.5}, "e1": {"t1": 0.9, "t2": 0.1}}
    sweep_table = [{"variant": "ties", "omega": om, "score/t1": 0.6, "score/t2": 0.6 - om / 2, "hv_gain": 0.1}
                   for om in (0.2, 0.4)]
    wide = pareto_front(sweep_table, population, ["t1", "t2"], tmp_path / "sweep.png")
    assert wide.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="two benchmarks"):
        pareto_pairs(rows, tmp_path / "x.png", population=["base"], tasks=["t1"])
