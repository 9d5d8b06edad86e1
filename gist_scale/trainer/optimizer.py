"""AdamW, its schedule, and how one optimizer step is applied or skipped: the only place where DeepSpeed differs.

A step is skipped whole when its loss was non-finite on some rank, and, like AMP's `GradScaler`, a skipped step still
advances the learning-rate schedule and the step counter; only the update (and Adam's own step count) is left out.
Where that decision is taken:

* `FusedStep` (one process, DDP): on the device. The fused AdamW kernel reads the optimizer's `found_inf` tensor
  and leaves the weights, both moments and its step count untouched when it is 1 (torch's `_fused_adam`, the path
  `GradScaler` uses), so the host never reads the flag. An unfused AdamW (`--optim.fused false`) cannot: the step
  reads the flag back to the host, the one read such a step makes.
* `DeepSpeedStep`: the engine. The update ran inside the last backward (Accelerate calls `engine.step()` there), and
  DeepSpeed's own overflow check (`configure_deepspeed` switches it on for every precision) skipped it and cleared
  the gradients; the step reports what the engine decided and reads nothing more itself.

So the loop learns of a skip only when it reads `NonFiniteSteps`, the skipped steps counted on the device at log and
checkpoint steps: the log line reports them, and too many in a row (`train.max_nonfinite_steps`, the longest run since
the previous log line) stop the run at the next log step, with one `error:` line.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor
from transformers import get_scheduler

from gist_scale.config import OptimConfig

__all__ = ["DeepSpeedStep", "FusedStep", "NonFiniteSteps", "OptimizerStep", "build_optimizer", "build_optimizer_step",
           "build_scheduler"]


def build_optimizer(student: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices, none on biases and norms."""
    decay, no_decay = [], []
    for name, param in student.named_parameters():
        # Under ZeRO-3 a parameter is an empty 1-D shard by now; `ds_shape` keeps its real shape.
        shape = getattr(param, "ds_shape", param.shape)
        if param.requires_grad:
            (no_decay if len(shape) < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on every device torch has the kernel for (CPU included): it is what skips a step on the device.
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=optim.fused)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup, then the configured decay. Built on the prepared optimizer: ZeRO-3 regroups the parameters, so a
    scheduler made before `prepare` would hold learning rates for groups that no longer exist."""
    name = optim.schedule if optim.schedule != "constant" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(optim.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


class OptimizerStep(ABC):
    """Applies a step's update after its backward passes, or skips it."""

    @abstractmethod
    def apply(self, nonfinite: Tensor) -> tuple[Tensor, Tensor | float | None]:
        """Update the weights unless `nonfinite` (a 0-dim bool on the device, the same on every rank) is set;
        returns whether the step was skipped (0-dim bool on the device) and the gradient norm before clipping (None
        without clipping), neither read back to the host."""


class FusedStep(OptimizerStep):
    """One process or DDP: clip, step the (fused) AdamW with the skip as its `found_inf`, drop the gradients."""

    def __init__(self, accelerator: Accelerator, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 max_grad_norm: float | None) -> None:
        self.accelerator, self.student, self.optimizer = accelerator, student, optimizer
        self.max_grad_norm = max_grad_norm
        self.adamw = optimizer.optimizer  # torch's, inside Accelerate's wrapper: the kernel reads `found_inf` there
        self.fused = bool(self.adamw.defaults.get("fused"))

    def apply(self, nonfinite: Tensor) -> tuple[Tensor, Tensor | None]:
        # A non-finite gradient makes the norm NaN and the clipped gradients too; the step is skipped anyway.
        grad_norm = (self.accelerator.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
                     if self.max_grad_norm else None)
        if self.fused:
            self.adamw.found_inf = nonfinite.float()
            self.optimizer.step()
            # fp16's GradScaler sets (and deletes) its own `found_inf`, which covers a non-finite loss too.
            vars(self.adamw).pop("found_inf", None)
        elif not nonfinite:  # an unfused kernel cannot skip on the device: the step's one host read
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go too, every micro-batch's
        return nonfinite, grad_norm


class DeepSpeedStep(OptimizerStep):
    """DeepSpeed: the engine applied or skipped the update inside the last backward; report its decision."""

    def __init__(self, engine, device: torch.device, clipping: bool) -> None:
        self.engine, self.device, self.clipping = engine, device, clipping

    def apply(self, nonfinite: Tensor) -> tuple[Tensor, Tensor | float | None]:
        # Host state of the engine (its overflow check read the device already); our code adds no read.
        skipped = torch.tensor(not self.engine.was_step_applied(), device=self.device)
        # The engine's own norm, as it computed it (Accelerate's `clip_grad_norm_` would read it back with .item()).
        return skipped, self.engine.get_global_grad_norm() if self.clipping else None


def build_optimizer_step(accelerator: Accelerator, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         optim: OptimConfig) -> OptimizerStep:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedStep(accelerator.deepspeed_engine_wrapped.engine, accelerator.device,
                             clipping=bool(optim.max_grad_norm))
    return FusedStep(accelerator, student, optimizer, optim.max_grad_norm)


class NonFiniteSteps:
    """Skipped steps since the last read, the current run of them in a row and the longest since the last read."""

    def __init__(self, device: torch.device, limit: int, in_a_row: int = 0) -> None:
        self.limit = limit
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._in_a_row = torch.full((), in_a_row, dtype=torch.int64, device=device)
        self._longest = self._in_a_row.clone()
        self._applied_anyway = torch.zeros((), dtype=torch.bool, device=device)
        """A non-finite loss whose update was applied (DeepSpeed's overflow check switched off): an error."""

    def add(self, skipped: Tensor, nonfinite: Tensor) -> None:
        """Count one step: whether it was skipped and whether its loss was non-finite (0-dim bools on the trainer's
        device, as the optimizer step and `distributed.agree_on_step` return them; not read)."""
        self._skipped += skipped
        self._in_a_row = (self._in_a_row + 1) * skipped
        torch.maximum(self._longest, self._in_a_row, out=self._longest)
        self._applied_anyway |= nonfinite & ~skipped

    def in_a_row(self) -> int:
        """The current run of skipped steps (for a checkpoint: a resume continues it). Reads the device."""
        return int(self._in_a_row)

    def read(self, step: int) -> tuple[int, int]:
        """`(skipped, longest run in a row)` since the last read, which starts a new count. Reads the device once;
        raises FloatingPointError (one line: `gist_scale.train.main`) when the run must stop."""
        skipped, longest, applied_anyway = torch.stack(
            [self._skipped, self._longest, self._applied_anyway.long()]).tolist()
        self._skipped.zero_()
        self._longest.copy_(self._in_a_row)
        if applied_anyway:
            raise FloatingPointError(
                f"by step {step}: a loss was non-finite but DeepSpeed applied the update; its gradient overflow check "
                "must be on (bf16.check_grad_overflow, set by gist-scale): check the DeepSpeed config")
        if longest >= self.limit:
            raise FloatingPointError(f"{longest} non-finite losses in a row by step {step}: lower optim.lr, or check "
                                     "the data (--debug shows shapes)")
        return skipped, longest
