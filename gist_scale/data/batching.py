"""Global batches: one pure cut of a global batch into this rank's grad-accum micro-batches (`rank_micro_batches`),
shared by the prepared sampler and the stream, and the prepared path's plan of task-homogeneous global batches per
epoch (`GlobalBatchSampler`).

Nothing here holds a Python object per row: task names are encoded to integer codes by Arrow, and the sampler's plan
is one integer array per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gist_scale.data.errors import DataError
from gist_scale.data.mixture import SourcePlan, mixture_quotas
from gist_scale.inference import shards
from gist_scale.plan import global_batch

__all__ = ["GlobalBatchSampler", "SamplerSummary", "rank_micro_batches"]

Rows = TypeVar("Rows", bound=Sequence[Any] | np.ndarray)


def rank_micro_batches(rows: Rows, grad_accum_steps: int, world_size: int, rank: int) -> list[Rows]:
    """This rank's micro-batches of one global batch (row indices or rows), one per grad-accum step.

    The global batch is cut into `grad_accum_steps` contiguous micro-batches, each into `world_size` contiguous rank
    slices, and this rank's slice of each is returned. Parts differ by at most one row, the larger first (as
    `np.array_split` cuts), so a smaller tail batch is spread as evenly as it can be; the ranks' slices, taken in
    rank order within each micro-batch, are the global batch again. It depends on its arguments alone, so every rank,
    the prepared sampler and the stream cut a global batch alike.
    """
    if grad_accum_steps < 1 or not 0 <= rank < world_size:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1 and rank={rank} in "
                         f"[0, world_size={world_size})")
    slices = [_even_parts(start, stop, world_size)[rank] for start, stop in _even_parts(0, len(rows), grad_accum_steps)]
    return [rows[start:stop] for start, stop in slices]


def _even_parts(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) cut into `parts` contiguous ranges as sharded inference cuts its texts (`shards`: sizes differ by
    at most one, the larger first)."""
    return [(start + part.start, start + part.stop) for part in shards(stop - start, parts)]


@dataclass(frozen=True)
class SamplerSummary:
    """Per-epoch facts for the startup summary; the same on every rank and in every epoch."""

    steps_per_epoch: int
    """Optimizer steps (global batches) per epoch."""
    dropped_rows: int
    """Rows left out of every epoch: tails dropped by `drop_last`, or too small to give every rank a row."""


def _codes(values: Any) -> np.ndarray:
    """Integer codes of a column of names, in sorted-name order, computed by Arrow (no Python string per row)."""
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(list(values), type=pa.string())
    names = pc.unique(array).sort()
    return pc.index_in(array, value_set=names).to_numpy(zero_copy_only=False)


class GlobalBatchSampler:
    """This rank's micro-batches of dataset indices, cut from task-homogeneous global batches.

    Per epoch, from a generator seeded with (seed, epoch): each task's rows are shuffled and cut into global
    batches of `batch_size * world_size * grad_accum_steps` rows, and the batch order is shuffled. Each global
    batch is cut by `rank_micro_batches`: `grad_accum_steps` micro-global batches of `batch_size * world_size`
    rows, each sliced contiguously by rank. Every rank computes the same plan, so in every step all ranks hold rows
    of one task. With `task_homogeneous=False` all rows form one group, mixing tasks.

    A task's tail (fewer rows than a global batch) is dropped and counted in `dropped_rows`, unless
    `drop_last=False`: then it forms one smaller global batch, split as evenly as possible over the micro-batches
    and ranks, so batches differ by at most one row and no rank gets an empty one; a tail with fewer rows than
    `world_size * grad_accum_steps` cannot give every rank a row in every micro-batch and is dropped and counted.

    Mixtures: with `sources` (each row's source index) every global batch also holds one source's rows, tasks
    grouped within each source. Each source makes its batches as above; an epoch draws `mixture_quotas` of them
    per source (the first ones of the source's shuffled batches; a source asked for more than it has is cycled,
    each pass reshuffled) and orders all drawn batches by a random permutation, so any stretch of steps follows
    the requested shares. With one source this is exactly the single-source plan.

    `state_dict()` holds the epoch and the micro-batches already yielded in it; `load_state_dict` makes the next
    iteration start exactly there. Iterating to the end finishes the epoch; call `set_epoch(epoch + 1)` before the
    next one. DataLoader workers prefetch indices ahead of training, so then checkpoint the micro-batches that
    training received as `{"epoch", "position"}` rather than this sampler's own position.
    """

    def __init__(self, task_names: Sequence[str] | pa.ChunkedArray, batch_size: int, world_size: int,
                 rank: int, grad_accum_steps: int = 1, seed: int = 0, task_homogeneous: bool = True,
                 drop_last: bool = True, *,
                 sources: Sequence[int] | pa.ChunkedArray | None = None, source_names: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None, sampling_alpha: float = 1.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.grad_accum_steps, self.seed, self.drop_last = grad_accum_steps, seed, drop_last
        self.global_batch_size = global_batch(batch_size, world_size, grad_accum_steps)
        count = len(task_names)
        # int32 per row (5M rows: 20 MB an array): the source index, then the (source, task) group key.
        key = np.zeros(count, dtype=np.int32) if sources is None else np.asarray(sources, dtype=np.int32)
        num_sources = int(key.max(initial=0)) + 1 if source_names is None else len(source_names)
        names = list(source_names) if source_names is not None else [str(s) for s in range(num_sources)]
        # Rows grouped by (source, task), tasks in sorted-name order: one stable argsort of integer keys.
        tasks = 1
        if task_homogeneous:
            codes = _codes(task_names)
            tasks = int(codes.max(initial=0)) + 1
            key = key.astype(np.int64 if num_sources * tasks >= 2**31 else np.int32) * tasks + codes
            del codes
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bounds = np.flatnonzero(np.diff(sorted_key)) + 1
        self._groups: list[list[np.ndarray]] = [[] for _ in range(num_sources)]
        if count:
            for start, group in zip(np.r_[0, bounds].tolist(), np.split(order, bounds)):
                self._groups[int(sorted_key[start]) // tasks].append(group)
        # Per source, per group: (full global batches, tail rows); a kept tail is one batch more, a dropped one counts.
        cuts = [[divmod(len(group), self.global_batch_size) for group in groups] for groups in self._groups]
        sizes = [sum(full + self._keeps_tail(tail) for full, tail in groups) for groups in cuts]
        dropped = sum(tail for groups in cuts for _, tail in groups if not self._keeps_tail(tail))
        for s, size in enumerate(sizes):
            if size == 0 and (weights is None or weights[s] > 0):
                largest = max((len(g) for g in self._groups[s]), default=0)
                if num_sources == 1:
                    raise DataError(f"no global batch of {self.global_batch_size} rows (batch_size {batch_size} x "
                                    f"world size {world_size} x grad_accum_steps {grad_accum_steps}) fits: the "
                                    f"largest task has {largest} rows; lower train.batch_size, set "
                                    "data.drop_last=false or data.task_homogeneous=false")
                raise DataError(f"data.sources {names[s]!r}: no global batch of {self.global_batch_size} rows fits "
                                f"in it (largest task: {largest} rows); lower train.batch_size, set "
                                "data.drop_last=false, or give it weight 0 or remove it")
        self._quotas, requested = mixture_quotas(sizes, weights, sampling_alpha)
        rows = [sum(len(g) for g in groups) for groups in self._groups]
        self.sources = [SourcePlan(*plan) for plan in zip(names, rows, sizes, self._quotas, requested)]
        """The mixture, one `SourcePlan` per source (one entry without `sources`)."""
        self.summary = SamplerSummary(steps_per_epoch=sum(self._quotas), dropped_rows=dropped)
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def _keeps_tail(self, rows: int) -> bool:
        """Does a task's tail of `rows` (< a global batch) become a smaller batch? Only with `drop_last` off and
        enough rows for every rank's every micro-batch (so no rank gets an empty one)."""
        return not self.drop_last and rows >= self.world_size * self.grad_accum_steps

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (the same on every rank)."""
        return self.summary.steps_per_epoch * self.grad_accum_steps

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first micro-batch; its order depends only on (seed, epoch)."""
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"sampler state {dict(state)} does not fit this data: {len(self)} micro-batches "
                             "per epoch; was the dataset, batch size or world size changed?")
        self.epoch, self.position = epoch, position

    def _shuffled_batches(self, groups: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """One pass over a source: every group's rows shuffled and cut into global batches, batches shuffled."""
        batches: list[np.ndarray] = []
        for group in groups:
            rows = group[rng.permutation(len(group))]
            # Full global batches, then the tail: the last part, possibly empty.
            *full, tail = np.split(rows, range(self.global_batch_size, len(rows) + 1, self.global_batch_size))
            batches.extend(full)
            if self._keeps_tail(len(tail)):
                batches.append(tail)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches in order, from (seed, epoch) alone, the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        drawn: list[Iterator[np.ndarray]] = []
        for groups, quota in zip(self._groups, self._quotas):
            batches: list[np.ndarray] = []
            while len(batches) < quota:
                batches.extend(self._shuffled_batches(groups, rng))
            drawn.append(iter(batches[:quota]))
        order = rng.permutation(np.repeat(np.arange(len(drawn)), self._quotas))
        return [next(drawn[source]) for source in order.tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._global_batches(self.epoch))
        batches = self._plan[1]
        while self.position < len(self):
            batch, micro = divmod(self.position, self.grad_accum_steps)
            indices = rank_micro_batches(batches[batch], self.grad_accum_steps, self.world_size, self.rank)[micro]
            self.position += 1
            yield indices.tolist()
