"""One row: which columns hold what and which tasks are kept (`Fields`), validating and normalising a raw row to a
`Row`, the `FILE:LINE: field 'F': reason` errors, and the `DataReport` of what was read."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from gist_scale.config import DataConfig, SourceConfig
from gist_scale.data.errors import DataError

__all__ = ["DEFAULT_TASK", "MAX_REPORTED_BAD_ROWS", "BadRow", "DataReport", "Fields", "Row", "SourceReport",
           "TasksLeftOut", "decode_line", "left_out_task", "missing_columns", "no_rows_left", "parse_row", "row_error"]

DEFAULT_TASK = "default"
"""`task_name` of every row when `data.task_column` is null."""
MAX_REPORTED_BAD_ROWS = 5


class Row(NamedTuple):
    """A validated row."""

    query: str
    pos: str
    """The row's first positive."""
    negs: list[str]
    task_name: str
    extra_pos: list[str | None]
    """Its other positives, P-1 of them (P: the source's `num_positives`), None where the row has fewer: the
    positive slots that go in front of its negatives (see `TripletBatch.slot_roles`). Empty when P is 1."""


@dataclass(frozen=True)
class TasksLeftOut:
    """The rows and tasks one option of a task filter (`Fields.include_tasks` / `exclude_tasks`) left out of a
    source."""

    option: str
    """`include_tasks` or `exclude_tasks`."""
    patterns: tuple[str, ...]
    rows: int
    tasks: tuple[str, ...]
    """The tasks left out, sorted."""

    @classmethod
    def count(cls, fields: Fields, rows: Mapping[str, Mapping[str, int]]) -> list[TasksLeftOut]:
        """From `{option: {task: rows left out}}`, in the filter's order (include first)."""
        return [cls(option, getattr(fields, option) or (), sum(rows[option].values()), tuple(sorted(rows[option])))
                for option in ("include_tasks", "exclude_tasks") if rows.get(option)]

    def describe(self) -> str:
        shown = ", ".join(self.tasks[:5]) + (f", ... {len(self.tasks) - 5} more" if len(self.tasks) > 5 else "")
        return (f"{self.option} {list(self.patterns)} left out {self.rows:,} row{'s' * (self.rows != 1)} of "
                f"{len(self.tasks)} task{'s' * (len(self.tasks) != 1)} ({shown})")


def no_rows_left(where: str, left_out: Sequence[TasksLeftOut]) -> DataError:
    """The error for a source whose every row a task filter left out."""
    return DataError(f"{where}: the task filter left no rows: {'; '.join(t.describe() for t in left_out)}; widen "
                     "include_tasks or narrow exclude_tasks (names or globs over the task names)")


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
    num_positives: int = 1
    """P: the first P texts of a list-valued positive column are the row's positives."""
    include_tasks: tuple[str, ...] | None = None
    """The task filter of a source or of `data.path`: names or `fnmatch` globs over task names (the `task_column`
    values, or the source's name); rows of the other tasks are left out before they are validated. None: no
    filter."""
    exclude_tasks: tuple[str, ...] | None = None
    """Names or globs of the tasks to leave out (as `include_tasks`)."""

    @classmethod
    def from_config(cls, cfg: DataConfig, source: SourceConfig | None = None) -> Fields:
        """The data section's columns, or a mixture source's, where its own options override the section's."""

        def option(name: str) -> Any:
            own = None if source is None else getattr(source, name)
            return getattr(cfg, name) if own is None else own

        query, pos, negs = option("query_column"), option("pos_column"), tuple(option("neg_columns"))
        instructed = {query} if cfg.query_instruction else set()
        if cfg.pos_instruction:
            instructed.add(pos)
        if cfg.neg_instruction:
            instructed.update(negs)
        if source is None:
            return cls(query, pos, negs, cfg.task_column, frozenset(instructed), num_positives=cfg.num_positives,
                       include_tasks=cfg.include_tasks, exclude_tasks=cfg.exclude_tasks)
        return cls(query, pos, negs, source.task_column, frozenset(instructed), source.name, source.num_negatives,
                   option("num_positives"), option("include_tasks"), option("exclude_tasks"))

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


def _texts(value: Any, column: str, row: Mapping[str, Any], instructed: bool, medi: bool, what: str) -> list[str]:
    """The texts of a column that may hold a list of them. In MEDI's pair form (the query a list), a 2-string list
    is one `[instruction, text]`."""
    if isinstance(value, list) and not (medi and _is_pair(value)):
        if not value:
            raise BadRow(column, f"empty list of {what}")
        return [_text(v, column, row, instructed) for v in value]
    return [_text(value, column, row, instructed)]


def _row_task(row: Mapping[str, Any], fields: Fields) -> str:
    """The row's task: its `task_column` value, or the source's task when there is no task column."""
    if fields.task is None:
        return fields.default_task
    value = row.get(fields.task)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRow(fields.task, "missing" if value is None else f"expected a task name, got {value!r}")
    return value.strip()


def left_out_task(row: Mapping[str, Any], fields: Fields) -> tuple[str, str] | None:
    """(option, task) when the fields' task filter leaves the row's task out (`include_tasks`: it matches none of
    them; `exclude_tasks`: it matches one), else None (always None without a filter). Read before the rest of the
    row is validated: a left-out row need not be valid."""
    if fields.include_tasks is None and fields.exclude_tasks is None:
        return None
    task = _row_task(row, fields)
    if fields.include_tasks is not None and not any(fnmatchcase(task, p) for p in fields.include_tasks):
        return "include_tasks", task
    if fields.exclude_tasks is not None and any(fnmatchcase(task, p) for p in fields.exclude_tasks):
        return "exclude_tasks", task
    return None


def parse_row(row: Mapping[str, Any], fields: Fields, num_negatives: int | None) -> Row:
    """Validate and normalise one raw row, or raise `BadRow` naming the field."""
    query = _text(row.get(fields.query), fields.query, row, fields.query in fields.instructed)
    medi = isinstance(row.get(fields.query), list)
    positives = _texts(row.get(fields.pos), fields.pos, row, fields.pos in fields.instructed, medi, "positives")
    extra: list[str | None] = positives[1:fields.num_positives]
    extra += [None] * (fields.num_positives - 1 - len(extra))
    negs = [text for column in fields.negs
            for text in _texts(row.get(column), column, row, column in fields.instructed, medi, "negatives")]
    if fields.keep_negatives is not None:
        if len(negs) < fields.keep_negatives:
            raise BadRow(fields.negs[-1] if fields.negs else None, f"{len(negs)} negatives, but the source's "
                         f"num_negatives is {fields.keep_negatives}")
        negs = negs[:fields.keep_negatives]
    if num_negatives is not None and len(negs) != num_negatives:
        raise BadRow(fields.negs[-1], f"{len(negs)} negatives, but the first valid row has {num_negatives}; "
                                      "every row needs the same number")
    return Row(query, positives[0], negs, _row_task(row, fields), extra)


def decode_line(line: str) -> dict[str, Any]:
    """One JSON line as a row, or `BadRow` saying why it is not a JSON object."""
    try:
        row = json.loads(line.removeprefix("\ufeff"))  # the byte-order mark some Windows editors put first
    except json.JSONDecodeError as error:
        raise BadRow(None, f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise BadRow(None, f"expected a JSON object, got {type(row).__name__}")
    return row


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
    num_positives: int = 1
    left_out: tuple[TasksLeftOut, ...] = ()
    """What its task filter left out."""


@dataclass
class DataReport:
    """What `load_triplets` read (or a stream so far), for the startup summary and the model card."""

    source: str
    rows: int
    skipped: int
    skipped_examples: list[str]
    """The first few skipped rows as `FILE:ROW: field 'F': reason`."""
    num_negatives: int | None
    """K, the hard negatives per row; None when mixture sources differ (each batch then has its own source's K)."""
    tasks: dict[str, int]
    """Rows per task, largest first."""
    instructions: list[str] = field(default_factory=list)
    """Columns whose instruction was prepended."""
    sources: list[SourceReport] = field(default_factory=list)
    """The sources of a `data.sources` mixture, in configuration order (empty for `data.path`)."""
    num_positives: int | None = 1
    """P, the positive slots per row (`data.num_positives`); None when mixture sources differ."""
    left_out: list[TasksLeftOut] = field(default_factory=list)
    """What the task filter of `data.path` left out (a mixture's sources report their own)."""

    def lines(self) -> list[str]:
        shown = ", ".join(f"{t}={n}" for t, n in list(self.tasks.items())[:12])
        more = f", ... {len(self.tasks) - 12} more" if len(self.tasks) > 12 else ""
        negatives = "per source" if self.num_negatives is None else self.num_negatives
        positives = "per source" if self.num_positives is None else self.num_positives
        lines = [f"data: {self.source}",
                 f"  rows: {self.rows}, positives per row: {positives}, negatives per row: {negatives}, "
                 f"instructions: {', '.join(self.instructions) or 'none'}",
                 f"  tasks ({len(self.tasks)}): {shown}{more}"]
        lines.extend(f"  {left_out.describe()}" for left_out in self.left_out)
        for s in self.sources:
            lines.append(f"  source {s.name}: {s.rows} rows, {s.num_negatives} negatives, {s.num_positives} "
                         f"positive{'s' * (s.num_positives != 1)}, {s.tasks} task{'s' * (s.tasks != 1)}, {s.where}")
            lines.extend(f"    {left_out.describe()}" for left_out in s.left_out)
        if self.skipped:
            lines.append(f"  skipped {self.skipped} bad rows (data.on_bad_rows=skip); first:")
            lines.extend(f"    {example}" for example in self.skipped_examples)
        return lines
