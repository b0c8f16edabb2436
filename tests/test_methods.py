"""Every merge method against an independent, plain recomputation of its formula (all experts stacked,
argsort-based top-k), parameter resolution and validation, and streaming (memory independent of N)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from aim_ray.errors import ConfigError, IgnoredParameterWarning
from aim_ray.methods import REGISTRY, get_method, resolve_params
from aim_ray.methods.kernels import uniform
from aim_ray.methods.sparsify import kth_largest, rank_mask

try:
    from tests.inmemory import InMemoryInputs
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from inmemory import InMemoryInputs

ATOL = 1e-6
SHAPES = [("model.layers.0.mlp.down_proj.weight", (24, 16)),
          ("model.layers.0.input_layernorm.weight", (40,)),
          ("model.embed_tokens.weight", (30, 12))]
GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]


def make_inputs(name: str, shape: tuple[int, ...], n: int, seed: int = 0, scale: float = 0.1) -> InMemoryInputs:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    base = torch.randn(shape, generator=g)
    experts = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return InMemoryInputs(name, base, experts, seed=seed)


def merge(method: str, inputs: InMemoryInputs, per_expert=None, shared=None, has_base: bool = True) -> torch.Tensor:
    m = get_method(method)
    params = resolve_params(m, per_expert or [{} for _ in range(inputs.n_experts)], shared or {}, has_base=has_base)
    out = m.fn(inputs, params)
    assert out.dtype == torch.float32 and out.shape == inputs.base_tensor.shape
    return out


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(torch.float32), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------- plain reference formulas


def ref_rescale(tau, mask, norm, keep_prob):
    masked = tau * mask
    if norm is None:
        return masked
    if norm == "inverse":
        return masked / keep_prob
    before, after = {"l1": (tau.abs().sum(), masked.abs().sum()), "l2": (tau.norm(), masked.norm()),
                     "linf": (tau.abs().max(), masked.abs().max())}[norm]
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def ref_sparsify(tau, how, density, gamma, epsilon, norm, key):
    if density >= 1:
        return tau
    flat, n = tau.abs().flatten(), tau.numel()
    mask = torch.zeros(n)
    if how == "magnitude":
        mask[torch.argsort(flat, descending=True, stable=True)[:max(1, int(density * n))]] = 1
        return ref_rescale(tau, mask.view(tau.shape), norm, density)
    if how == "magnitude_outliers":
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        mask[torch.argsort(flat, stable=True)[n_bot:n_bot + target]] = 1
        return ref_rescale(tau, mask.view(tau.shape), norm, density)
    if how == "random":
        return ref_rescale(tau, uniform(key, tau.shape) < density, norm, density)
    rows = tau if tau.dim() >= 2 else tau.reshape(1, -1)  # della_magprune
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
    probs = (density - epsilon) + ranks / (rows.shape[1] - 1) * 2 * epsilon
    mask = uniform(key, probs.shape) < probs
    return ref_rescale(rows, mask, norm, probs).reshape(tau.shape)


SPARSE = {"task_arithmetic": (None, False), "ties": ("magnitude", True), "dare_linear": ("random", False),
          "dare_ties": ("random", True), "breadcrumbs": ("magnitude_outliers", False),
          "breadcrumbs_ties": ("magnitude_outliers", True), "della": ("della_magprune", True),
          "della_linear": ("della_magprune", False)}


def ref_gta(method, inputs, per_expert, shared):
    p = resolve_params(method, per_expert, shared)
    how, consensus = SPARSE[method]
    norm = p.shared["rescale_norm"] if p.shared["rescale"] else None
    taus = inputs.stacked_tau()
    w = torch.tensor([e["weight"] for e in p.per_expert])
    d = torch.stack([
        tau if how is None else ref_sparsify(tau, how, e["density"], e.get("gamma", 0), e.get("epsilon", 0),
                                             norm, inputs.mask_key(i))
        for i, (tau, e) in enumerate(zip(taus, p.per_expert, strict=True))])
    big_d = d * w.view(-1, *[1] * taus[0].dim())
    wb = w.view(-1, *[1] * taus[0].dim()).expand_as(big_d)
    if consensus:
        majority = torch.where(big_d.sum(0) >= 0, 1.0, -1.0)
        agree = big_d.sign() == majority
        mixed, div = (big_d * agree).sum(0), (wb * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = big_d.sum(0), w.sum()
        div = div if div.abs() >= 1e-8 else torch.tensor(1.0)
    if p.shared["normalize"]:
        mixed = mixed / div
    return mixed * p.shared["lambda"]


def gta_params(method, n, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    weights = (torch.rand(n, generator=g) * 1.3 + 0.2).tolist()
    weights[-1] = -0.4 if n > 2 else weights[-1]  # a negative weight flips that expert's signs
    per = [{"weight": w, "density": 0.6} for w in weights]
    for e in per:
        if "breadcrumbs" in method:
            e["gamma"] = 0.1
        if "della" in method:
            e["epsilon"] = 0.1
    return per, {"lambda": 0.9}


# ----------------------------------------------------------------------------------------- trimming core


@pytest.mark.parametrize("data", ["randn", "duplicates", "special"])
def test_kth_largest_and_rank_mask_match_torch_sort(data):
    """rank_mask keeps what MergeKit's unstable CPU sorts keep, equal values included."""
    g = torch.Generator().manual_seed(3)
    w = {"randn": torch.randn(5000, generator=g).abs(),
         "duplicates": torch.randint(0, 6, (4000,), generator=g).float() * 0.25,
         "special": torch.cat([torch.zeros(300), torch.full((50,), math.inf), torch.full((70,), 1e-40),
                               torch.rand(500, generator=g)])}[data]
    w = w[torch.randperm(w.numel(), generator=g)]
    n = w.numel()
    descending = torch.argsort(w, descending=True)
    ascending = torch.argsort(w)
    for k in [1, 2, 17, n // 3, n // 2, n - 1, n]:
        assert kth_largest(w, k) == w[descending[k - 1]]
        expected = torch.zeros(n, dtype=torch.bool)
        expected[descending[:k]] = True
        assert torch.equal(rank_mask(w, k), expected)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[ascending[:k]] = True
        assert torch.equal(rank_mask(w, k, largest=False), expected)


def test_magnitude_keeps_exactly_k_at_equal_magnitudes():
    tau = torch.tensor([1.0, -1.0, 1.0, 2.0, -1.0, 1.0, 0.5, -2.0])
    inputs = InMemoryInputs("t", torch.zeros(8), [tau])
    # k = 4: both 2s, then the first two 1s (n <= 16: torch's sort is an insertion sort, stable)
    out = merge("ties", inputs, [{"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0, 2.0, 0, 0, 0, -2.0]))


# ---------------------------------------------------------------------------------------- exact results


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("method", GTA)
def test_gta_family_matches_formula(method, name, shape, n):
    inputs = make_inputs(name, shape, n)
    per, shared = gta_params(method, n)
    close(merge(method, inputs, per, shared), ref_gta(method, inputs, per, shared))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("shared", [{"rescale": True, "rescale_norm": "inverse"},
                                    {"rescale": True, "rescale_norm": "l2", "normalize": False},
                                    {"rescale": True, "rescale_norm": "linf", "normalize": True},
                                    {"rescale": False, "lambda": 1.5}])
def test_gta_rescale_and_normalize_options(method, shared):
    inputs = make_inputs("model.layers.1.self_attn.q_proj.weight", (20, 18), 3, seed=4)
    per, _ = gta_params(method, 3, seed=4)
    close(merge(method, inputs, per, shared), ref_gta(method, inputs, per, shared))


def test_sign_consensus_pruned_zeros_never_match():
    # position: 0 -> s=+1, only expert 0 agrees; 1 -> s=-1; 2 -> sum == 0 gives s=+1; 3 -> all zero
    base = torch.zeros(4)
    experts = [torch.tensor([2.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, -1.0, -1.0, 0.0])]
    out = merge("ties", InMemoryInputs("t", base, experts), [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(out, torch.tensor([2.0, -1.0, 1.0, 0.0]))  # divisor counts agreeing experts only
    # after magnitude pruning expert 1 keeps only its -3, so its zeros never count in the divisor
    experts = [torch.tensor([1.0, 1.0, 1.0, -2.0]), torch.tensor([0.5, 0.1, 0.2, -3.0])]
    out = merge("ties", InMemoryInputs("t", base, experts), [{"weight": 1.0, "density": 1.0},
                                                           {"weight": 1.0, "density": 0.25}])
    assert torch.equal(out, torch.tensor([1.0, 1.0, 1.0, -2.5]))
    # weights +1 and -1 both agreeing: the divisor sums to 0 and becomes 1 (MergeKit), not a division by 0
    experts = [torch.tensor([2.0]), torch.tensor([-3.0])]
    out = merge("ties", InMemoryInputs("t", torch.zeros(1), experts), [{"weight": 1.0}, {"weight": -1.0}])
    assert torch.equal(out, torch.tensor([5.0]))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear"])
def test_zero_task_vector_with_rescale_stays_zero(method):
    base = torch.randn(12, 10)
    per = [{"weight": 1.0, "density": 0.5}] * 2
    out = merge(method, InMemoryInputs("t", base, [base.clone(), base.clone()]), per, {"rescale": True})
    assert torch.equal(out, torch.zeros_like(base))


def test_random_masks_are_reproducible_and_seeded_by_name_and_expert():
    a = make_inputs("layer.a", (30, 20), 3)
    per = [{"weight": 1.0, "density": 0.3}] * 3
    first, second = merge("dare_ties", a, per), merge("dare_ties", a, per)
    assert torch.equal(first, second)
    b = InMemoryInputs("layer.b", a.base_tensor, list(a.stacked()), seed=0)
    assert not torch.equal(merge("dare_ties", b, per), first)
    c = InMemoryInputs("layer.a", a.base_tensor, list(a.stacked()), seed=1)
    assert not torch.equal(merge("dare_ties", c, per), first)


def test_dare_inverse_rescale_is_one_over_p():
    inputs = make_inputs("x", (50, 40), 1)
    out = merge("dare_linear", inputs, [{"weight": 1.0, "density": 0.25}], {"rescale_norm": "inverse"})
    tau = inputs.stacked_tau()[0]
    kept = out != 0
    close(out[kept], tau[kept] * 4)
    assert 0.15 < kept.float().mean() < 0.35


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_linear_matches_formula(name, shape, n):
    inputs = make_inputs(name, shape, n)
    weights = [0.1 + 0.1 * i for i in range(n)]  # merged values O(1): float32 rounding stays below ATOL
    per = [{"weight": w} for w in weights]
    w = torch.tensor(weights).view(-1, *[1] * len(shape))
    close(merge("linear", inputs, per), (w * inputs.stacked()).sum(0) / w.sum() - inputs.base_tensor)
    close(merge("linear", inputs, per, {"normalize": False}), (w * inputs.stacked()).sum(0) - inputs.base_tensor)


def ref_model_stock(inputs, filter_wise):
    taus = inputs.stacked_tau().double()
    shape = taus.shape[1:]
    taus = taus.reshape(len(taus), -1, shape[-1]) if filter_wise and len(shape) >= 2 else taus.reshape(
        len(taus), 1, -1)
    n = len(taus)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            product = (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((taus[i] * taus[j]).sum(-1) / product).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    denominator = 1 + (n - 1) * c
    t = torch.where(denominator.abs() < 1e-6, 0.0, n * c / denominator)
    return (t.unsqueeze(-1) * taus.mean(0)).reshape(shape)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_formula(name, shape, n, filter_wise):
    inputs = make_inputs(name, shape, n)
    out = merge("model_stock", inputs, shared={"filter_wise": filter_wise})
    close(out, ref_model_stock(inputs, filter_wise))
    assert inputs.reads == [1] * n  # one streaming pass


def test_model_stock_tiny_norm_pairs_follow_mergekit_clamp():
    # rows whose task vectors are tiny (|a||b| < 1e-6): MergeKit divides by 1e-6, not by |a||b|
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 10, generator=g)
    experts = []
    for _ in range(3):
        tau = torch.randn(6, 10, generator=g)
        tau[:3] *= 1e-4
        tau[5] = 0.0
        experts.append(base + tau)
    for filter_wise in (False, True):
        inputs = InMemoryInputs("w", base, experts)
        close(merge("model_stock", inputs, shared={"filter_wise": filter_wise}), ref_model_stock(inputs,
                                                                                                 filter_wise))


def test_model_stock_singular_keeps_the_base():
    # three directions 120 degrees apart: mean cos = -1/2, so 1 + (N - 1) cos = 0 -> t = 0 (MergeKit)
    e1, e2 = torch.linalg.qr(torch.randn(48, 2)).Q.T
    taus = [(math.cos(a) * e1 + math.sin(a) * e2) * s for a, s in zip((0, 2.094395, 4.188790), (1, 2, 3),
                                                                     strict=True)]
    inputs = InMemoryInputs("w", torch.zeros(6, 8), [t.view(6, 8) for t in taus])
    assert torch.equal(merge("model_stock", inputs), torch.zeros(6, 8))


def ref_slerp(a, b, t):
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    dot = ((a / (na if na > 1e-8 else 1)) * (b / (nb if nb > 1e-8 else 1))).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b - a
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta) - a


@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_formula(name, shape, t):
    inputs = make_inputs(name, shape, 1, scale=1.0)
    close(merge("slerp", inputs, shared={"t": t}), ref_slerp(inputs.base_tensor, inputs.stacked()[0], t))
    collinear = InMemoryInputs(name, inputs.base_tensor, [inputs.base_tensor * 1.5])
    close(merge("slerp", collinear, shared={"t": t}), inputs.base_tensor * 0.5 * t)  # linear fallback
    if t == 0.0:
        assert torch.equal(merge("slerp", inputs, shared={"t": t}), torch.zeros(shape))


def ref_widen(inputs, ratio=1.0, calibration=1.0):
    def scores(diffs):  # [N, C]
        sig = torch.argsort(torch.argsort(diffs, dim=1, stable=True), dim=1).float() / diffs.shape[1]
        s = torch.softmax(sig, dim=0)
        s[sig > sig.mean(dim=1, keepdim=True) * ratio] = calibration
        return s

    taus, thetas, base = inputs.stacked_tau(), inputs.stacked(), inputs.base_tensor
    if base.dim() != 2:
        return (scores(taus.reshape(len(taus), -1).abs()).view_as(taus) * taus).sum(0)
    embed = "embed_tokens" in inputs.name
    if embed:  # columns are tokens
        taus, thetas, base = taus.transpose(1, 2), thetas.transpose(1, 2), base.T
    m_pre = base.norm(dim=0)
    m = thetas.norm(dim=1)  # [N, C]
    mag = (m - m_pre).abs()
    direction = 1 - torch.cosine_similarity(thetas / m.unsqueeze(1), (base / m_pre).unsqueeze(0), dim=1)
    weight = 0.5 * (scores(mag) + scores(direction))
    out = (taus * weight.unsqueeze(1)).sum(0)
    return out.T if embed else out


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("shared", [{}, {"above_average_value_ratio": 1.2, "score_calibration_value": 0.7}])
def test_widen_matches_formula(name, shape, n, shared):
    inputs = make_inputs(name, shape, n)
    close(merge("widen", inputs, shared=shared), ref_widen(inputs, **{
        "ratio": shared.get("above_average_value_ratio", 1.0),
        "calibration": shared.get("score_calibration_value", 1.0)}))


def ref_consensus(inputs, weights, lams, k, lam):
    taus = inputs.stacked_tau()
    mtl = taus[0] * weights[0]
    for tau, w in zip(taus[1:], weights[1:], strict=True):
        mtl = mtl + tau * w
    masks = [tau.abs() >= lt * (mtl - tau).abs() for tau, lt in zip(taus, lams, strict=True)]
    return mtl * (torch.stack(masks).sum(0) >= k) * lam


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_consensus_ta_matches_formula(name, shape, n):
    inputs = make_inputs(name, shape, n)
    close(merge("consensus_ta", inputs), ref_consensus(inputs, [1.0] * n, [0.4] * n, 2, 1.0))
    weights, lams = [0.3 + 0.2 * i for i in range(n)], [0.2 + 0.1 * i for i in range(n)]
    per = [{"weight": w, "tall_lambda": lt} for w, lt in zip(weights, lams, strict=True)]
    k = min(n, 3)
    close(merge("consensus_ta", inputs, per, {"k": k, "lambda": 0.7}), ref_consensus(inputs, weights, lams, k,
                                                                                      0.7))


def test_consensus_ta_tall_lambda_zero_is_task_arithmetic():
    # |tau_t| >= 0 * |...| holds everywhere, even where tau_t == 0: every mask is all ones
    base = torch.zeros(5)
    experts = [torch.tensor([1.0, 0.0, 0.0, -2.0, 0.5]), torch.tensor([0.0, 0.0, 3.0, 1.0, 0.5])]
    out = merge("consensus_ta", InMemoryInputs("t", base, experts), [{"tall_lambda": 0.0}] * 2)
    assert torch.equal(out, experts[0] + experts[1])


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("density", [None, 0.3, 1.0])
def test_localize_stitch_matches_formula(name, shape, n, density):
    inputs = make_inputs(name, shape, n)
    per = [{} if density is None else {"density": density} for _ in range(n)]
    d = 0.1 if density is None else density
    taus = inputs.stacked_tau().reshape(n, -1)
    masks = torch.zeros_like(taus)
    for i in range(n):
        masks[i, torch.argsort(taus[i].abs(), descending=True, stable=True)[:max(1, int(d * taus.shape[1]))]] = 1
    expected = (masks * taus).sum(0) / masks.sum(0).clamp(min=1)
    close(merge("localize_stitch", inputs, per), expected.view(shape))


# ------------------------------------------- MergeKit's spherical, selection and two-model methods: formulas


def without_base(inputs: InMemoryInputs) -> InMemoryInputs:
    """The same experts with no base_model: the engine then hands models[0] out as the base."""
    experts = list(inputs.stacked())
    return InMemoryInputs(inputs.name, experts[0], experts)


def ref_nuslerp(v0, v1, t, dim):
    """dim None: the whole tensor is one vector; else vectors along `dim`. float64."""
    a, b = v0.double(), v1.double()
    shape = a.shape
    a, b = (a.reshape(1, -1), b.reshape(1, -1)) if dim is None else (a.movedim(dim, -1), b.movedim(dim, -1))
    na = a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    nb = b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((a / na) * (b / nb)).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    out = torch.where(1 - cos ** 2 <= 1e-16, (1 - t) * a + t * b,
                      (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta))
    return (out if dim is None else out.movedim(-1, dim)).reshape(shape)


NUSLERP_OPTIONS = [({}, None), ({"nuslerp_flatten": False}, -1),
                   ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 0)]


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("shared,dim", NUSLERP_OPTIONS)
@pytest.mark.parametrize("name,shape", SHAPES)
def test_nuslerp_matches_formula(name, shape, shared, dim, has_base):
    inputs = make_inputs(name, shape, 2, scale=0.3)
    per = [{"weight": 0.4}, {"weight": 1.2}]
    if has_base:
        taus = inputs.stacked_tau()
        close(merge("nuslerp", inputs, per, shared), ref_nuslerp(taus[0], taus[1], 0.75, dim))
    else:
        thetas = inputs.stacked()
        close(merge("nuslerp", without_base(inputs), per, shared, has_base=False),
              ref_nuslerp(thetas[0], thetas[1], 0.75, dim) - thetas[0])


def test_nuslerp_t_edge_cases():
    inputs = make_inputs("w", (12, 10), 2)
    taus = inputs.stacked_tau()
    # weights summing to 0 (|total| < 1e-6): t = 0.5, as equal weights
    close(merge("nuslerp", inputs, [{"weight": 1.0}, {"weight": -1.0}]), ref_nuslerp(taus[0], taus[1], 0.5, None))
    # negative weights put t outside [0, 1]: extrapolation on the great circle
    close(merge("nuslerp", inputs, [{"weight": 2.0}, {"weight": -1.0}]), ref_nuslerp(taus[0], taus[1], -1.0, None))
    # collinear task vectors: linear interpolation; a zero one: the other scaled by t
    base = torch.randn(6, 4)
    tau = torch.randn(6, 4)
    collinear = InMemoryInputs("w", base, [base + tau, base + 3 * tau])
    close(merge("nuslerp", collinear, [{"weight": 1.0}, {"weight": 1.0}]), 2 * tau)
    zero = InMemoryInputs("w", base, [base.clone(), base + tau])
    close(merge("nuslerp", zero, [{"weight": 1.0}, {"weight": 3.0}]), ref_nuslerp(torch.zeros(6, 4), tau, 0.75, None))


def ref_multislerp(vs, weights, normalize, eps=1e-8):
    """The exact formula: the normalized weighted mean of unit vectors, scaled by the weighted mean norm."""
    vs = vs.double()
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = vs.flatten(1).norm(dim=1)
    units = vs / (norms + eps).view(-1, *[1] * (vs.dim() - 1))
    mean = (units * w.view(-1, *[1] * (vs.dim() - 1))).sum(0)
    return mean / mean.norm() * (w * norms).sum()


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_multislerp_matches_formula(name, shape, n, normalize, has_base):
    inputs = make_inputs(name, shape, n, scale=0.3)
    weights = [0.2 + 0.3 * i for i in range(n)]
    per = [{"weight": w} for w in weights]
    shared = {"normalize_weights": normalize}
    if has_base:
        close(merge("multislerp", inputs, per, shared), ref_multislerp(inputs.stacked_tau(), weights, normalize))
    else:  # merged weights below 1, as an LLM's: the float32 tangent step (MergeKit's, kept) adds ~8e-7 relative
        thetas = inputs.stacked() / 10
        close(merge("multislerp", InMemoryInputs(name, thetas[0], list(thetas)), per, shared, has_base=False),
              ref_multislerp(thetas, weights, normalize) - thetas[0])


def test_multislerp_one_expert_antipodal_fallback_and_error():
    inputs = make_inputs("w", (8, 6), 1)
    assert torch.equal(merge("multislerp", inputs, [{"weight": 0.3}]), inputs.stacked()[0] - inputs.base_tensor)
    base, tau = torch.zeros(8, 6), torch.randn(8, 6)  # zero base: task vectors exactly tau, -2 tau
    antipodal = InMemoryInputs("w", base, [base + tau, base - 2 * tau])  # unit vectors u, -u, equal weights
    close(merge("multislerp", antipodal, [{"weight": 1.0}] * 2), 0.5 * tau - tau)  # linear: (tau - 2 tau) / 2
    three = InMemoryInputs("model.layers.0.mlp.up_proj.weight", base, [base + tau, base - tau, base + tau])
    with pytest.raises(ConfigError, match=r"multislerp: tensor model\.layers\.0\.mlp\.up_proj\.weight: .*zero"):
        merge("multislerp", three, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """MergeKit's iteration, plainly, on full float64 vectors."""
    xs = [x.double().flatten() for x in xs]
    norms = [x.norm() for x in xs]
    units = [x / nrm if nrm > 0 else torch.zeros_like(x) for x, nrm in zip(xs, norms, strict=True)]
    valid = [i for i in range(len(xs)) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    b = 1.0 / len(valid)
    mean = sum(b * units[i] for i in valid)
    mean = units[valid[0]].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = (mean @ units[i]).clamp(-1, 1)
            theta = torch.arccos(dot)
            if theta >= tol:
                tangent += b * theta / torch.sin(theta) * (units[i] - dot * mean)
        length = tangent.norm()
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * tangent / length
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return sum(norms) / len(xs) * mean


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("stored", [True, False], ids=["sliced", "pairwise"])
def test_karcher_matches_formula(name, shape, n, stored, monkeypatch):
    """Near-orthogonal vectors (the iteration moves the mean) and nearly parallel ones (weights); both Gram
    paths: stored tensors in slices, pairs of full tensors (no stored())."""
    inputs = make_inputs(name, shape, n, scale=0.3)
    if not stored:
        monkeypatch.setattr(InMemoryInputs, "stored", property(lambda self: None))
    taus = list(inputs.stacked_tau())
    directions = InMemoryInputs(name, torch.zeros(shape), taus)
    close(merge("karcher", directions, has_base=False), ref_karcher(taus).view(shape))
    thetas = list(inputs.stacked())
    close(merge("karcher", without_base(inputs), has_base=False), ref_karcher(thetas).view(shape) - thetas[0])
    close(merge("karcher", directions, shared={"max_iter": 1, "tol": 1e-3}, has_base=False),
          ref_karcher(taus, 1, 1e-3).view(shape))


def test_karcher_edge_cases():
    base = torch.randn(5, 4)
    one = InMemoryInputs("w", base, [base + 1.0])
    assert torch.equal(merge("karcher", one, has_base=False), (base + 1.0) - base)  # one model: itself
    zeros = InMemoryInputs("w", torch.zeros(5, 4), [torch.zeros(5, 4)] * 3)  # no norm above tol: 0
    assert torch.equal(merge("karcher", zeros, has_base=False), torch.zeros(5, 4))
    # a model below tol is left out of the direction, its norm still counts in the scale
    x = torch.randn(5, 4)
    tiny = InMemoryInputs("w", torch.zeros(5, 4), [x, torch.full((5, 4), 1e-7)])
    close(merge("karcher", tiny, has_base=False), x / x.norm() * (x.norm() + torch.full((5, 4), 1e-7).norm()) / 2)


def test_karcher_sliced_gram_in_several_slices(monkeypatch):
    """The Gram's scratch is fixed (each model's slice shrinks as N grows): several slices, the last partial."""
    from aim_ray.methods import karcher

    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1000, generator=g) for _ in range(5)]
    monkeypatch.setattr(karcher, "_GRAM_SCRATCH", 1200)  # 240 elements of each model: 5 slices, the last 40
    monkeypatch.setattr(karcher, "_GRAM_MIN_SLICE", 16)
    x = torch.stack(xs).double()
    torch.testing.assert_close(karcher._sliced_gram(xs), x @ x.T, rtol=1e-12, atol=0)
    monkeypatch.setattr(karcher, "_GRAM_SCRATCH", 5 * 2000)  # one slice, clipped to the tensor
    torch.testing.assert_close(karcher._sliced_gram(xs), x @ x.T, rtol=1e-12, atol=0)


def ref_sce(taus, topk):
    taus = taus.clone()
    n = len(taus)
    if topk < 1:
        var = taus.var(0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * topk)
        mask = torch.zeros(var.numel())
        mask[torch.argsort(var.flatten(), descending=True, stable=True)[:k]] = 1
        taus = taus * mask.view(var.shape)
    w = taus.square().flatten(1).mean(1)
    w = torch.full((n,), 1 / n) if w.sum() < 1e-6 else w / w.sum()
    w = w.view(-1, *[1] * (taus.dim() - 1))
    agree = (taus.sign() == torch.where(taus.sum(0) >= 0, 1.0, -1.0)).float()
    return (taus * w * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.6, 0.2])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_sce_matches_formula(name, shape, n, topk):
    inputs = make_inputs(name, shape, n)
    close(merge("sce", inputs, shared={"select_topk": topk}), ref_sce(inputs.stacked_tau(), topk))
    tiny = make_inputs(name, shape, n, scale=1e-4)  # mean squares sum below 1e-6: uniform weights
    close(merge("sce", tiny, shared={"select_topk": topk}), ref_sce(tiny.stacked_tau(), topk))


@pytest.mark.parametrize("topk", [0.5, 1.0])
def test_sce_in_slices_is_sce_in_one(topk, monkeypatch):
    """The variance works in 1M-element slices: the same bits as in one slice."""
    from aim_ray.methods import sce

    g = torch.Generator().manual_seed(6)
    base = torch.randn(24, 16, generator=g)
    experts = [base + 0.1 * torch.randn(24, 16, generator=g) for _ in range(4)]
    experts[0][:2] = base[:2]  # zero task vector entries
    inputs = InMemoryInputs("model.layers.0.mlp.down_proj.weight", base, experts)
    whole = merge("sce", inputs, shared={"select_topk": topk})
    monkeypatch.setattr(sce, "_SLICE", 7)  # 55 slices, the last one partial
    sliced = merge("sce", inputs, shared={"select_topk": topk})
    assert torch.equal(sliced, whole)


def test_sce_selection_keeps_k_elements_and_k_zero_keeps_the_base():
    inputs = make_inputs("w", (20, 10), 3)
    out = merge("sce", inputs, shared={"select_topk": 0.25})
    assert int(torch.count_nonzero(out)) == 50  # int(200 * 0.25): every kept element has some expert agreeing
    assert torch.equal(merge("sce", inputs, shared={"select_topk": 0.004}), torch.zeros(20, 10))  # int(0.8) = 0


@pytest.mark.parametrize("t", [0.0, 0.02, 0.1, 10.0])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_nearswap_matches_formula(name, shape, t):
    inputs = make_inputs(name, shape, 1)
    a, b = inputs.base_tensor, inputs.stacked()[0]
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    close(merge("nearswap", inputs, shared={"t": t}), w * b + (1 - w) * a - a)
    if t == 0.0:
        assert torch.equal(merge("nearswap", inputs, shared={"t": t}), torch.zeros(shape))
    if t == 10.0:  # every |b - a| is below t: the expert itself
        close(merge("nearswap", inputs, shared={"t": t}), b - a)


def sparse_inputs(name, shape, n, seed=0):
    """Task vectors zero on about half the elements each: unique and shared elements both occur."""
    inputs = make_inputs(name, shape, n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    base = inputs.base_tensor
    experts = [torch.where(torch.rand(shape, generator=g) < 0.5, base, e) for e in inputs.stacked()]
    return InMemoryInputs(name, base, experts)


def ref_ram(taus, epsilon, r=None, alpha=None):
    nz = taus.abs() > epsilon
    count = nz.sum(0)
    taus = taus * nz
    if r is None:
        return taus.sum(0) / count.clamp(min=1)
    unique = count == 1
    out = torch.zeros_like(taus[0])
    for tau, keep in zip(taus, nz, strict=True):
        n_unique, n_shared = int((keep & unique).sum()), int((keep & ~unique).sum())
        lam = 1 + r * min(max(n_shared / max(n_unique, epsilon), 0), alpha)
        out += torch.where(unique, tau * lam, tau / count.clamp(min=1))
    return out


@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_ram_and_ramplus_tl_match_formula(name, shape, n, epsilon):
    inputs = sparse_inputs(name, shape, n)
    taus = inputs.stacked_tau()
    close(merge("ram", inputs, shared={"epsilon": epsilon}), ref_ram(taus, epsilon))
    close(merge("ramplus_tl", inputs, shared={"epsilon": epsilon}), ref_ram(taus, epsilon, 0.1, 0.2))
    close(merge("ramplus_tl", inputs, shared={"epsilon": epsilon, "r": 0.5, "alpha": 0.7}),
          ref_ram(taus, epsilon, 0.5, 0.7))


def test_ram_threshold_is_strict_and_ramplus_scales_only_unique_elements():
    base = torch.zeros(4)
    experts = [torch.tensor([0.5, 1e-5, 2.0, 0.0]), torch.tensor([0.0, 0.0, 4.0, 0.0])]
    inputs = InMemoryInputs("w", base, experts)
    # |tau| == epsilon does not count: element 1 stays the base's; element 2 is shared: averaged
    assert torch.equal(merge("ram", inputs), torch.tensor([0.5, 0.0, 3.0, 0.0]))
    # expert 0: 1 unique, 1 shared -> rho 1 -> lambda = 1 + 0.5 * min(1, 0.7) = 1.35; expert 1: no unique
    assert torch.equal(merge("ramplus_tl", inputs, shared={"r": 0.5, "alpha": 0.7}),
                       torch.tensor([0.5 * 1.35, 0.0, 3.0, 0.0]))


def ref_arcee_fusion(a, b):
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    importance = (b - a).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    ordered = importance.flatten().sort().values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    return (b - a) * (importance >= median + 1.5 * (q3 - q1))


@pytest.mark.parametrize("name,shape", SHAPES)
def test_arcee_fusion_matches_formula(name, shape):
    inputs = make_inputs(name, shape, 1)
    a, b = inputs.base_tensor, inputs.stacked()[0].clone()
    b.view(-1)[::7] += 1.0  # changes that stand out: the fence keeps them
    inputs = InMemoryInputs(name, a, [b])
    out = merge("arcee_fusion", inputs)
    close(out, ref_arcee_fusion(a, b))
    assert 0 < int(torch.count_nonzero(out)) < out.numel() // 2


def test_arcee_fusion_samples_a_million_reproducibly():
    """Past 1M elements the quartiles come from a 1M sample drawn with the tensor's key: the same merge
    twice, and our fence is the formula's on that sample."""
    inputs = make_inputs("model.layers.0.mlp.down_proj.weight", (1100, 1000), 1)
    first, second = merge("arcee_fusion", inputs), merge("arcee_fusion", inputs)
    assert torch.equal(first, second)
    a, b = inputs.base_tensor, inputs.stacked()[0]
    p, q = torch.softmax(b, dim=-1) + 1e-8, torch.softmax(a, dim=-1) + 1e-8
    importance = ((b - a).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).flatten()
    sample = importance[torch.randint(importance.numel(), (1_000_000,),
                                      generator=torch.Generator().manual_seed(inputs.mask_key(0)))]
    ordered = sample.sort().values
    q1, median, q3 = (ordered[int(f * 999_999)] for f in (0.25, 0.5, 0.75))
    assert torch.equal(first != 0, (importance >= median + 1.5 * (q3 - q1)).view(first.shape))


# --------------------------------------------------------------------------------------------- streaming


PASSES = {"sce": 3}  # variance, then weights and sign vote, then the sum


@pytest.mark.parametrize("method", sorted(m for m in REGISTRY if REGISTRY[m].max_experts is None))
def test_streaming_memory_independent_of_n(method):
    n = 16
    inputs = make_inputs("model.layers.3.mlp.up_proj.weight", (32, 24), n)
    per = [{"weight": 1.0, "density": 0.5} if "weight" in {p.name for p in REGISTRY[method].params if
                                                           p.per_expert} else {} for _ in range(n)]
    per = [{k: v for k, v in e.items() if REGISTRY[method].param(k)} for e in per]
    inputs.statistics = synthetic_statistics(REGISTRY[method].statistics, (32, 24), n)
    merge(method, inputs, per)
    assert max(inputs.reads) <= PASSES.get(method, 2), inputs.reads  # at most two passes (sce: three)
    assert min(inputs.reads) >= 1
    assert inputs.max_alive <= 3, inputs.max_alive  # never more than a few expert-sized tensors at once


def synthetic_statistics(kind: str | None, shape: tuple[int, ...], n: int) -> list[torch.Tensor] | None:
    """Stand-ins for the collected statistics (gram: SPD [in, in]; fisher: positive, the tensor's shape)."""
    g = torch.Generator().manual_seed(n)
    if kind == "gram":
        xs = [torch.randn(64, shape[-1], generator=g) for _ in range(n)]
        return [x.T @ x / 64 for x in xs]
    if kind == "fisher":
        return [torch.rand(shape, generator=g) for _ in range(n)]
    if kind is None:
        return None
    return [(torch.rand(shape, generator=g) > 0.5).float() for _ in range(n)]


# ---------------------------------------------------------------------------------- parameters, defaults


def test_registry_has_every_method():
    assert set(REGISTRY) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                             "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp", "widen",
                             "consensus_ta", "localize_stitch", "nuslerp", "multislerp", "karcher", "sce",
                             "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough", "tsv", "iso_c",
                             "iso_cts", "regmean", "fisher", "localize_stitch_trained"}


@pytest.mark.parametrize("method,expert,shared", [
    ("task_arithmetic", {"density": 1.0}, {"lambda": 1.0, "normalize": False, "rescale": False}),
    ("ties", {"density": 1.0}, {"normalize": True, "rescale": False, "rescale_norm": "l1", "int8_mask": False}),
    ("dare_linear", {"density": 1.0}, {"normalize": False, "rescale": True}),
    ("dare_ties", {"density": 1.0}, {"normalize": False, "rescale": True}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.01}, {"normalize": False, "rescale": False}),
    ("breadcrumbs_ties", {"density": 1.0, "gamma": 0.01}, {"normalize": False, "rescale": False}),
    ("della", {"density": 1.0, "epsilon": 0.15}, {"normalize": True, "rescale": True}),
    ("della_linear", {"density": 1.0, "epsilon": 0.15}, {"normalize": False, "rescale": True}),
    ("linear", {}, {"normalize": True}),
    ("model_stock", {}, {"filter_wise": False}),
    ("widen", {}, {"above_average_value_ratio": 1.0, "score_calibration_value": 1.0}),
    ("consensus_ta", {"weight": 1.0, "tall_lambda": 0.4}, {"k": 2, "lambda": 1.0}),
    ("localize_stitch", {"density": 0.1}, {}),
    ("nuslerp", {}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
    ("multislerp", {}, {"normalize_weights": True, "eps": 1e-8}),
    ("karcher", {}, {"max_iter": 10, "tol": 1e-5}),
    ("sce", {}, {"select_topk": 1.0, "int8_mask": False}),
    ("arcee_fusion", {}, {}),
    ("ram", {}, {"epsilon": 1e-5}),
    ("ramplus_tl", {}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    ("tsv", {"weight": 1.0}, {"alpha": 1.0}),
    ("iso_c", {"weight": 1.0}, {"alpha": 1.0}),
    ("iso_cts", {"weight": 1.0}, {"alpha": 1.0, "common_space_fraction": 0.8}),
    ("regmean", {"weight": 1.0}, {"alpha": 0.9}),
    ("fisher", {"weight": 1.0}, {"epsilon": 1e-6, "normalize": True}),
    ("localize_stitch_trained", {"density": 0.1}, {"sigmoid_bias": 3.0, "lr": 1e8, "l1_strength": 0.0, "epochs": 1}),
])
def test_omitted_parameters_get_defaults(method, expert, shared):
    needs_weight = REGISTRY[method].param("weight") is not None and REGISTRY[method].param("weight").required
    per = [{"weight": 1.0} if needs_weight else {} for _ in range(min(2, REGISTRY[method].max_experts or 2))]
    p = resolve_params(method, per, {})
    for key, value in expert.items():
        assert [e[key] for e in p.per_expert] == [value] * len(per), key
    for key, value in shared.items():
        assert p.shared[key] == value, key


def test_per_model_parameters_default_from_global_parameters():
    p = resolve_params("ties", [{"weight": 1.0}, {"weight": 0.5, "density": 0.3}], {"density": 0.7})
    assert [e["density"] for e in p.per_expert] == [0.7, 0.3]
    assert resolve_params("ties", [{}, {}], {"weight": 2}).per_expert[1]["weight"] == 2.0


@pytest.mark.parametrize("method,per,shared,needle", [
    ("ties", [{"weight": 1, "densty": 0.5}], {}, "'densty'"),
    ("ties", [{"weight": 1}], {"lamda": 1.0}, "'lamda'"),
    ("ties", [{"density": 0.5}], {}, "'weight' is required"),
    ("ties", [{"weight": 1, "density": 0.0}], {}, "'density'"),
    ("ties", [{"weight": 1, "density": 1.5}], {}, "'density'"),
    ("ties", [{"weight": float("nan")}], {}, "'weight'"),
    ("ties", [{"weight": "1"}], {}, "'weight'"),
    ("ties", [{"weight": True}], {}, "'weight'"),
    ("ties", [{"weight": [0, 1]}], {}, "scalar"),
    ("ties", [{"weight": 1, "density": {"filter": "mlp", "value": 0.5}}], {}, "scalar"),
    ("ties", [{"weight": 1}], {"normalize": "yes"}, "'normalize'"),
    ("dare_ties", [{"weight": 1}], {"rescale_norm": "l3"}, "'rescale_norm'"),
    ("breadcrumbs", [{"weight": 1, "gamma": 1.0}], {}, "'gamma'"),
    ("della", [{"weight": 1, "density": 0.5, "epsilon": 0.5}], {}, "epsilon"),
    ("della", [{"weight": 1, "density": 0.9, "epsilon": 0.15}], {}, "epsilon"),
    ("della", [{"weight": 1, "epsilon": -0.1}], {}, "'epsilon'"),
    ("slerp", [{}], {}, "'t' is required"),
    ("slerp", [{}], {"t": 1.5}, "'t'"),
    ("slerp", [{}, {}], {"t": 0.5}, "at most 1"),
    ("model_stock", [{}], {}, "at least 2"),
    ("consensus_ta", [{}, {}], {"k": 0}, "'k'"),
    ("consensus_ta", [{}, {}], {"k": 2.5}, "'k'"),
    ("consensus_ta", [{}, {}], {"k": 3}, "k=3"),
    ("linear", [{"weight": 1.0}, {"weight": -1.0}], {}, "sum to 0"),
    ("widen", [{"weight": 1.0}], {}, "'weight'"),
    ("localize_stitch", [{"density": 0}], {}, "'density'"),
    ("nuslerp", [{"weight": 1}], {}, "at least 2"),
    ("nuslerp", [{"weight": 1}] * 3, {}, "at most 2"),
    ("nuslerp", [{"weight": 1}, {}], {}, "'weight' is required"),
    ("nuslerp", [{"weight": 1}] * 2, {"nuslerp_flatten": "no"}, "'nuslerp_flatten'"),
    ("multislerp", [{"weight": 1.0}, {"weight": -1.0}], {}, "sum to 0"),
    ("multislerp", [{"weight": 1.0}], {"eps": 0.0}, "'eps'"),
    ("karcher", [{}, {}], {"max_iter": -1}, "'max_iter'"),
    ("karcher", [{}, {}], {"max_iter": 2.5}, "'max_iter'"),
    ("karcher", [{}, {}], {"tol": -1e-5}, "'tol'"),
    ("sce", [{}, {}], {"select_topk": 0.0}, "'select_topk'"),
    ("sce", [{}, {}], {"select_topk": 1.5}, "'select_topk'"),
    ("nearswap", [{}], {}, "'t' is required"),
    ("nearswap", [{}], {"t": -0.1}, "'t'"),
    ("nearswap", [{}, {}], {"t": 0.1}, "at most 1"),
    ("arcee_fusion", [{}, {}], {}, "at most 1"),
    ("ram", [{}], {"epsilon": -1e-5}, "'epsilon'"),
    ("ramplus_tl", [{}], {"r": -0.1}, "'r'"),
    ("ramplus_tl", [{}], {"alpha": -0.2}, "'alpha'"),
])
def test_invalid_parameters_are_rejected_with_the_option_named(method, per, shared, needle):
    with pytest.raises(ConfigError, match=method) as err:
        resolve_params(method, per, shared)
    assert needle in str(err.value)


@pytest.mark.parametrize("method,per,shared,ignored", [
    ("slerp", [{"weight": 0.5}], {"t": 0.3}, ["weight"]),
    ("model_stock", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}], {}, ["weight"]),
    ("model_stock", [{}, {}], {"weight": 1.0}, ["weight"]),
    ("ties", [{"weight": 1, "lambda": 2.0}, {"weight": 1, "lambda": 3.0}], {}, ["lambda"]),
    ("linear", [{"weight": 1, "density": 0.5}, {"weight": 2}], {"gamma": 0.1}, ["gamma", "density"]),
    ("sce", [{"weight": 1.0}, {"weight": 0.5}], {}, ["weight"]),
    ("karcher", [{"weight": 1.0}, {}], {"t": 0.5}, ["t", "weight"]),
    ("nearswap", [{"weight": 0.5}], {"t": 0.1}, ["weight"]),
    ("arcee_fusion", [{}], {"t": 0.5}, ["t"]),
    ("ram", [{"epsilon": 0.1}, {}], {}, ["epsilon"]),
    ("multislerp", [{"weight": 1, "density": 0.5}, {"weight": 1}], {}, ["density"]),
])
def test_parameters_mergekit_ignores_are_ignored_with_one_warning(method, per, shared, ignored):
    """MergeKit reads only what a method declares: the others are dropped, one warning per name (however
    many models carry it), and the result is the same as without them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = resolve_params(method, per, shared)
    messages = [str(w.message) for w in caught if w.category is IgnoredParameterWarning]
    assert len(messages) == len(ignored)
    for key, message in zip(ignored, messages, strict=True):
        assert message.startswith(f"merge_method {method}: parameter {key!r}") and "ignored" in message
    without = [{k: v for k, v in p.items() if k not in ignored} for p in per]
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredParameterWarning)
        assert params == resolve_params(method, without, {k: v for k, v in shared.items() if k not in ignored})


def test_unknown_names_and_non_mergekit_methods_are_still_refused():
    with pytest.raises(ConfigError, match="'bogus'"):
        resolve_params("slerp", [{"bogus": 1}], {"t": 0.5})  # no MergeKit method reads it: a typo
    with pytest.raises(ConfigError, match="'weight'"):
        resolve_params("widen", [{"weight": 1.0}], {})  # aim-ray's own method: nothing to be compatible with


def test_errors_name_the_model():
    with pytest.raises(ConfigError, match=r"models\[1\] \(org/expert-b\)"):
        resolve_params("ties", [{"weight": 1}, {"weight": 1, "density": 2}], {}, expert_names=["a", "org/expert-b"])


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match="known methods: .*task_arithmetic"):
        get_method("tie")


def test_della_single_column_and_int_coercion():
    p = resolve_params("consensus_ta", [{}, {}], {"k": 2.0})
    assert p.shared["k"] == 2 and isinstance(p.shared["k"], int)
    p = resolve_params("ties", [{"weight": 1}], {"lambda": 2})
    assert p.shared["lambda"] == 2.0 and isinstance(p.shared["lambda"], float)
    inputs = make_inputs("w", (10, 1), 2)  # one column per row: keep probability = density
    out = merge("della_linear", inputs, [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 2)
    assert torch.isfinite(out).all()
