"""Steps skipped for a non-finite loss: counted on the device, read at log and checkpoint steps.

The skip itself is decided on the device (`gist_scale.trainer.optimizer`), so the loop learns of it only when it reads
these counters: the log line reports the skipped steps, and too many in a row (`train.max_nonfinite_steps`, the
longest run since the previous log line) stop the run at the next log step, with one `error:` line.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NonFiniteSteps"]


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
