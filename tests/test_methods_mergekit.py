"""Differential test against MergeKit's own merge methods on identical float32 tensors (no checkpoints):
our delta must equal MergeKit's merged tensor minus the base to 1e-6."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from aim_ray.methods import get_method, resolve_params, sparsify
from aim_ray.methods.fused import torch_path
from aim_ray.methods.kernels import uniform

try:
    from tests.inmemory import InMemoryInputs
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from inmemory import InMemoryInputs

pytest.importorskip("mergekit")
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods import merge_tensors  # noqa: E402

SHAPES = [("model.layers.0.self_attn.o_proj.weight", (48, 32)), ("model.norm.weight", (64,)),
          ("model.embed_tokens.weight", (40, 16))]


def tensors(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]


def ours(method, name, base, experts, per, shared):
    m = get_method(method)
    return m.fn(InMemoryInputs(name, base, experts), resolve_params(m, per, shared))


def mergekit_delta(method, base, experts, parameters):
    return merge_tensors([base, *experts], method, parameters=parameters, base_index=0) - base


def check(actual, expected):
    assert (actual - expected).abs().max().item() <= 1e-6


GTA_CASES = [
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {}, {"lambda": 0.7, "normalize": True}),
    ("ties", {"density": 0.5}, {}),
    ("ties", {"density": 0.5}, {"normalize": False, "lambda": 1.3}),
    ("dare_linear", {"density": 1.0}, {}),
    ("dare_ties", {"density": 1.0}, {}),
    ("breadcrumbs", {"density": 0.9, "gamma": 0.01}, {}),
    ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01}, {}),
    ("della", {"density": 1.0}, {}),
    ("della_linear", {"density": 1.0}, {}),
]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("method,expert,shared", GTA_CASES)
def test_task_arithmetic_family(method, expert, shared, name, shape, n):
    base, experts = tensors(shape, n, seed=n)
    weights = [0.7, 0.4, -0.3][:n]
    per = [{"weight": w, **expert} for w in weights]
    mk_params = {"weight": weights, **{k: [v] * n for k, v in expert.items()}, **shared}
    check(ours(method, name, base, experts, per, shared), mergekit_delta(method, base, experts, mk_params))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_linear(name, shape, normalize):
    base, experts = tensors(shape, 3, seed=11)
    weights = [0.5, 0.3, 0.2]
    merged = merge_tensors(experts, "linear", parameters={"weight": weights, "normalize": normalize})
    check(ours("linear", name, base, experts, [{"weight": w} for w in weights], {"normalize": normalize}),
          merged - base)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_model_stock(name, shape, n, filter_wise):
    base, experts = tensors(shape, n, seed=20 + n)
    check(ours("model_stock", name, base, experts, [{}] * n, {"filter_wise": filter_wise}),
          mergekit_delta("model_stock", base, experts, {"filter_wise": filter_wise}))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_slerp(name, shape, t):
    g = torch.Generator().manual_seed(30)
    base = torch.randn(shape, generator=g)
    expert = torch.randn(shape, generator=g)  # far from collinear: the spherical branch
    check(ours("slerp", name, base, [expert], [{}], {"t": t}), mergekit_delta("slerp", base, [expert], {"t": t}))
    for scale in (1e-3, 0.02, 0.04):  # cos ~ 1 - 5e-7, 0.9998 (linear fallback above 0.9995), 0.9992
        near = base + scale * expert
        check(ours("slerp", name, base, [near], [{}], {"t": t}), mergekit_delta("slerp", base, [near], {"t": t}))


# ------------------------------------------------------------------ trims on bf16 inputs: ties at every boundary


def bf16_tensors(shape, n, seed):
    """bf16 weights (as float32) with small deltas: |tau| takes few values, so groups of equal |tau|
    straddle every trim boundary, and sign sums cancel exactly here and there."""
    g = torch.Generator().manual_seed(seed)
    base = (0.05 * torch.randn(shape, generator=g)).bfloat16()
    experts = [(base.float() + 0.01 * torch.randn(shape, generator=g)).bfloat16() for _ in range(n)]
    return base, experts


def stable_would_differ(w: torch.Tensor, lo: int, hi: int, descending: bool) -> bool:
    """Whether keeping the lower index among equal values (a stable sort) keeps other entries than MergeKit's
    sort: the inputs do exercise the tie-breaking."""
    ours = torch.argsort(w.reshape(-1), descending=descending)[lo:hi].sort().values
    stable = torch.argsort(w.reshape(-1), descending=descending, stable=True)[lo:hi].sort().values
    return not torch.equal(ours, stable)


@pytest.mark.parametrize("density", [0.2, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("rescale", [None, "l1"])
def test_magnitude_sparsification_equals_mergekit_on_ties(density, rescale):
    base, (expert,) = bf16_tensors((96, 160), 1, seed=2)
    tau = expert.float() - base.float()
    n = tau.numel()
    k = max(1, int(density * n))
    assert stable_would_differ(tau.abs(), 0, k, True)
    norm = mk_sparsify.RescaleNorm.l1 if rescale else None
    assert torch.equal(sparsify.magnitude(tau, density, rescale), mk_sparsify.magnitude(tau, density, norm))
    gamma = 0.05
    n_bot = max(0, n - int(density * n) - int(gamma * n))
    assert stable_would_differ(tau.abs(), n_bot, n_bot + int(density * n), False)
    assert torch.equal(sparsify.magnitude_outliers(tau, density, gamma, rescale),
                       mk_sparsify.magnitude_outliers(tau, density, norm, gamma=gamma))


TRIM_CASES = [("ties", {"density": 0.5}, {}), ("ties", {"density": 0.2}, {"normalize": False, "lambda": 1.3}),
              ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, {}),
              ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}, {}),
              ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.1}, {"rescale": True})]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("method,expert,shared", TRIM_CASES)
def test_trimming_methods_equal_mergekit_on_bf16(method, expert, shared, n, fused):
    """The merged tensor, base + delta in float32, equals MergeKit's bit for bit (both kernels); with l1
    rescaling to 1e-6, as the norm sums add in another order."""
    base, experts = bf16_tensors((128, 96), n, seed=40 + n)
    weights = [0.7, 0.4, -0.3, 0.9][:n]
    per = [{"weight": w, **expert} for w in weights]
    m = get_method(method)
    inputs = InMemoryInputs("model.layers.0.mlp.up_proj.weight", base, experts, stored_dtype=torch.bfloat16)
    with nullcontext() if fused else torch_path():
        delta = m.fn(inputs, resolve_params(m, per, shared))
    mk_params = {"weight": weights, **{k: [v] * n for k, v in expert.items()}, **shared}
    theirs = merge_tensors([base.float(), *[e.float() for e in experts]], method, parameters=mk_params,
                           base_index=0)
    if shared.get("rescale"):
        check(base.float() + delta, theirs)
    else:
        assert torch.equal(base.float() + delta, theirs)


# -------------------------------------------------------------------- DARE: the same keep-mask fed to both


class _MaskFeeder:
    """Stands in for the `torch` module inside mergekit.sparsify: bernoulli() hands out the given masks in
    order (MergeKit sparsifies the experts in input order), everything else is torch's."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = list(masks)
        self.probs: list[torch.Tensor] = []  # what MergeKit asked to draw from

    def bernoulli(self, probs: torch.Tensor) -> torch.Tensor:
        mask = self.masks.pop(0)
        assert mask.shape == probs.shape
        self.probs.append(probs.clone())
        return mask.to(probs.dtype)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescaling_equals_mergekit_with_the_same_mask(method, n, fused, stored, monkeypatch):
    """Density 0.5: our counter-based keep-masks injected into MergeKit's bernoulli; MergeKit's l1 rescale
    and sums then give our merged tensor (bit for bit on the torch path; the fused path's rescale sums are
    float64, to 1e-6)."""
    shape = (64, 80)
    base, experts = (bf16_tensors(shape, n, seed=60 + n) if stored == torch.bfloat16
                     else tensors(shape, n, seed=60 + n))
    weights = [0.7, 0.4, -0.3][:n]
    density = 0.5
    m = get_method(method)
    inputs = InMemoryInputs("model.layers.0.mlp.up_proj.weight", base, experts, seed=5, stored_dtype=stored)
    with nullcontext() if fused else torch_path():
        delta = m.fn(inputs, resolve_params(m, [{"weight": w, "density": density} for w in weights], {}))
    masks = [uniform(inputs.mask_key(i), shape) < density for i in range(n)]
    assert all(0.45 < float(k.float().mean()) < 0.55 for k in masks)
    feeder = _MaskFeeder(masks)
    monkeypatch.setattr(mk_sparsify, "torch", feeder)
    theirs = merge_tensors([base.float(), *[e.float() for e in experts]], method,
                           parameters={"weight": weights, "density": [density] * n}, base_index=0)
    assert feeder.masks == []  # MergeKit drew exactly one mask per expert, ours
    assert all(bool((p == density).all()) for p in feeder.probs)
    ours = base.float() + delta
    if fused:
        check(ours, theirs)
    else:
        assert torch.equal(ours, theirs)
    unscaled = merge_tensors([base.float(), *[e.float() for e in experts]], method,
                             parameters={"weight": weights, "density": [1.0] * n}, base_index=0)
    assert (ours - unscaled).abs().max() > 1e-2  # the mask and the rescale did act


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_probabilities_and_rescaling_equal_mergekit_with_the_same_mask(method, fused, monkeypatch):
    """bf16 inputs (equal |tau| in every row): MergeKit's keep probabilities, seen by its bernoulli, are ours
    exactly (its unstable argsort ranks); with our masks injected the merged tensors agree to 1e-6 (l1
    rescale sums in another order)."""
    shape, n, density, epsilon = (48, 200), 3, 0.5, 0.2
    base, experts = bf16_tensors(shape, n, seed=70)
    weights = [0.7, 0.4, -0.3]
    m = get_method(method)
    inputs = InMemoryInputs("model.layers.0.mlp.up_proj.weight", base, experts, seed=5,
                            stored_dtype=torch.bfloat16)
    per = [{"weight": w, "density": density, "epsilon": epsilon} for w in weights]
    with nullcontext() if fused else torch_path():
        delta = m.fn(inputs, resolve_params(m, per, {}))
    taus = [e.float() - base.float() for e in experts]
    probs = [sparsify._della_probs(t, density, epsilon) for t in taus]
    masks = [uniform(inputs.mask_key(i), shape) < probs[i] for i in range(n)]
    feeder = _MaskFeeder(masks)
    monkeypatch.setattr(mk_sparsify, "torch", feeder)
    theirs = merge_tensors([base.float(), *[e.float() for e in experts]], method,
                           parameters={"weight": weights, "density": [density] * n, "epsilon": [epsilon] * n},
                           base_index=0)
    assert feeder.masks == [] and len(feeder.probs) == n
    assert all(torch.equal(ours, mk) for ours, mk in zip(probs, feeder.probs, strict=True))
    check(base.float() + delta, theirs)


# --------------------------------------------- methods beyond task arithmetic: float32 and bf16 inputs alike


def inputs_for(shape, n, seed, dtype):
    """(base, experts) as float32 tensors holding `dtype` values: bf16 inputs are rounded first, as a bf16
    checkpoint would be, and both sides see the same values."""
    base, experts = tensors(shape, n, seed)
    return base.to(dtype).float(), [e.to(dtype).float() for e in experts]


def ours_in(method, base, experts, per, shared, dtype, has_base=True, name=SHAPES[0][0]):
    m = get_method(method)
    inputs = InMemoryInputs(name, base, experts, stored_dtype=dtype)
    return m.fn(inputs, resolve_params(m, per, shared, has_base=has_base))


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("shared", [{}, {"nuslerp_flatten": False},
                                    {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_nuslerp(name, shape, shared, has_base, dtype):
    base, experts = inputs_for(shape, 2, 80, dtype)
    weights = [0.3, 0.9]
    per, params = [{"weight": w} for w in weights], {"weight": weights, **shared}
    if has_base:
        check(ours_in("nuslerp", base, experts, per, shared, dtype), mergekit_delta("nuslerp", base, experts, params))
    else:  # no base: MergeKit interpolates the weights; our delta is from models[0], as the engine sets it
        check(ours_in("nuslerp", experts[0], experts, per, shared, dtype, has_base=False),
              merge_tensors(experts, "nuslerp", parameters=params) - experts[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_multislerp(name, shape, n, normalize, has_base, dtype):
    base, experts = inputs_for(shape, n, 81 + n, dtype)
    weights = [0.3, 0.9, 0.5][:n]
    per = [{"weight": w} for w in weights]
    params = {"weight": weights, "normalize_weights": normalize}
    if has_base:
        ours = ours_in("multislerp", base, experts, per, {"normalize_weights": normalize}, dtype)
        check(ours, mergekit_delta("multislerp", base, experts, params))
    else:
        ours = ours_in("multislerp", experts[0], experts, per, {"normalize_weights": normalize}, dtype, False)
        check(ours, merge_tensors(experts, "multislerp", parameters=params) - experts[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base_input", [False, True], ids=["models", "with_base"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_karcher(name, shape, n, base_input, dtype):
    """Without base_model MergeKit averages the listed models; with one, the base too (appended last, as our
    engine appends it). Our delta is from the base the engine supplies (models[0] without one)."""
    base, experts = inputs_for(shape, n, 84 + n, dtype)
    if base_input:
        ours = ours_in("karcher", base, [*experts, base], [{}] * (n + 1), {}, dtype)
        check(ours, mergekit_delta("karcher", base, experts, {}))
    else:
        ours = ours_in("karcher", experts[0], experts, [{}] * n, {}, dtype, has_base=False)
        check(ours, merge_tensors(experts, "karcher") - experts[0])


@pytest.mark.parametrize("shared", [{"max_iter": 0}, {"max_iter": 3, "tol": 1e-3}])
def test_karcher_options(shared):
    base, experts = inputs_for((48, 32), 3, 88, torch.float32)
    taus = [e - base for e in experts]  # near-orthogonal directions: the iteration has work to do
    ours = ours_in("karcher", torch.zeros(48, 32), taus, [{}] * 3, shared, torch.float32, has_base=False)
    check(ours, merge_tensors(taus, "karcher", parameters=shared))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_sce(name, shape, n, topk, dtype):
    """Merged tensors bit for bit MergeKit's: bf16 inputs tie at the variance cut, and the same elements are
    selected."""
    base, experts = bf16_tensors(shape, n, seed=90 + n) if dtype == torch.bfloat16 else tensors(shape, n, 90 + n)
    base, experts = base.float(), [e.float() for e in experts]
    ours = ours_in("sce", base, experts, [{}] * n, {"select_topk": topk}, dtype)
    theirs = merge_tensors([base, *experts], "sce", parameters={"select_topk": topk}, base_index=0)
    check(ours, theirs - base)
    assert torch.equal(base + ours, theirs)


def test_sce_ties_at_the_cut_and_uniform_weights():
    """bf16 task vectors of RMS ~1e-4 (fine-tuned LLMs): the mean squares sum below 1e-6, so the weights are
    uniform, and equal variances straddle the cut."""
    g = torch.Generator().manual_seed(95)
    base = (0.05 * torch.randn(96, 160, generator=g)).bfloat16().float()
    experts = [(base + 1e-4 * torch.randn(96, 160, generator=g)).bfloat16().float() for _ in range(3)]
    variance = torch.var(torch.stack([e - base for e in experts]), dim=0, unbiased=False).flatten()
    k = int(torch.count_nonzero(variance) * 0.3)
    assert stable_would_differ(variance, 0, k, True)
    assert sum(float((e - base).square().mean()) for e in experts) < 1e-6
    ours = ours_in("sce", base, experts, [{}] * 3, {"select_topk": 0.3}, torch.bfloat16)
    assert torch.equal(base + ours, merge_tensors([base, *experts], "sce", parameters={"select_topk": 0.3},
                                                  base_index=0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 1.0])
@pytest.mark.parametrize("name,shape", SHAPES)
def test_nearswap(name, shape, t, dtype):
    base, experts = inputs_for(shape, 1, 100, dtype)
    check(ours_in("nearswap", base, experts, [{}], {"t": t}, dtype),
          mergekit_delta("nearswap", base, experts, {"t": t}))


class _SampleFeeder:
    """Stands in for `torch` inside MergeKit's arcee_fusion: randint() hands out the given indices."""

    def __init__(self, high: int, indices: torch.Tensor) -> None:
        self.high, self.indices = high, indices
        self.calls = 0

    def randint(self, high, size, **kwargs) -> torch.Tensor:
        assert high == self.high and tuple(size) == tuple(self.indices.shape)
        self.calls += 1
        return self.indices

    def __getattr__(self, name: str):
        return getattr(torch, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape", [*SHAPES, ("model.layers.0.mlp.down_proj.weight", (1100, 1000))])
def test_arcee_fusion(name, shape, dtype, monkeypatch):
    """Past 1M elements both sides take the quartiles of the same 1M sample: ours, injected into MergeKit's
    torch.randint. Then the result is MergeKit's bit for bit."""
    from mergekit.merge_methods import arcee_fusion as mk_arcee

    base, experts = inputs_for(shape, 1, 101, dtype)
    inputs = InMemoryInputs(name, base, experts, stored_dtype=dtype)
    ours = get_method("arcee_fusion").fn(inputs, resolve_params("arcee_fusion", [{}], {}))
    feeder = None
    if base.numel() > 1_000_000:
        generator = torch.Generator().manual_seed(inputs.mask_key(0))
        feeder = _SampleFeeder(base.numel(), torch.randint(base.numel(), (1_000_000,), generator=generator))
        monkeypatch.setattr(mk_arcee, "torch", feeder)
    theirs = merge_tensors([base, *experts], "arcee_fusion", base_index=0)
    assert feeder is None or feeder.calls == 1
    check(ours, theirs - base)
    assert torch.equal(ours != 0, theirs != base)
    assert 0 < int(torch.count_nonzero(ours)) < base.numel() // 4 or base.dim() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [{}, {"epsilon": 0.03}])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram(method, n, shared, dtype):
    """Task vectors zero on about half the elements, so unique and shared elements both occur; ramplus_tl
    with r and alpha large enough that lambda shows."""
    base, experts = inputs_for((64, 48), n, 102 + n, dtype)
    g = torch.Generator().manual_seed(n)
    experts = [torch.where(torch.rand(base.shape, generator=g) < 0.5, base, e) for e in experts]
    if method == "ramplus_tl":
        shared = {**shared, "r": 0.5, "alpha": 0.7}
    ours = ours_in(method, base, experts, [{}] * n, shared, dtype)
    theirs = merge_tensors([base, *experts], method, parameters=shared, base_index=0)
    check(ours, theirs - base)
    if method == "ramplus_tl":
        assert torch.equal(base + ours, theirs)
