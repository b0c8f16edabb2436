"""The SVD merges (tsv, iso_c, iso_cts) against float64 numpy recomputations of the authors' formulas.

The references below follow the layout of the authors' code (zero-padded buffers of r columns, the SVD of the
padded concatenation for the polar factor), not aim-ray's, with the one rule aim-ray adds: a singular
direction is kept only when its singular value exceeds max(m, n) * eps_float32 * |M|_F (`subspace.rank`), a
dropped one is zeroed. Tolerance: max |got - ref| <= 2e-5 * max |ref| (float32 SVDs against float64 ones; the
largest measured is 7.6e-6: the polar factor of a near-square concatenation amplifies float32's rounding by about
1 / its smallest singular value).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aim_ray.checkpoint import Checkpoint
from aim_ray.cli import main
from aim_ray.errors import ConfigError
from aim_ray.methods import get_method, resolve_params
from aim_ray.methods.iso import common_and_task_dims
from aim_ray.scales import Scales

try:
    from tests.inmemory import InMemoryInputs
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from inmemory import InMemoryInputs

EPS32 = float(np.finfo(np.float32).eps)
RTOL = 2e-5
NAME = "model.layers.0.mlp.up_proj.weight"


# ------------------------------------------------------------------------------ float64 references


def _svd(m: np.ndarray):
    return np.linalg.svd(m, full_matrices=False)


def _kept(s: np.ndarray, shape, scale: float) -> np.ndarray:
    return s > max(shape) * EPS32 * scale


def _polar(a: np.ndarray) -> np.ndarray:
    p, s, qh = _svd(a)
    keep = _kept(s, a.shape, s.max()) if s.size else s > 0
    return p[:, keep] @ qh[keep]


def ref_average(taus, weights, alpha):
    return alpha * sum(w * t for w, t in zip(weights, taus)) / len(taus)


def ref_tsv(taus, weights, alpha):
    taus = [w * t for w, t in zip(weights, taus)]
    n = len(taus)
    rows, cols = taus[0].shape
    k = max(1, min(rows, cols) // n)
    sum_u, sum_s, sum_v = np.zeros((rows, n * k)), np.zeros(n * k), np.zeros((n * k, cols))
    for i, tau in enumerate(taus):
        u, s, vh = _svd(tau)
        keep = _kept(s, tau.shape, np.linalg.norm(tau))[:k]
        sum_u[:, i * k:(i + 1) * k] = u[:, :k] * keep
        sum_s[i * k:(i + 1) * k] = s[:k] * keep
        sum_v[i * k:(i + 1) * k] = vh[:k] * keep[:, None]
    return alpha * _polar(sum_u) @ np.diag(sum_s) @ _polar(sum_v)


def ref_iso_c(taus, weights, alpha):
    total = sum(w * t for w, t in zip(weights, taus))
    u, s, vh = _svd(total)
    keep = _kept(s, total.shape, np.linalg.norm(total))
    return alpha * (s * keep).mean() * (u[:, keep] @ vh[keep])


def ref_iso_cts(taus, weights, alpha, common_space_fraction=0.8):
    taus = [w * t for w, t in zip(weights, taus)]
    n = len(taus)
    total = sum(taus)
    r = min(total.shape)
    common = int(r * common_space_fraction)  # the authors' sizes: the task-specific part divisible by n
    specific = round((r - common) / n) * n
    specific = specific - n if specific > r else specific
    common, per_task = r - specific, specific // n
    u, s, vh = _svd(total)
    keep = _kept(s, total.shape, np.linalg.norm(total))
    u_c, s_c, vh_c = u[:, :common] * keep[:common], s[:common] * keep[:common], vh[:common] * keep[:common, None]
    comb_u, comb_s, comb_v = np.zeros((total.shape[0], r)), np.zeros(r), np.zeros((r, total.shape[1]))
    for i, tau in enumerate(taus):
        residual = tau - u_c @ u_c.T @ tau
        ut, st, vht = _svd(residual)
        kt = _kept(st, tau.shape, np.linalg.norm(tau))[:per_task]
        comb_u[:, i * per_task:(i + 1) * per_task] = ut[:, :per_task] * kt
        comb_s[i * per_task:(i + 1) * per_task] = st[:per_task] * kt
        comb_v[i * per_task:(i + 1) * per_task] = vht[:per_task] * kt[:, None]
    comb_u[:, n * per_task:] = u_c
    comb_s[n * per_task:] = s_c
    comb_v[n * per_task:] = vh_c
    return alpha * comb_s.mean() * _polar(comb_u) @ _polar(comb_v)


REFS = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}


# ------------------------------------------------------------------------------------------- helpers


def run(method: str, inputs: InMemoryInputs, weights=None, **shared) -> torch.Tensor:
    m = get_method(method)
    per = [{} if weights is None else {"weight": w} for w in (weights or [None] * inputs.n_experts)]
    return m.fn(inputs, resolve_params(m, per, shared))


def assert_matches(got: torch.Tensor, want: np.ndarray, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    err = np.abs(got.double().numpy() - want).max()
    assert err <= rtol * np.abs(want).max(), (err, np.abs(want).max())


def random_inputs(shape, n, seed, rank=None, name=NAME) -> InMemoryInputs:
    """Base 0 (so tau is the expert exactly, and a low-rank tau stays low-rank in float32), experts of the
    given rank (full when None)."""
    g = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(n):
        if rank is None:
            experts.append(0.02 * torch.randn(*shape, generator=g))
        else:
            experts.append(0.02 * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g))
    return InMemoryInputs(name, torch.zeros(shape), experts)


def taus64(inputs: InMemoryInputs) -> list[np.ndarray]:
    return [t.double().numpy() for t in inputs.stacked_tau()]


SHAPES = {"tall": ((48, 20), None), "wide": ((20, 48), None), "square": ((32, 32), None),
          "rank_deficient": ((40, 30), 3)}


# --------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_matches_float64_reference(method, n, case):
    shape, rank = SHAPES[case]
    inputs = random_inputs(shape, n, seed=n * 10 + len(case), rank=rank)
    weights = [1.0, 0.5, -0.8][:n]
    got = run(method, inputs, weights, alpha=1.3)
    assert_matches(got, REFS[method](taus64(inputs), weights, 1.3))


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
def test_iso_cts_with_low_rank_tasks_and_fractions(fraction):
    """Rank-8 tasks on a 40 x 30 matrix: the sum has rank 24, so each task keeps directions outside the common
    subspace at fraction 0.5, none at 0.95 (common 29 > rank 24: the padded directions are dropped). At 0.5 the
    concatenated V has rank 24 of 30 with smallest nonzero singular value 0.08: float32 error 2.3e-5 (the same
    code in float64 agrees to 1e-14), hence 1e-4 here."""
    inputs = random_inputs((40, 30), 3, seed=4, rank=8)
    got = run("iso_cts", inputs, common_space_fraction=fraction)
    assert_matches(got, ref_iso_cts(taus64(inputs), [1.0] * 3, 1.0, fraction), rtol=1e-4)


def test_iso_cts_reduces_to_iso_c_when_no_task_dims_are_left():
    inputs = random_inputs((10, 10), 4, seed=5)  # r = 10, T = 4: c0 = 8, round(0.5) = 0 task dims
    assert common_and_task_dims(10, 4, 0.8) == (10, 0)
    torch.testing.assert_close(run("iso_cts", inputs), run("iso_c", inputs), rtol=0, atol=1e-6)
    assert inputs.reads == [2] * 4  # iso_cts's sum, then iso_c's: no residual pass without task dims


@pytest.mark.parametrize("r,n,fraction,expected", [
    (64, 3, 0.8, (52, 4)),  # c0 = 51; round(13 / 3) = 4
    (30, 2, 0.5, (14, 8)),  # c0 = 15; round(7.5) = 8 (half to even)
    (10, 4, 0.8, (10, 0)),  # c0 = 8; round(0.5) = 0
    (2, 3, 0.1, (2, 0)),  # c0 = 0; round(2 / 3) * 3 = 3 > r: one T less
    (576, 3, 0.8, (459, 39)),  # c0 = 460; round(116 / 3) = 39
])
def test_common_and_task_dims(r, n, fraction, expected):
    assert common_and_task_dims(r, n, fraction) == expected


def test_tsv_of_identical_experts_is_the_truncated_task_vector():
    """[U_k, U_k] is rank-deficient: the partial isometry gives U_k S_k V_k^T (the authors' code: LAPACK's
    arbitrary completion added)."""
    g = torch.Generator().manual_seed(6)
    tau = 0.02 * torch.randn(24, 16, generator=g)
    inputs = InMemoryInputs(NAME, torch.zeros(24, 16), [tau, tau])
    u, s, vh = np.linalg.svd(tau.double().numpy(), full_matrices=False)
    assert_matches(run("tsv", inputs), u[:, :8] @ np.diag(s[:8]) @ vh[:8])


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_zero_task_vectors_give_zero(method):
    inputs = InMemoryInputs(NAME, torch.ones(12, 8), [torch.ones(12, 8)] * 2)
    assert torch.equal(run(method, inputs), torch.zeros(12, 8))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("name,shape", [("model.layers.0.input_layernorm.weight", (32,)),
                                        ("model.layers.0.self_attn.q_proj.bias", (32,)),
                                        ("model.embed_tokens.weight", (50, 16))])
def test_other_tensors_are_the_weighted_mean_exactly(method, name, shape):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(*shape, generator=g)
    inputs = InMemoryInputs(name, base, [base + 0.01 * torch.randn(*shape, generator=g) for _ in range(3)])
    weights = [1.0, 0.5, 2.0]
    taus = inputs.stacked_tau()
    expected = taus[0] * weights[0]
    for w, t in zip(weights[1:], taus[1:]):
        expected = expected + t * w
    expected = expected * (0.7 / 3)
    assert torch.equal(run(method, inputs, weights, alpha=0.7), expected)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_same_bytes_whatever_the_thread_count(method):
    """MKL's SVD differs between 1 and 2 threads at this size; the methods pin one thread."""
    inputs = random_inputs((600, 500), 2, seed=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run(method, inputs)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = run(method, inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_order_of_experts_changes_only_rounding(method):
    """Reordering the experts permutes the concatenations (the polar factor is permutation-equivariant) and
    the sum's order: rounding only."""
    inputs = random_inputs((30, 20), 3, seed=9)
    experts = list(inputs.stacked())
    reordered = InMemoryInputs(NAME, torch.zeros(30, 20), [experts[2], experts[0], experts[1]])
    assert_matches(run(method, reordered), run(method, inputs).double().numpy())


# ------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("method,shared,needle", [
    ("tsv", {"alpha": 0.0}, "'alpha' = 0.0: must be in (0.0, inf)"),
    ("iso_c", {"alpha": -1.0}, "'alpha' = -1.0: must be in (0.0, inf)"),
    ("iso_c", {"alpha": "big"}, "'alpha'"),
    ("iso_cts", {"common_space_fraction": 1.0}, "'common_space_fraction' = 1.0: must be in (0.0, 1.0)"),
    ("iso_cts", {"common_space_fraction": 0.0}, "'common_space_fraction' = 0.0: must be in (0.0, 1.0)"),
    ("iso_c", {"common_space_fraction": 0.5}, "unknown parameter 'common_space_fraction'"),
    ("tsv", {"density": 0.5}, "unknown parameter 'density'"),
])
def test_bad_parameters_are_one_line_config_errors(method, shared, needle):
    with pytest.raises(ConfigError) as e:
        resolve_params(method, [{}, {}], shared)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"merge_method {method}:")


def test_defaults():
    for method in ("tsv", "iso_c", "iso_cts"):
        p = resolve_params(method, [{}, {}], {})
        assert p.shared["alpha"] == 1.0 and [e["weight"] for e in p.per_expert] == [1.0, 1.0]
    assert resolve_params("iso_cts", [{}], {}).shared["common_space_fraction"] == 0.8


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def llama_scales(llama_family, tmp_path_factory):
    import json
    import random

    rng = random.Random(0)
    words = "the quick brown fox merge experts add numbers reverse string key value".split()
    data = tmp_path_factory.mktemp("svd_calib") / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 9)))}) + "\n"
                            for _ in range(64)))
    out = data.parent / "scales.safetensors"
    result = CliRunner().invoke(main, ["calibrate", str(llama_family[0]), "--out", str(out), "--data", str(data),
                                       "--n-samples", "32", "--block-size", "16"])
    assert result.exit_code == 0, result.output
    return out


def _state(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.mark.parametrize("method,shared", [("tsv", {"alpha": 1.0}), ("iso_c", {"alpha": 1.2}),
                                           ("iso_cts", {"alpha": 1.2, "common_space_fraction": 0.7})])
def test_merge_with_aim_equals_relaxed_float64_reference(method, shared, llama_family, llama_scales, make_config,
                                                         tmp_path):
    """`aim-ray merge` with an aim section: theta + (1 - A (1 - omega)) delta, delta the float64 reference."""
    base, experts = llama_family
    weights = [1.0, 0.6, 0.8]
    cfg = make_config(method, base, experts, [{"weight": w} for w in weights], parameters=shared,
                      aim={"omega": 0.5, "scales": str(llama_scales)})
    result = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    got, b, es = _state(tmp_path / "out"), _state(base), [_state(e) for e in experts]
    scales = Scales.load(llama_scales)
    assert got.keys() == b.keys()
    relaxed_by = 0.0  # how far AIM moved the reference: the test would fail without AIM
    for name, theta in b.items():
        taus = [(e[name] - theta).double().numpy() for e in es]
        alpha = shared["alpha"]
        if theta.dim() == 2 and "embed_tokens" not in name:
            extra = {k: v for k, v in shared.items() if k != "alpha"}
            delta = REFS[method](taus, weights, alpha, **extra)
        else:
            delta = ref_average(taus, weights, alpha)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and "embed_tokens" not in name:
            a = scales[module].double().numpy()
            relaxed = (1 - a / a.max() * 0.5) * delta  # AIM, omega 0.5: column j scaled by 1 - A_j / 2
            relaxed_by = max(relaxed_by, np.abs(relaxed - delta).max())
            delta = relaxed
        want = theta.double().numpy() + delta
        err = np.abs(got[name].double().numpy() - want).max()
        assert err <= 1e-5, (name, err)
    assert relaxed_by > 1e-3
