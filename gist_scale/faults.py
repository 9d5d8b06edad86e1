"""Fault injection for tests: `GIST_SCALE_FAULT=POINT[:STEP]` makes the named point misbehave (at STEP only, or at
every step when none is given). Nothing changes unless the variable names the point, and no fault code runs in the
training step.

Points:
- `die_during_checkpoint_save`: the main process exits with 137 (what `kill -9` looks like) after every rank's
  shards of step STEP are written but before the completion marker and the rename (`gist_scale.checkpoint`).
- `nonfinite_loss`: the loss of the last micro-batch of the STEP-th optimizer step this process takes (1-based)
  becomes NaN, as an fp16 overflow or a bad row would make it, so tests can check that the whole step is skipped.
  `with_loss_fault` wraps the trainer's loss at startup when the variable names this point, and returns the loss
  itself otherwise.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from torch import Tensor

FAULT_ENV = "GIST_SCALE_FAULT"

LossFn = Callable[..., tuple[Tensor, object]]
"""A loss returning `(loss, statistics)`, as `gist_scale.loss.GISTLoss` does."""


def requested(point: str, step: int | None = None) -> bool:
    """Does `GIST_SCALE_FAULT` ask `point` to fail at `step`? Without a step: does it name `point` at all?"""
    name, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    return name == point and (step is None or not at or int(at) == step)


def with_loss_fault(loss_fn: LossFn, grad_accum_steps: int) -> LossFn:
    """`loss_fn`, or, when `GIST_SCALE_FAULT` names `nonfinite_loss`, a wrapper that counts its calls (one per
    micro-batch) and makes the loss NaN on the last micro-batch of the requested optimizer step."""
    if not requested("nonfinite_loss"):
        return loss_fn
    calls = itertools.count(1)

    def poisoned(*args, **kwargs) -> tuple[Tensor, object]:
        loss, stats = loss_fn(*args, **kwargs)
        step, micro_batch = divmod(next(calls), grad_accum_steps)
        if micro_batch == 0 and requested("nonfinite_loss", step):
            loss = loss * float("nan")
        return loss, stats

    return poisoned
