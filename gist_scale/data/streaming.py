"""`data.streaming`: triplets read through `datasets` streaming, for sources larger than the local disk.

Each source's files (or its hub dataset) are opened one after the other as `datasets.IterableDataset`s
(`load_dataset(..., streaming=True)`, see `gist_scale.data.sources.Part`) and read row by row; nothing is prepared
on disk. Rows are validated as they are read, by the same code and with the same messages as the prepared path
(`gist_scale.data.rows`): a bad row stops training with `FILE:LINE` (JSON lines) or `FILE:row N` (counted within
its file), unless `data.on_bad_rows=skip`. K, a source's negatives per row, comes from its first valid row. Rows
of tasks that the source's `include_tasks` / `exclude_tasks` leave out are counted and passed over, unvalidated.

Global batches: for global batch b the source is drawn by weight from `np.random.default_rng([seed, b])`, with
replacement (a stream's size is unknown, so there is no epoch to draw without replacement from). The source's rows
go into per-task buffers (one buffer with `data.task_homogeneous=false`) until one holds a whole global batch, which
is cut into micro-batches and ranks by `rank_micro_batches`, the cut `GlobalBatchSampler` makes. Every rank reads
every source's whole stream (the same rows everywhere, so batches agree without communication) and tokenizes only
its own slice. A source that ends starts over (a new pass); its buffers carry over. With `data.max_rows` a pass
ends after that many valid rows.

Resume: `state_dict()` is JSON: the global batches emitted and, per source, its pass, the file being read, the rows
read in it, that file's `IterableDataset.state_dict()` (the library's shard and offset), the buffered rows not
yet emitted (at most tasks x global batch per source) and its counts (rows read, skipped, left out by the task
filter). The trainer keeps it in `TrainerState.stream`; loading it continues with exactly the next global batch, on
any world size with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from gist_scale.config import MIXTURE_FILE, POLICY_FIELDS, DataConfig, SourceConfig
from gist_scale.data.batching import SamplerSummary, rank_micro_batches
from gist_scale.data.collate import TripletBatch, TripletCollator
from gist_scale.data.errors import DataError
from gist_scale.data.rows import (MAX_REPORTED_BAD_ROWS, BadRow, DataReport, Fields, Row, SourceReport, TasksLeftOut,
                                  decode_line, left_out_task, missing_columns, no_rows_left, parse_row, row_error)
from gist_scale.data.sources import Part, resolve
from gist_scale.data.tokenize import encoder_sides, tokenize_batch
from gist_scale.model.prompts import Prompts
from gist_scale.plan import global_batch

__all__ = ["StreamingBatches", "stream_fingerprint"]

_NOT_DATA = ("num_workers", "num_proc", "pad_to_multiple_of", "task_instructions", "drop_last", "sampling_alpha")
"""`DataConfig` fields that do not change which rows a stream yields in which order."""


def stream_fingerprint(cfg: DataConfig) -> str:
    """The streamed data's identity for `resume.check_data`: its configuration (paths, revisions, splits, columns,
    weights, validation options, task filters), since the rows themselves are not known before they are read. A
    source's loss policy (`POLICY_FIELDS`) is not data: a resume may change it, as on the prepared path."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_DATA}
    data["sources"] = [{k: v for k, v in source.items() if k not in POLICY_FIELDS} for source in data["sources"]]
    return Hasher.hash(data)


_START = {"pass": 0, "part": 0, "row": 0, "valid": 0, "position": None, "num_negatives": None, "buffers": {}, "read": 0,
          "skipped": 0, "examples": [], "tasks": {}, "left_out": {}}
"""A source's state before its first row (`_SourceStream.state_dict`)."""


class _SourceStream:
    """One source read row by row, pass after pass, with its position and its per-task buffers.

    Its position: `passes`, `part` (the file being read), `row` (rows read in that file, blank lines included: the
    last row's number), `valid` (valid rows read in the current pass) and `_position` (the file's
    `IterableDataset.state_dict()` to start from; None: its beginning). Its counts, over every pass: `read`,
    `skipped` (with the first `examples`), `tasks` and `left_out` (rows passed over by the task filter,
    `{option: {task: rows}}`).
    """

    def __init__(self, cfg: DataConfig, source: SourceConfig | None) -> None:
        self.cfg, self.source, self.name = cfg, source, source and source.name
        self.prefix = f"data.sources {source.name!r}: " if source else ""
        try:
            self.description, self.parts = resolve(cfg, cfg.split, source)
        except DataError as error:
            raise DataError(f"{self.prefix}{error}") from error
        self.fields = Fields.from_config(cfg, source)
        self.weight = 1.0 if source is None or source.weight is None else source.weight
        self._opened: dict[int, tuple[datasets.IterableDataset, dict]] = {}
        """Each part opened once, with its start state: a new pass reads it again from there (`load_dataset` costs
        a module lookup and, for the hub, requests, on every call)."""
        self.load_state_dict(_START)

    def take(self, size: int) -> list[Row]:
        """The next global batch: `size` rows of one buffer (one task), reading rows until a buffer holds them."""
        full = next((key for key, rows in self.buffers.items() if len(rows) >= size), None)
        while full is None:
            row = next(self._rows)
            key = row.task_name if self.cfg.task_homogeneous else ""
            buffer = self.buffers.setdefault(key, [])
            buffer.append(row)
            if len(buffer) >= size:
                full = key
        rows, self.buffers[full] = self.buffers[full][:size], self.buffers[full][size:]
        if not self.buffers[full]:
            del self.buffers[full]
        return rows

    def first_row(self) -> Row:
        """The first valid row of a pass (read on a fresh copy: this source's position does not move)."""
        return next(_SourceStream(self.cfg, self.source)._rows)

    def _pass_done(self) -> bool:
        return self.cfg.max_rows is not None and self.valid >= self.cfg.max_rows

    def _read(self) -> Iterator[Row]:
        while True:
            while self.part < len(self.parts):
                yield from self._read_part(self.parts[self.part])
                if self._pass_done():
                    break
                self.part, self.row, self._position, self._dataset = self.part + 1, 0, None, None
            if self.valid == 0:
                left_out = self.left_out_report()
                error = no_rows_left(self.description, left_out) if left_out else f"{self.description}: no rows"
                first = f"; first bad row: {self.examples[0]}" if self.examples else ""
                raise DataError(f"{self.prefix}{error}{first}")
            self.passes, self.part, self.row, self.valid = self.passes + 1, 0, 0, 0
            self._position, self._dataset = None, None

    def _read_part(self, part: Part) -> Iterator[Row]:
        try:
            if self.part not in self._opened:
                dataset = part.stream()
                self._opened[self.part] = dataset, dataset.state_dict()
            dataset, start = self._opened[self.part]
            dataset.load_state_dict(self._position or start)
            rows = iter(dataset)
        except DataError as error:
            raise DataError(f"{self.prefix}{error}") from error
        except Exception as error:  # the loaders raise many types; `failure` says which file and why
            raise DataError(f"{self.prefix}{part.failure(error)}") from error
        self._dataset = dataset
        columns_checked = part.jsonl
        while not self._pass_done():
            try:
                raw = next(rows)
            except StopIteration:
                return
            except Exception as error:
                raise DataError(f"{self.prefix}{part.failure(error)}") from error
            self.row += 1
            if not columns_checked and (missing := missing_columns(part.where, self.fields, list(raw))):
                raise DataError(f"{self.prefix}{missing}")
            columns_checked = True
            row = self._validate(raw, part)
            if row is not None:
                yield row

    def _validate(self, raw: dict[str, Any], part: Part) -> Row | None:
        """The normalised row, or None for a blank line or a skipped bad row; raises on a bad row unless skipping."""
        if part.jsonl and not raw["text"].strip():
            return None  # not a row, but it keeps the line count
        try:
            values = decode_line(raw["text"]) if part.jsonl else raw
            if (left_out := left_out_task(values, self.fields)) is not None:
                option, task = left_out
                self.left_out[option][task] += 1
                return None
            row = parse_row(values, self.fields, self.num_negatives)
        except BadRow as bad:
            message = self.prefix + row_error(part.where, self.row - 1, part.jsonl, bad)
            if self.cfg.on_bad_rows == "error":
                raise DataError(f"{message} (--data.on_bad_rows=skip skips bad rows)") from None
            self.skipped += 1
            if len(self.examples) < MAX_REPORTED_BAD_ROWS:
                self.examples.append(message)
            return None
        if self.num_negatives is None:
            self.num_negatives = len(row.negs)
        self.valid += 1
        self.read += 1
        self.tasks[row.task_name] += 1
        return row

    def state_dict(self) -> dict[str, Any]:
        position = self._dataset.state_dict() if self._dataset is not None else self._position
        return {"pass": self.passes, "part": self.part, "row": self.row, "valid": self.valid, "position": position,
                "num_negatives": self.num_negatives,
                "buffers": {key: [list(row) for row in rows] for key, rows in self.buffers.items()},
                "read": self.read, "skipped": self.skipped, "examples": list(self.examples), "tasks": dict(self.tasks),
                "left_out": {option: dict(tasks) for option, tasks in self.left_out.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not 0 <= state["part"] < len(self.parts):
            raise DataError(f"{self.prefix}{self.description}: the checkpoint's stream was reading file "
                            f"{state['part'] + 1}, but the source has {len(self.parts)}; resume with the data the run "
                            "started with")
        self.passes, self.part, self.row, self.valid = state["pass"], state["part"], state["row"], state["valid"]
        # The rows from this position; the generator reads the fields set here when the first row is asked for.
        self._position, self._dataset, self._rows = state["position"], None, self._read()
        self.num_negatives = state["num_negatives"]
        self.buffers = {key: [Row(*row) for row in rows] for key, rows in state["buffers"].items()}
        self.read, self.skipped = state["read"], state["skipped"]
        self.examples, self.tasks = list(state["examples"]), Counter(state["tasks"])
        self.left_out = defaultdict(Counter, {option: Counter(tasks) for option, tasks in state["left_out"].items()})

    def left_out_report(self) -> list[TasksLeftOut]:
        """What the task filter passed over so far."""
        return TasksLeftOut.count(self.fields, self.left_out)


class StreamingBatches:
    """This rank's collated micro-batches, read from streamed sources (see the module's docstring).

    Iterating yields `TripletBatch`es (with `source` for a mixture, which `MixtureMeter` counts), forever: the
    trainer stops after `train.max_steps`. `global_batches()` yields the same global batches as rows of text,
    before they are cut for this rank (`rank_micro_batches`) and tokenized.
    """

    def __init__(self, cfg: DataConfig, collator: TripletCollator, student_tokenizer: PreTrainedTokenizerBase,
                 student_max_length: int, guide_tokenizer: PreTrainedTokenizerBase | None = None,
                 guide_max_length: int | None = None, *, batch_size: int, world_size: int = 1, rank: int = 0,
                 grad_accum_steps: int = 1, seed: int = 0, student_prompts: Prompts | None = None,
                 guide_prompts: Prompts | None = None) -> None:
        self.collator = collator
        self.sides = encoder_sides(student_tokenizer, student_max_length, guide_tokenizer, guide_max_length,
                                   student_prompts, guide_prompts)
        self.world_size, self.rank, self.grad_accum_steps, self.seed = world_size, rank, grad_accum_steps, seed
        self.global_batch_size = global_batch(batch_size, world_size, grad_accum_steps)
        self.instructions = sorted(Fields.from_config(cfg).instructed)
        self.mixture = bool(cfg.sources)
        self.sources = [_SourceStream(cfg, source) for source in cfg.sources or [None]]
        self.source_names = [s.name or s.description for s in self.sources]
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.shares = weights / weights.sum()
        self.batches = 0
        """Global batches emitted."""
        self._micro = 0
        self.summary = SamplerSummary(steps_per_epoch=0, dropped_rows=0)
        """For `ResumePlan.check_data`: a stream has no epochs (no plan that a world-size change could alter) and
        drops no rows (a task's rows wait in its buffer)."""

    def check(self) -> None:
        """Read each drawn source up to its first valid row, so that a wrong path, column mapping or format fails
        now (before any model loads) rather than at the first step that draws it; fixes each source's K."""
        for source, share in zip(self.sources, self.shares):
            if share > 0 and source.num_negatives is None:
                source.num_negatives = len(source.first_row().negs)

    def global_batches(self) -> Iterator[tuple[int, list[Row]]]:
        """(source index, rows) of each global batch from the current position; advances the position."""
        while True:
            # Drawn from (seed, batch) alone: the same on every rank and after a resume.
            source = int(np.random.default_rng([self.seed, self.batches]).choice(len(self.shares), p=self.shares))
            rows = self.sources[source].take(self.global_batch_size)
            self.batches += 1
            yield source, rows

    def __iter__(self) -> Iterator[TripletBatch]:
        for source, rows in self.global_batches():
            for micro in rank_micro_batches(rows, self.grad_accum_steps, self.world_size, self.rank):
                self._micro += 1
                yield self._collate(micro, source)

    def _collate(self, rows: list[Row], source: int) -> TripletBatch:
        columns = {name: [getattr(row, name) for row in rows] for name in Row._fields}
        tokenized = {k: v for k, v in tokenize_batch(columns, self.sides).items() if not k.startswith("_truncated_")}
        if self.mixture:
            tokenized["source"] = [source] * len(rows)
        return self.collator([{k: v[i] for k, v in tokenized.items()} for i in range(len(rows))])

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: global batches emitted, and each source's pass, file, row, stream state and buffers."""
        if self._micro % self.grad_accum_steps:
            raise RuntimeError("StreamingBatches.state_dict() between the micro-batches of a global batch; take it "
                               "at an optimizer-step boundary")
        return {"batches": self.batches, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise DataError(f"the checkpoint's stream has {len(state['sources'])} sources and this run "
                            f"{len(self.sources)}; resume with the data.sources the run started with")
        self.batches, self._micro = int(state["batches"]), 0
        for source, saved in zip(self.sources, state["sources"]):
            source.load_state_dict(saved)

    def lines(self) -> list[str]:
        """The startup summary's data lines."""
        single = len(self.sources) == 1
        lines = [f"data (streamed): {self.sources[0].description if single else f'{len(self.sources)} sources'}"
                 f", instructions: {', '.join(self.instructions) or 'none'}"
                 + ("" if single else "; sources drawn by weight, with replacement")]
        for source, share in zip(self.sources, self.shares):
            negatives = "?" if source.num_negatives is None else source.num_negatives
            positives = source.fields.num_positives
            lines.append(f"  {source.name or 'source'}: {negatives} negatives and {positives} "
                         f"positive{'s' * (positives != 1)} per row"
                         + ("" if single else f", share {share:.1%}, {source.description}"))
            lines.extend(f"    so far {left_out.describe()}" for left_out in source.left_out_report())
        if self.batches:
            for source in self.sources:
                buffered = sum(len(rows) for rows in source.buffers.values())
                lines.append(f"  resumed {source.name or 'stream'} in pass {source.passes + 1}, at row {source.row} "
                             f"of {source.parts[source.part].where}, {buffered} rows buffered")
        return lines

    def report(self) -> DataReport:
        """What was read so far, as `load_triplets` reports a prepared dataset (for the model card)."""
        tasks = sum((source.tasks for source in self.sources), Counter())
        negatives = {s.num_negatives for s in self.sources if s.num_negatives is not None}
        positives = {s.fields.num_positives for s in self.sources}
        description = self.sources[0].description if len(self.sources) == 1 else f"{len(self.sources)} sources"
        return DataReport(
            f"{description} (streamed)", sum(s.read for s in self.sources), sum(s.skipped for s in self.sources),
            [e for s in self.sources for e in s.examples][:MAX_REPORTED_BAD_ROWS],
            negatives.pop() if len(negatives) == 1 else None,
            dict(sorted(tasks.items(), key=lambda tc: (-tc[1], tc[0]))), self.instructions,
            [SourceReport(s.name, s.description, s.read, s.num_negatives or 0, len(s.tasks), s.fields.num_positives,
                          tuple(s.left_out_report())) for s in self.sources if self.mixture],
            positives.pop() if len(positives) == 1 else None,
            [] if self.mixture else self.sources[0].left_out_report())

    def write_mixture(self, run_dir: Path) -> None:
        """RUN/mixture.json with each source's requested share, for `gist-scale report` (several sources only)."""
        if len(self.sources) > 1:
            (run_dir / MIXTURE_FILE).write_text(json.dumps(
                {s.name: {"weight": s.weight, "requested": float(share)} for s, share in zip(self.sources, self.shares)},
                indent=1))
