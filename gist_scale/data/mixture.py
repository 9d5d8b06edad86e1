"""Weighted mixtures of sources (`data.sources`): how many global batches each source gives an epoch
(`mixture_quotas`, `SourcePlan`), how many it gave so far (`MixtureMeter`), and RUN/mixture.json and the startup
summary's table."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gist_scale.config import MIXTURE_FILE
from gist_scale.data.collate import TripletBatch

__all__ = ["MixtureMeter", "SourcePlan", "mixture_lines", "mixture_quotas", "write_mixture"]


@dataclass(frozen=True)
class SourcePlan:
    """How one mixture source is drawn in every epoch."""

    name: str
    rows: int
    batches: int
    """Global batches the source's rows make (its size: each row once, tails as `drop_last` says)."""
    drawn: int
    """Global batches drawn from it per epoch: fewer than `batches` subsamples, more cycles (reshuffled)."""
    requested: float
    """Its requested share of the global batches (normalised weight, or size^alpha normalised)."""


def mixture_quotas(sizes: Sequence[int], weights: Sequence[float] | None = None,
                   alpha: float = 1.0) -> tuple[list[int], list[float]]:
    """Global batches per epoch drawn from each source, and the requested shares they realise.

    An epoch has as many global batches as the drawn sources (those with a share above 0) make once, so alpha = 1
    without weights is every batch exactly once. The requested share of source s is `weights[s] / sum(weights)`, or
    without weights `sizes[s]**alpha / sum(sizes**alpha)`; its quota is `epoch * share` rounded by largest remainder
    (ties to the earlier source), so the quotas add up to the epoch exactly.
    """
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    raw = np.asarray(weights, dtype=np.float64) if weights is not None else sizes_arr ** alpha
    share = raw / raw.sum()
    epoch = int(sizes_arr[share > 0].sum())
    exact = share * epoch
    quotas = np.floor(exact).astype(np.int64)
    remainders = exact - quotas
    quotas[np.argsort(-remainders, kind="stable")[: epoch - int(quotas.sum())]] += 1
    return quotas.tolist(), share.tolist()


class MixtureMeter:
    """Counts the global batches each mixture source contributed, for `metrics.jsonl` (a host-side count of the
    collator's `source`, no device read). All ranks see the same source in a step, so no reduction is needed."""

    def __init__(self, names: Sequence[str], grad_accum_steps: int, global_batch_size: int) -> None:
        self.names = list(names)
        self.grad_accum_steps, self.global_batch_size = grad_accum_steps, global_batch_size
        self._micro = [0] * len(self.names)

    def count(self, batch: TripletBatch) -> None:
        """Count one micro-batch (call it for each micro-batch the training loop receives)."""
        if batch.source is not None:
            self._micro[batch.source] += 1

    def flush(self) -> dict[str, float]:
        """`source/NAME/batches` and `source/NAME/rows` since the last flush, for the sources that had any (rows are
        full global batches: exact with `data.drop_last`); empty for a single source."""
        record: dict[str, float] = {}
        for name, micro in zip(self.names, self._micro):
            if micro:
                batches = micro / self.grad_accum_steps
                record[f"source/{name}/batches"] = batches
                record[f"source/{name}/rows"] = batches * self.global_batch_size
        self._micro = [0] * len(self.names)
        return record


def write_mixture(sources: Sequence[SourcePlan], run_dir: Path) -> None:
    """Write RUN/mixture.json (`{name: {rows, batches, drawn, requested}}`) for a run with several sources."""
    if len(sources) > 1:
        (run_dir / MIXTURE_FILE).write_text(json.dumps({s.name: dataclasses.asdict(s) for s in sources}, indent=1))


def mixture_lines(sources: Sequence[SourcePlan], steps_per_epoch: int) -> list[str]:
    """The startup summary's mixture table (nothing for a single source)."""
    if len(sources) < 2:
        return []
    return [f"mixture: {len(sources)} sources, epoch = {steps_per_epoch} global batches",
            *(f"  {s.name}: {s.rows} rows, {s.batches} batches; drawn {s.drawn} per epoch "
              f"(share {s.drawn / max(steps_per_epoch, 1):.1%}, requested {s.requested:.1%})" for s in sources)]
