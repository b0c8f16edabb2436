"""An in-memory `TensorInputs` for tests: float32, fresh tensors on every call, counted reads.

`reads[i]` counts how often expert i was read (expert(), task_vector() or stored()); `max_alive` is the largest
number of tensors handed out by expert()/task_vector() that were still referenced at the moment of a
read. A method that stacks all N experts reaches N; a streaming one stays at 2-3 whatever N.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from aim_ray.methods.base import mask_seed


class InMemoryInputs:
    def __init__(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], seed: int = 0,
                 stored_dtype: torch.dtype = torch.float32) -> None:
        """`stored_dtype`: what stored() hands out, as a checkpoint would (bf16, f16); the inputs are rounded
        to it first, so every path sees the same values."""
        self.name = name
        self.n_experts = len(experts)
        self.seed = seed
        self._stored = [t.detach().to(stored_dtype).clone() for t in [base, *experts]]
        self._base = self._stored[0].to(torch.float32)
        self._experts = [e.to(torch.float32) for e in self._stored[1:]]
        for i, e in enumerate(self._experts):
            if e.shape != self._base.shape:
                raise ValueError(f"expert {i} has shape {tuple(e.shape)}, base {tuple(self._base.shape)}")
        self.reads = [0] * self.n_experts
        self.base_reads = 0
        self.max_alive = 0
        self._handed_out: list[weakref.ref] = []

    def base(self) -> torch.Tensor:
        self.base_reads += 1
        return self._base.clone()

    def expert(self, i: int) -> torch.Tensor:
        return self._hand_out(i, self._experts[i].clone())

    def task_vector(self, i: int) -> torch.Tensor:
        return self._hand_out(i, self._experts[i] - self._base)

    def mask_key(self, i: int) -> int:
        return mask_seed(self.seed, i, self.name)

    # Data-aware methods: expert i's statistics for this tensor (set `statistics`, and `statistic_norms`
    # for the Fisher's model-wide norm) -- what `engine.CheckpointInputs` reads from the collected artifacts.
    statistics: Sequence[torch.Tensor] | None = None
    statistic_norms: Sequence[float] | None = None

    def statistic(self, i: int) -> torch.Tensor | None:
        return None if self.statistics is None else self.statistics[i]

    def statistic_norm(self, i: int) -> float:
        return 1.0 if self.statistic_norms is None else self.statistic_norms[i]

    def stored(self, i: int) -> torch.Tensor:
        """The stored tensor itself (the fused path reads it in place): counted as one read."""
        if i < 0:
            self.base_reads += 1
        else:
            self.reads[i] += 1
        return self._stored[i + 1]

    def _hand_out(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        if not 0 <= i < self.n_experts:
            raise IndexError(f"expert {i} of {self.n_experts}")
        self.reads[i] += 1
        self._handed_out = [r for r in self._handed_out if r() is not None]
        self._handed_out.append(weakref.ref(tensor))
        self.max_alive = max(self.max_alive, len(self._handed_out))
        return tensor

    # Plain views for reference computations in tests (not part of the protocol, not counted).
    @property
    def base_tensor(self) -> torch.Tensor:
        return self._base.clone()

    def stacked(self) -> torch.Tensor:
        return torch.stack(self._experts)

    def stacked_tau(self) -> torch.Tensor:
        return torch.stack(self._experts) - self._base
