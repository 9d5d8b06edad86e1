"""One row: which columns hold what (`Fields`), validating and normalising a raw row to (query, pos, negatives,
task), the `FILE:LINE: field 'F': reason` errors, and the `DataReport` of what was read."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gist_scale.config import DataConfig, SourceConfig
from gist_scale.data.errors import DataError

__all__ = ["DEFAULT_TASK", "MAX_REPORTED_BAD_ROWS", "BadRow", "DataReport", "Fields", "Row", "SourceReport",
           "decode_line", "missing_columns", "parse_row", "raw_rows", "row_error"]

DEFAULT_TASK = "default"
"""`task_name` of every row when `data.task_column` is null."""
MAX_REPORTED_BAD_ROWS = 5

Row = tuple[str, str, list[str], str]
"""A validated row: query, positive, negatives, task."""


@dataclass(frozen=True)
class Fields:
    """Which columns hold what, from the `DataConfig`; the instructed columns get their instruction prepended."""

    query: str
    pos: str
    negs: tuple[str, ...]
    task: str | None
    instructed: frozenset[str]
    default_task: str = DEFAULT_TASK
    """The task of every row when `task` is None (a mixture source's name)."""
    keep_negatives: int | None = None
    """Keep the first N negatives of each row (a source's `num_negatives`); None: all of them."""

    @classmethod
    def from_config(cls, cfg: DataConfig, source: SourceConfig | None = None) -> Fields:
        """The data section's columns, or a mixture source's, where its own options override the section's."""
        query = source.query_column or cfg.query_column if source else cfg.query_column
        pos = source.pos_column or cfg.pos_column if source else cfg.pos_column
        negs = cfg.neg_columns if source is None or source.neg_columns is None else source.neg_columns
        instructed = set()
        if cfg.query_instruction:
            instructed.add(query)
        if cfg.pos_instruction:
            instructed.add(pos)
        if cfg.neg_instruction:
            instructed.update(negs)
        if source is None:
            return cls(query, pos, tuple(negs), cfg.task_column, frozenset(instructed))
        return cls(query, pos, tuple(negs), source.task_column, frozenset(instructed), source.name,
                   source.num_negatives)

    def required(self) -> dict[str, str]:
        """Column -> the option that names it, for "no such column" messages."""
        names = {self.query: "--data.query_column", self.pos: "--data.pos_column"}
        names.update({c: "--data.neg_columns" for c in self.negs})
        if self.task is not None:
            names[self.task] = "--data.task_column (null: all rows one task)"
        return names

    def read(self) -> list[str]:
        """Every column a row may need, instruction columns included."""
        return list(self.required()) + [f"{c}_instruct" for c in sorted(self.instructed)]


class BadRow(Exception):
    """A row that cannot be used; the message names the field (none when the line is not a JSON object)."""

    def __init__(self, field_name: str | None, reason: str) -> None:
        super().__init__(f"field '{field_name}': {reason}" if field_name else reason)


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _text(value: Any, column: str, row: Mapping[str, Any], instructed: bool) -> str:
    """One text: a string or MEDI's `[instruction, text]`; the instruction is kept only when configured."""
    if value is None:
        raise BadRow(column, "missing")
    instruction = None
    if isinstance(value, list):
        if not _is_pair(value):
            raise BadRow(column, f"expected text or [instruction, text], got a list of {len(value)}")
        instruction, value = value
    if not isinstance(value, str):
        raise BadRow(column, f"expected text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise BadRow(column, "empty text")
    if not instructed:
        return text
    if instruction is None:
        instruction = row.get(f"{column}_instruct")
        if instruction is None:
            raise BadRow(column, f"no instruction to prepend: needs [instruction, text] values or a "
                                 f"'{column}_instruct' column (or turn the data.*_instruction option off)")
        if not isinstance(instruction, str):
            raise BadRow(f"{column}_instruct", f"expected text, got {type(instruction).__name__}")
    # GISTEmbed joins with a space: " ".join([instruction, text]).strip()
    return f"{instruction.strip()} {text}".strip()


def parse_row(row: Mapping[str, Any], fields: Fields, num_negatives: int | None) -> Row:
    """Validate and normalise one raw row, or raise `BadRow` naming the field."""
    query = _text(row.get(fields.query), fields.query, row, fields.query in fields.instructed)
    pos = _text(row.get(fields.pos), fields.pos, row, fields.pos in fields.instructed)
    # A list in a negative column holds several negatives, unless the row is in MEDI's pair form, where a
    # 2-string list is one [instruction, text] negative.
    medi = isinstance(row.get(fields.query), list)
    negs: list[str] = []
    for column in fields.negs:
        value = row.get(column)
        instructed = column in fields.instructed
        if isinstance(value, list) and not (medi and _is_pair(value)):
            if not value:
                raise BadRow(column, "empty list of negatives")
            negs.extend(_text(v, column, row, instructed) for v in value)
        else:
            negs.append(_text(value, column, row, instructed))
    if fields.keep_negatives is not None:
        if len(negs) < fields.keep_negatives:
            raise BadRow(fields.negs[-1] if fields.negs else None, f"{len(negs)} negatives, but the source's "
                         f"num_negatives is {fields.keep_negatives}")
        negs = negs[:fields.keep_negatives]
    if num_negatives is not None and len(negs) != num_negatives:
        raise BadRow(fields.negs[-1], f"{len(negs)} negatives, but the first valid row has {num_negatives}; "
                                      "every row needs the same number")
    task = fields.default_task
    if fields.task is not None:
        value = row.get(fields.task)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise BadRow(fields.task, "missing" if value is None else f"expected a task name, got {value!r}")
        task = value.strip()
    return query, pos, negs, task


def decode_line(line: str) -> dict[str, Any]:
    """One JSON line as a row, or `BadRow` saying why it is not a JSON object."""
    try:
        row = json.loads(line.removeprefix("\ufeff"))  # the byte-order mark some Windows editors put first
    except json.JSONDecodeError as error:
        raise BadRow(None, f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise BadRow(None, f"expected a JSON object, got {type(row).__name__}")
    return row


def raw_rows(batch: Mapping[str, list], size: int, fields: Fields,
             jsonl: bool) -> Iterator[str | Mapping[str, Any] | None]:
    """A `datasets` batch's raw rows: mappings, or JSON lines still to decode (so the caller can name a line that
    fails); None for a blank line, which is not a row but keeps the line count."""
    if jsonl:
        for line in batch["text"]:
            yield line if line.strip() else None
        return
    columns = {c: batch[c] for c in fields.read() if c in batch}
    for i in range(size):
        yield {c: values[i] for c, values in columns.items()}


def row_error(where: str, index: int, jsonl: bool, bad: BadRow) -> str:
    """`FILE:LINE: reason` for JSON lines, `FILE:row N: reason` for other formats (`index` counted from 0)."""
    return f"{where}:{index + 1}: {bad}" if jsonl else f"{where}:row {index + 1}: {bad}"


def missing_columns(where: str, fields: Fields, columns: Sequence[str]) -> DataError | None:
    """The error for a table that lacks a configured column (a wrong column mapping), or None."""
    absent = [c for c in fields.required() if c not in columns]
    if not absent:
        return None
    return DataError(f"{where}:row 1: field '{absent[0]}': missing: no such column (columns: {', '.join(columns)}); "
                     f"set {fields.required()[absent[0]]}")


@dataclass(frozen=True)
class SourceReport:
    """One source of `data.sources` as loaded, for the startup summary."""

    name: str
    where: str
    rows: int
    num_negatives: int
    tasks: int


@dataclass
class DataReport:
    """What `load_triplets` read (or a stream so far), for the startup summary and the model card."""

    source: str
    rows: int
    skipped: int
    skipped_examples: list[str]
    """The first few skipped rows as `FILE:ROW: field 'F': reason`."""
    num_negatives: int | None
    """K, the negatives per row; None when mixture sources differ (each batch then has its own source's K)."""
    tasks: dict[str, int]
    """Rows per task, largest first."""
    instructions: list[str] = field(default_factory=list)
    """Columns whose instruction was prepended."""
    sources: list[SourceReport] = field(default_factory=list)
    """The sources of a `data.sources` mixture, in configuration order (empty for `data.path`)."""

    def lines(self) -> list[str]:
        shown = ", ".join(f"{t}={n}" for t, n in list(self.tasks.items())[:12])
        more = f", ... {len(self.tasks) - 12} more" if len(self.tasks) > 12 else ""
        negatives = "per source" if self.num_negatives is None else self.num_negatives
        lines = [
            f"data: {self.source}",
            f"  rows: {self.rows}, negatives per row: {negatives}, "
            f"instructions: {', '.join(self.instructions) or 'none'}",
            f"  tasks ({len(self.tasks)}): {shown}{more}",
        ]
        lines.extend(f"  source {s.name}: {s.rows} rows, {s.num_negatives} negatives, {s.tasks} task"
                     f"{'s' * (s.tasks != 1)}, {s.where}" for s in self.sources)
        if self.skipped:
            lines.append(f"  skipped {self.skipped} bad rows (data.on_bad_rows=skip); first:")
            lines.extend(f"    {example}" for example in self.skipped_examples)
        return lines
