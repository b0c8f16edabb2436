"""The contract every merge method implements: one tensor at a time, float32, memory independent of N.

A method never sees whole checkpoints. It gets a `TensorInputs` for one tensor name and returns
`delta_merged` (float32, the base's shape) so that `theta_merged = theta_pre + delta_merged`.
Returning the delta (not the merged weight) is what lets AIM relax any method, and makes
`omega = 1` the exact identity: `theta_pre + 1.0 * delta` is bit-identical to `theta_pre + delta`.

Methods stream over experts (`inputs.task_vector(i)` reads expert i lazily from its memory-mapped
shard) and keep O(1) full-size float32 buffers, so merging 32 experts costs the memory of merging 2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class TensorInputs(Protocol):
    """Lazy access to one tensor of the base and of every expert, already in float32."""

    name: str
    n_experts: int

    def base(self) -> torch.Tensor:
        """The base (pre-trained) tensor, float32. Fresh tensor: callers may modify it."""
        ...

    def expert(self, i: int) -> torch.Tensor:
        """Expert i's full tensor, float32 (vocabulary rows already aligned to the base's shape)."""
        ...

    def task_vector(self, i: int) -> torch.Tensor:
        """tau_i = expert_i - base, float32, a fresh tensor."""
        ...

    def mask_key(self, i: int) -> int:
        """Expert i's random-mask key, from (seed, expert index, tensor name) (`mask_seed`): the same masks
        whatever the number of workers or the order of tensors."""
        ...

    # Optional (the fused path of the task-arithmetic family uses them when present):
    # stored(i) -> torch.Tensor | None: tensor i (-1: the base) as stored (bf16/f16/f32, not converted, not
    #     to be modified), or None when it must be converted first (e.g. vocabulary rows to align);
    # verify_finite() -> None: raise naming the input that holds NaN/Inf, if the merge checks for them.
    # statistic(i) -> torch.Tensor | None: expert i's statistics for this tensor (methods with `statistics`
    #     set: its Gram matrix, Fisher or mask; None where it has none, e.g. the Gram of a non-Linear tensor).


@dataclass(frozen=True)
class MethodParams:
    """Resolved parameters for one tensor: `per_expert[i]` holds expert i's parameters (weight, density,
    gamma, epsilon...), `shared` the global ones (lambda, normalize, rescale, k, t...). Defaults are
    already filled in from the method's spec."""

    per_expert: tuple[Mapping[str, Any], ...]
    shared: Mapping[str, Any]
    # Whether the config names a base_model. Methods with base_role "reference" (nuslerp, multislerp) work on
    # task vectors from it when there is one, else on the models' weights (`inputs.base()` is then models[0]).
    has_base: bool = True

    def expert(self, i: int, key: str) -> Any:
        return self.per_expert[i][key]


MergeFn = Callable[[TensorInputs, MethodParams], torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method. `per_expert` parameters live under `models[i].parameters` in the
    MergeKit YAML; shared ones under the top-level `parameters`. `required` means no default."""

    name: str
    per_expert: bool
    default: Any = None
    required: bool = False
    low: float | None = None  # inclusive bounds, checked at config validation
    high: float | None = None
    kind: type = float
    low_open: bool = False  # make `low` / `high` exclusive (density in (0, 1], gamma in [0, 1))
    high_open: bool = False
    choices: tuple[Any, ...] | None = None  # allowed values (e.g. rescale_norm)


# What a configured base_model is to a method that runs without one (needs_base False), after MergeKit's
# BasePolicy: "listed" (linear): a merged model where `models` lists it, or (as MergeKit) where a global
# `weight` gives it one (`engine._base_appended`); "reference" (OPTIONAL: nuslerp,
# multislerp): never merged, the method interpolates task vectors from it (`MethodParams.has_base`); "input"
# (IGNORED: karcher): merged as one more model, appended to `models` unless listed there.
BASE_ROLES = ("listed", "reference", "input")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: tuple[ParamSpec, ...]
    # MergeKit's BasePolicy.REQUIRED. Either way the method returns merged - base, and AIM relaxes that delta;
    # without needs_base AIM needs a configured base_model (the engine refuses it otherwise).
    needs_base: bool = True
    base_role: str = "listed"  # one of BASE_ROLES; read only where needs_base is False
    min_experts: int = 1
    max_experts: int | None = None
    reference: str = ""
    doc: str = ""
    extra_checks: tuple[Callable[[MethodParams], None], ...] = field(default_factory=tuple)
    mergekit: bool = True  # one of MergeKit's methods: parameters MergeKit ignores are ignored with a warning
    # fn returns the merged tensor itself, not a delta (passthrough): nothing for AIM to relax
    direct: bool = False
    # The expert statistics a data-aware method reads (`aim_ray.statistics`: "gram", "fisher"); each model
    # then needs `data:` in the config.
    statistics: str | None = None

    def __post_init__(self) -> None:
        if self.base_role not in BASE_ROLES:
            raise ValueError(f"merge method {self.name!r}: base_role {self.base_role!r} not in {BASE_ROLES}")

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise RuntimeError(f"merge method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def mask_seed(seed: int, expert_index: int, tensor_name: str) -> int:
    """63-bit seed from (seed, expert, tensor): stable across processes (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{expert_index}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def count_mask_(count: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """count += mask (bool), in place. A uint8 count adds the mask's bytes as they are: adding the bool tensor
    itself makes torch cast it into a full-size temporary on every call, and those fragmented the heap (its
    peak grew by the mask's size with every expert)."""
    return count.add_(mask.view(torch.uint8) if count.dtype == torch.uint8 else mask)
