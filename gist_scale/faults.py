"""Fault injection for tests: `GIST_SCALE_FAULT=POINT[:STEP]` makes the named point misbehave (at STEP only, or at
every step when none is given). A no-op unless the variable names the point.

Points:
- `die_during_checkpoint_save`: the main process exits with 137 (what `kill -9` looks like) after every rank's
  shards of step STEP are written but before the completion marker and the rename (`gist_scale.checkpoint`).
- `nonfinite_loss`: the loss of the last micro-batch of optimizer step STEP (1-based) becomes NaN, as an fp16
  overflow or a bad row would make it (`gist_scale.train`), so tests can check that the whole step is skipped. Only
  the first attempt: the skipped step is then taken on the next micro-batches.
"""

from __future__ import annotations

import os

FAULT_ENV = "GIST_SCALE_FAULT"


def requested(point: str, step: int) -> bool:
    """Does `GIST_SCALE_FAULT` ask `point` to fail at `step`?"""
    name, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    return name == point and (not at or int(at) == step)
