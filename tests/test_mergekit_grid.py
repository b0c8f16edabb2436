"""The checkpoint-level differential grid against MergeKit: every MergeKit method of the registry x {float32,
bfloat16 input checkpoints} x {2, 3 experts} (one where the method takes one model, two for nuslerp), merged by
`aim_ray.service.merge_from_config` and by MergeKit's own `run_merge` on the tiny Llama families of conftest
(`dtype: float32` on both sides: float32 compute and output). Every output tensor agrees within 1e-6.

Random masks (dare_*, della*): the same masks on both sides. MergeKit draws them with `torch.bernoulli(probs)`
inside `mergekit.sparsify`, one call per non-base model in input order, inside one `ExecuteMergeMethodTask` per
output tensor; the test wraps that task to know the tensor and hands MergeKit aim-ray's own keep-mask,
`uniform(mask_seed(seed, i, tensor)) < probs`, for the i-th draw. So the masks act (density 0.5) and the rest
of the computation is compared exactly as for the deterministic methods.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch

from aim_ray.checkpoint import Checkpoint
from aim_ray.config import MergeConfig, parse_config
from aim_ray.methods import REGISTRY
from aim_ray.methods.base import mask_seed
from aim_ray.methods.kernels import uniform
from aim_ray.service import merge_from_config

pytest.importorskip("mergekit")
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge as mergekit_run_merge  # noqa: E402
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

TOL = 1e-6
SEED = 0  # aim-ray's mask seed (merge_from_config's default)
WEIGHTS = (0.6, 0.5, -0.3)

# Per method: (per-model parameters, global parameters). Values that make each method do something: trims that
# trim, masks that drop half, interpolations away from their ends.
PARAMS: dict[str, tuple[dict, dict]] = {
    "linear": ({}, {"weight": 0.2}),  # MergeKit merges the base_model too, with the global weight
    "task_arithmetic": ({}, {"lambda": 0.9}),
    "ties": ({"density": 0.5}, {}),
    "dare_linear": ({"density": 0.5}, {}),
    "dare_ties": ({"density": 0.5}, {}),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ({"density": 0.8, "gamma": 0.05}, {}),
    "della": ({"density": 0.5, "epsilon": 0.2}, {}),
    "della_linear": ({"density": 0.5, "epsilon": 0.2}, {}),
    "model_stock": ({}, {}),
    "slerp": ({}, {"t": 0.3}),
    "nearswap": ({}, {"t": 0.001}),
    "arcee_fusion": ({}, {}),
    "karcher": ({}, {}),
    "nuslerp": ({}, {}),
    "multislerp": ({}, {}),
    "sce": ({}, {"select_topk": 0.5}),
    "ram": ({}, {}),
    "ramplus_tl": ({}, {}),
    "passthrough": ({}, {}),
}
WEIGHTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear", "nuslerp", "multislerp")
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")


def expert_counts(name: str) -> list[int]:
    m = REGISTRY[name]
    return [n for n in (1, 2, 3) if n >= m.min_experts and (m.max_experts is None or n <= m.max_experts)
            and (n > 1 or m.max_experts == 1)]


CASES = [pytest.param(name, dtype, n, id=f"{name}-{dtype}-{n}")
         for name, m in REGISTRY.items() if m.mergekit
         for dtype in ("float32", "bfloat16")
         for n in expert_counts(name)]


def test_the_grid_covers_every_mergekit_method():
    assert set(PARAMS) == {n for n, m in REGISTRY.items() if m.mergekit}
    assert {c.values[0] for c in CASES} == set(PARAMS)
    assert expert_counts("ties") == [2, 3] and expert_counts("nuslerp") == [2] and expert_counts("slerp") == [1]


def config(name: str, base: Path, experts: list[Path]) -> dict:
    per, shared = PARAMS[name]
    models = []
    for i, e in enumerate(experts):
        p = dict(per)
        if name in WEIGHTED:
            p["weight"] = WEIGHTS[i]
        if name == "passthrough":
            p["scale"] = 0.5
        models.append({"model": str(e), "parameters": p})
    data = {"merge_method": name, "dtype": "float32", "models": models, "parameters": shared}
    if name != "passthrough":
        data["base_model"] = str(base)
    return data


class _Masks:
    """Stands in for `torch` inside mergekit.sparsify: bernoulli(probs) returns aim-ray's keep-mask of the tensor
    being merged (`ExecuteMergeMethodTask.execute`, wrapped below, names it) for the next model."""

    def __init__(self) -> None:
        self.tensor: str | None = None
        self.drawn = 0
        self.calls = 0

    def bernoulli(self, probs: torch.Tensor) -> torch.Tensor:
        assert self.tensor is not None
        keep = uniform(mask_seed(SEED, self.drawn, self.tensor), tuple(probs.shape)) < probs
        self.drawn += 1
        self.calls += 1
        return keep.to(probs.dtype)

    def __getattr__(self, attr: str):
        return getattr(torch, attr)


@pytest.fixture
def injected_masks(monkeypatch) -> _Masks:
    masks = _Masks()
    execute = ExecuteMergeMethodTask.execute

    def named_execute(self, *args, **kwargs):
        masks.tensor, masks.drawn = self.output_weight.name, 0
        try:
            return execute(self, *args, **kwargs)
        finally:
            masks.tensor = None

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", named_execute)
    monkeypatch.setattr(mk_sparsify, "torch", masks)
    return masks


def state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.fixture(scope="module")
def families(llama_family, llama_bf16_family):
    return {"float32": llama_family, "bfloat16": llama_bf16_family}


@pytest.mark.parametrize("name,dtype,n", CASES)
def test_grid(families, name, dtype, n, tmp_path, injected_masks):
    base, experts = families[dtype]
    data = config(name, base, experts[:n])
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = state(merge_from_config(parse_config(MergeConfig, data, name), tmp_path / "ours", progress=False))
    mid = time.perf_counter()
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit_run_merge(MergeConfiguration.model_validate(data), str(tmp_path / "mk"), options=options)
    theirs = state(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for tensor, t in theirs.items():
        assert ours[tensor].dtype == t.dtype == torch.float32 and ours[tensor].shape == t.shape, tensor
        worst = max(worst, (ours[tensor] - t).abs().max().item())
    print(f"{name} {dtype} x{n}: max |ours - mergekit| = {worst:.3g} (ours {mid - started:.2f} s, "
          f"mergekit {time.perf_counter() - mid:.2f} s)")
    assert worst <= TOL
    if name in RANDOM:  # one draw per expert and tensor: the masks were MergeKit's only randomness
        assert injected_masks.calls == n * len(theirs)
    if name != "passthrough":  # the merge did something: not the base
        base_state = state(base)
        assert any(not torch.equal(ours[k], base_state[k].float()) for k in ours)


def test_linear_base_model_without_a_weight(families, tmp_path):
    """Documented difference: linear with a base_model that `models` lacks and no global weight for it. MergeKit
    refuses (it merges the base as one more model and finds no weight); aim-ray keeps the base only as AIM's
    reference and merges the listed models. With a global weight both merge the base too (the grid's linear)."""
    base, experts = families["float32"]
    data = config("linear", base, experts[:2])
    data["parameters"] = {}
    ours = state(merge_from_config(parse_config(MergeConfig, data, "linear"), tmp_path / "ours", progress=False))
    inputs = [state(e) for e in experts[:2]]
    name = "model.layers.1.mlp.down_proj.weight"
    expected = (WEIGHTS[0] * inputs[0][name] + WEIGHTS[1] * inputs[1][name]) / (WEIGHTS[0] + WEIGHTS[1])
    assert (ours[name] - expected).abs().max().item() <= TOL
    with pytest.raises(RuntimeError, match="Missing required parameter weight for .*base"):
        mergekit_run_merge(MergeConfiguration.model_validate(data), str(tmp_path / "mk"),
                           options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
