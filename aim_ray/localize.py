"""Localize-and-Stitch with trained masks (He et al. 2025, https://arxiv.org/abs/2408.13656): the localization.

For one expert (task vector `tau = expert - base`), over its localized parameters, on the expert's own data:

    S      = +sigmoid_bias on the top `density` fraction of |tau| of each tensor, -sigmoid_bias elsewhere
    theta  = theta_pre + sigmoid(S) * tau                            (written into the stage's parameters)
    g      = sum over the data blocks of d L_b / d theta             (L_b: block b's mean next-token loss)
    S     <- S - sigmoid'(S) * (lr * g * tau + l1_strength)          (once per epoch, `epochs` times)
    mask   = round(sigmoid(S))                                       (bool, one per localized tensor)

i.e. one full-batch gradient step per epoch on `lr * L(theta_pre + sigmoid(S) tau) + l1_strength * sum sigmoid(S)`,
the paper's objective (task loss plus an L1 sparsity penalty on the relaxed mask). The stitch
(`methods.consensus`, `localize_stitch_trained`) then averages the experts' masked task vectors where they overlap.

Choices against the authors' code (yifei-he/Localize-and-Stitch, and MergeBench's LLM port of it):
- Localized parameters: every floating-point parameter except the embeddings, as MergeBench selects them for
  LLMs (the authors' RoBERTa code localizes only the encoder layers). A tied head is the embedding: not localized
  either. Tensors without a mask keep the base value in the stitch (their task vectors are dropped), as there.
- The top-k initialisation is per tensor (`k = max(1, int(density * numel))`, ties as `sparsify.rank_mask`), as
  the project's dataless `localize_stitch`, so `epochs: 0` gives exactly its masks and the two variants differ by
  the training only. The authors take one threshold over all localized parameters at once.
- The penalty descends `l1_strength * sum sigmoid(S)` (the paper's L1). The released code instead adds
  `l1_strength * sign(S) * sigmoid'(S)`, which pushes S away from 0 (binarises rather than sparsifies); with the
  default `l1_strength: 0` the two agree.
- Defaults are MergeBench's LLM settings (sparsity 0.1, sigmoid_bias 3, lr 1e8, 1 epoch, l1_strength 0), not the
  authors' few-shot RoBERTa/ViT ones (sparsity 1e-5, bias 5, lr 1e7, 10 epochs). MergeBench sums the gradient
  over its optimizer steps, so `g` is a sum over blocks here too (the authors' code averages over batches: the
  same as `lr / n_batches`). MergeBench also lets AdamW move the model during its epoch; here theta only changes
  at the update, which is what makes the masks independent of the number of pipeline stages.

Pipeline: `MaskStage` is a `SensitivityStage` over one layer range of the BASE (only that range loaded) that also
reads the expert's tensors of its own range (memory-mapped) for tau. Per epoch every block goes forward and
backward through the stages (the last one takes the token ids as labels), each stage adds its gradient to a
float32 sum in block order, and only after the epoch's blocks have drained does the driver call `update()` on
every stage: the same S, bit for bit, for any number of stages. Per stage: S and the gradient sum in float32
beside the stage's weights; theta_pre and tau are re-read from the checkpoints at each update.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .calibration import SensitivityStage, StageRunner, backprop_blocks, calibration_stages, next_token_loss
from .checkpoint import Checkpoint
from .errors import CheckpointError, ConfigError, StatisticsError
from .methods.base import MethodParams
from .methods.sparsify import rank_mask
from .scales import is_embedding, open_checkpoint

if TYPE_CHECKING:
    from .engine import MergeJob

SHARED_OPTIONS = ("sigmoid_bias", "lr", "l1_strength", "epochs")  # the method's global parameters; density per model


@dataclass(frozen=True)
class MaskTraining:
    """One expert's mask-training hyperparameters (defaults: the `localize_stitch_trained` ParamSpecs)."""

    density: float
    sigmoid_bias: float
    lr: float
    l1_strength: float
    epochs: int

    def settings(self) -> dict[str, Any]:
        """What the cache key records (the base's content hash is added by the caller)."""
        return asdict(self)


def mask_training(job: MergeJob, expert: int) -> MaskTraining:
    """Expert `expert`'s training hyperparameters from the job's method parameters: one value each for the
    whole model (a gradient or filter would give each tensor its own)."""
    params = [job.params] if job.plan is None else list({id(p.params): p.params for p in job.plan.values()}
                                                          .values())
    found = {_training(p, expert) for p in params}
    if len(found) != 1:
        raise ConfigError(f"merge_method {job.method.name}: density, {', '.join(SHARED_OPTIONS)} train one mask per "
                          f"model: give each one value (no gradients or filters)")
    return found.pop()


def _training(params: MethodParams, expert: int) -> MaskTraining:
    return MaskTraining(float(params.expert(expert, "density")),
                        *(params.shared[k] for k in SHARED_OPTIONS))  # type: ignore[arg-type]


def localized_parameters(runner: StageRunner) -> dict[str, nn.Parameter]:
    """The stage's parameters a mask covers (every floating-point one but embeddings and a tied head), set to
    require gradients; the others keep `requires_grad=False`, so autograd skips the embedding."""
    params = {}
    for prefix, module in runner.modules.items():
        for pname, p in module.named_parameters(remove_duplicate=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if p.is_floating_point() and not is_embedding(name) and not runner._tied_head(name):
                params[name] = p.requires_grad_(True)
    return params


class MaskStage(SensitivityStage):
    """One layer range's mask logits S for one expert, trained on the expert's data (see the module docstring).
    `forward` / `backward` / `last` as every sensitivity stage; `update()` after each epoch; `scales()` returns
    the binary masks (bool), so the workers' `get_scales` serves them like any statistics."""

    def __init__(self, runner: StageRunner, expert: str | os.PathLike | Checkpoint, training: MaskTraining) -> None:
        super().__init__(runner)
        self.expert = open_checkpoint(expert)
        self.training = training
        self.logits: dict[str, torch.Tensor] = {}
        bias = float(training.sigmoid_bias)
        for name in self.params:
            base, tau = self._inputs_of(name)
            keep = rank_mask(tau.abs(), max(1, int(training.density * tau.numel())))  # on CPU, as the merge
            self.logits[name] = torch.where(keep, bias, -bias).to(runner.device)
            self._write(name, base, tau)

    @staticmethod
    def _parameters(runner: StageRunner) -> dict[str, nn.Parameter]:
        return localized_parameters(runner)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return next_token_loss(logits, labels)

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        self.sums[name].add_(grad.float())

    def _inputs_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta_pre, tau) of one parameter in float32 on CPU, read from the checkpoints."""
        try:
            base = self.runner.checkpoint.read(name).to(torch.float32)
            expert = self.expert.read(name).to(torch.float32)
        except CheckpointError as e:
            raise StatisticsError(f"localize_stitch_trained: {e}") from None
        if expert.shape != base.shape:
            raise StatisticsError(f"localize_stitch_trained: {self.expert.path}: tensor {name!r} has shape "
                                  f"{tuple(expert.shape)}, the base's {tuple(base.shape)}; a mask needs equal shapes")
        return base, expert - base

    def _write(self, name: str, base: torch.Tensor, tau: torch.Tensor) -> None:
        """theta = theta_pre + sigmoid(S) * tau, in the stage's compute dtype. The parameter gets new storage:
        a float32 one may share its memory with the checkpoint's reads, which must keep reading theta_pre."""
        s = self.logits[name]
        theta = torch.addcmul(base.to(s.device), torch.sigmoid(s), tau.to(s.device))
        self.params[name].data = theta.to(self.runner.dtype)

    def update(self) -> None:
        """One step on S from the gradients summed since the last update, then theta for the new S."""
        lr, l1 = float(self.training.lr), float(self.training.l1_strength)
        for name, s in self.logits.items():
            base, tau = self._inputs_of(name)
            grad = self.sums[name]
            if self.loss_scale != 1.0:
                grad.div_(self.loss_scale)
            sig = torch.sigmoid(s)
            step = grad.mul_(tau.to(s.device)).mul_(lr).add_(l1).mul_(sig * (1.0 - sig))
            s.sub_(step)
            grad.zero_()
            self._write(name, base, tau)

    def scales(self) -> dict[str, torch.Tensor]:
        """The binary masks round(sigmoid(S)) (sigmoid 0.5 rounds to 0, as torch.round does)."""
        return {name: torch.round(torch.sigmoid(s)).bool().cpu() for name, s in self.logits.items()}


def run_epoch(stages: Sequence[MaskStage], blocks: torch.Tensor, desc: str = "masks") -> None:
    """Every block forward and backward through the chained stages (in process), then one update each."""
    backprop_blocks(stages, blocks, desc, labels=True)
    for stage in stages:
        stage.update()


def train_masks(base: str | os.PathLike | Checkpoint, expert: str | os.PathLike | Checkpoint, blocks: torch.Tensor,
                training: MaskTraining, layer_ranges: Sequence[tuple[int, int]] | None = None,
                dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
                ) -> dict[str, torch.Tensor]:
    """`expert`'s trained masks over `base` on `blocks`, its stages chained in this process (the Ray pipeline,
    `driver.WorkerPool.train_masks`, computes the same per stage)."""
    ckpt = open_checkpoint(base)
    ranges = calibration_stages(ckpt, layer_ranges)
    last = len(ranges) - 1
    stages = [MaskStage(StageRunner(ckpt, a, b, k == 0, k == last, dtype, device), expert, training)
              for k, (a, b) in enumerate(ranges)]
    for epoch in range(training.epochs):
        run_epoch(stages, blocks, f"masks epoch {epoch + 1}/{training.epochs}")
    masks: dict[str, torch.Tensor] = {}
    for stage in stages:
        masks.update(stage.scales())
    return masks
