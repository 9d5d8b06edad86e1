"""The data path: triplet sources -> validated Arrow dataset -> cached dual tokenization -> global batches.

Everything heavy runs through `datasets` (Arrow files, memory-mapped, cached by fingerprint), so a restarted or
resumed job, and every rank of a job, reuses the first run's work instead of re-reading and re-tokenizing text:

1. `load_triplets` reads local JSON/JSONL/Parquet/CSV files or folders, or a hub dataset, with `datasets`' own
   loaders, then one cached batched map validates every row and normalises it to `query`, `pos`, `negs` (always K
   negatives), `task_name`, with instructions prepended where configured. Bad rows stop the job before training
   with `FILE:LINE` (JSONL) or `FILE:row N` (other formats, N counted from 1), the field and the reason; with
   `data.on_bad_rows=skip` they are dropped and reported instead. Nothing is dropped silently.
2. `tokenize_triplets` tokenizes every text once for the student and once for the guide, each with its own
   tokenizer and max length, in a cached batched map, and records which texts were truncated. The training step
   then only pads ids (`TripletCollator`); it never decodes and re-encodes text.
3. `GlobalBatchSampler` builds global batches of one task each, reshuffled per epoch from (seed, epoch); every
   rank takes its slice of the same global batch, so a step's in-batch negatives all come from one task, as in
   GISTEmbed. With several sources (`data.sources`) each global batch also comes from one source, and the sources
   are drawn by weight (see `mixture_quotas`). Its state (epoch, position) makes resumption exact.

`data.streaming` reads the same sources (`_Part.stream`) with the same validation, without preparing them on disk:
see `gist_scale.streaming`.

Nothing here holds a Python object per row: rows stay in memory-mapped Arrow files, task names are encoded to integer
codes by Arrow, and the sampler's plan is one integer array per epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.exceptions import DatasetGenerationError
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from gist_scale.config import MIXTURE_FILE, DataConfig, SourceConfig
from gist_scale.places import text_file_problem
from gist_scale.plan import global_batch
from gist_scale.chunking import chunk_texts
from gist_scale.model.prompts import Prompts, prompt_length

__all__ = [
    "DataError", "DataReport", "SourceReport", "load_triplets", "tokenize_triplets", "measure_tokenization_rate",
    "GlobalBatchSampler", "SamplerSummary", "SourcePlan", "mixture_quotas", "MixtureMeter", "write_mixture",
    "mixture_lines", "build_sampler", "TokenCounts", "TripletCollator", "build_dataloader", "sample_data_path",
]

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local file suffix -> `datasets` packaged loader."""
SAMPLE_SPLITS = ("train", "eval")
DEFAULT_TASK = "default"
"""`task_name` of every row when `data.task_column` is null."""
MAX_REPORTED_BAD_ROWS = 5
_SPLIT_WORDS = {"train": "train", "training": "train", "eval": "eval", "evaluation": "eval", "test": "test",
                "testing": "test", "validation": "validation", "valid": "validation", "val": "validation",
                "dev": "validation"}
"""Split names recognised in a folder's file and directory names, with their synonyms."""
_ERROR = "_error"
_TEXT_FEATURES = datasets.Features({
    "query": datasets.Value("string"), "pos": datasets.Value("string"),
    "negs": datasets.List(datasets.Value("string")), "task_name": datasets.Value("string"),
    "source": datasets.Value("int32"), _ERROR: datasets.Value("string"),
})
"""Validated rows; `source` is the row's index in `data.sources` (dropped for a single `data.path`)."""


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file, the row, the field and the fix."""


# ----------------------------------------------------------------------------------------------- sources


def sample_data_path(split: str) -> Path:
    """The shipped WordNet sample's `train` or `eval` JSONL (see `gist_scale/sample_data/wordnet/README.md`)."""
    if split not in SAMPLE_SPLITS:
        raise DataError(f"the shipped sample has no split {split!r}: use one of {', '.join(SAMPLE_SPLITS)}")
    return Path(str(resources.files("gist_scale") / "sample_data" / "wordnet" / f"{split}.jsonl"))


@dataclass(frozen=True)
class _Part:
    """One unit that is loaded and validated on its own, so errors can name its file and row."""

    where: str
    """File path or hub description, the prefix of every error message about its rows."""
    load: Callable[[], datasets.Dataset]
    """Reads the raw rows (deferred, so a hub download starts only when this part is validated)."""
    jsonl: bool
    """Rows are JSON lines read as text: rows are numbered as lines, and decoded in the validation map."""
    stream: Callable[[], datasets.IterableDataset]
    """Opens the same raw rows as a `datasets.IterableDataset`, read only as it is iterated (`data.streaming`)."""
    failure: Callable[[Exception], DataError]
    """The one-line `DataError` for an exception its reader raises (what and why), for errors met while streaming."""


def _split_word(name: str) -> str | None:
    """The split a file or folder name announces (`train.jsonl`, `eval-00001.parquet`, `validation/`), if any."""
    word = re.split(r"[-_. 0-9]", name.lower(), maxsplit=1)[0]
    return _SPLIT_WORDS.get(word)


def _folder_files(folder: Path, split: str) -> list[Path]:
    """The folder's data files for `split`: those named after it when any file names a split, else all of them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no {'/'.join(sorted(FORMATS))} files in this folder")
    named = {p: next((w for part in p.relative_to(folder).parts if (w := _split_word(part))), None) for p in files}
    wanted = _SPLIT_WORDS.get(split.lower(), split.lower())
    if any(named.values()):
        files = [p for p in files if named[p] == wanted]
        if not files:
            found = ", ".join(sorted({w for w in named.values() if w}))
            raise DataError(f"{folder}: no files for split {split!r} (its files are named for: {found}); "
                            "set --data.split to one of those")
    kinds = {FORMATS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{folder}: mixes {' and '.join(sorted(kinds))} files; point --data.path at one kind")
    return files


def _is_json_lines(path: Path) -> bool:
    """JSONL, or a `.json` file holding JSON lines rather than one JSON document (an array)."""
    suffix = path.suffix.lower()
    if suffix != ".json":
        return suffix == ".jsonl"
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return not head.startswith(b"[")


def _local_part(path: Path) -> _Part:
    """One file read with `datasets`' loader; JSON lines as text, so a malformed line cannot stop the reader."""
    jsonl = _is_json_lines(path)
    builder = "text" if jsonl else FORMATS[path.suffix.lower()]
    kind = "JSON lines" if jsonl else builder

    def stream() -> datasets.IterableDataset:
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)

    return _Part(str(path), lambda: read_local_file(path, builder, str(path), kind), jsonl, stream,
                 lambda error: _read_failure(path, builder, str(path), kind, error))


def read_local_file(path: Path, builder: str, label: str, kind: str) -> datasets.Dataset:
    """One local file through `datasets`' packaged loader `builder` (`json`, `csv`, `parquet`, `text`).

    A failure is a `DataError` starting with `label` that says why: an empty file, a byte that is not UTF-8 (with
    its line), or the reader's own reason, which `datasets` hides behind "An error occurred while generating the
    dataset".
    """
    verbosity = datasets.logging.get_verbosity()
    # The readers log their failure before raising it; the one line we raise says it better.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # the loaders raise many types (ArrowInvalid, ParserError, UnicodeDecodeError...)
        raise _read_failure(path, builder, label, kind, error) from error
    finally:
        datasets.logging.set_verbosity(verbosity)


def _read_failure(path: Path, builder: str, label: str, kind: str, error: Exception) -> DataError:
    return DataError(f"{label}: cannot read as {kind}: {_read_problem(path, builder, error)}")


def _read_problem(path: Path, builder: str, error: Exception) -> str:
    """Why a reader failed on `path`, with the fix where it is known. Reads the file: only on the error path."""
    problem = text_file_problem(path) if builder != "parquet" else None
    if problem == "empty file" or (problem is None and builder == "csv" and _is_header_only(path)):
        return f"{problem or 'a header but no rows'}; give a file with rows"
    if problem is not None:
        return f"{problem}; save it as UTF-8"
    if isinstance(error, DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__  # the reader's own error: a CSV line with too many fields, bad JSON ...
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_header_only(path: Path) -> bool:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip()) <= 1


def _resolve(cfg: DataConfig, split: str) -> tuple[str, list[_Part]]:
    """The source description and its parts, from `data.path` (unset: the shipped sample)."""
    if cfg.path is None:
        path = sample_data_path(split)
        return f"WordNet sample {split} ({path})", [_local_part(path)]
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        files = _folder_files(path, split)
        description = f"{path} ({len(files)} file{'s' * (len(files) > 1)}, split {split})"
    elif path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(sorted(FORMATS))}")
        files, description = [path], str(path)
    elif path.suffix.lower() in FORMATS or cfg.path.startswith((".", "/", "~")):
        raise DataError(f"--data.path {cfg.path}: no such file or folder")
    else:
        where = f"{cfg.path}@{cfg.revision or 'main'}[{split}]"

        def hub_failure(error: Exception) -> DataError:  # network, authentication, unknown split: all end alike
            return DataError(f"cannot load hub dataset {where}: {error}; for local data give an existing file or "
                             "folder as --data.path")

        def load_hub(**streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
            try:
                return datasets.load_dataset(cfg.path, revision=cfg.revision, split=split, **streaming)
            except Exception as error:
                raise hub_failure(error) from error

        return f"hub dataset {where}", [_Part(where, load_hub, False, lambda: load_hub(streaming=True), hub_failure)]
    return description, [_local_part(file) for file in files]


# ------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class _Fields:
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
    def from_config(cls, cfg: DataConfig, source: SourceConfig | None = None) -> _Fields:
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


class _BadRow(Exception):
    """A row that cannot be used; the message names the field (none when the line is not a JSON object)."""

    def __init__(self, field_name: str | None, reason: str) -> None:
        super().__init__(f"field '{field_name}': {reason}" if field_name else reason)


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _text(value: Any, column: str, row: Mapping[str, Any], instructed: bool) -> str:
    """One text: a string or MEDI's `[instruction, text]`; the instruction is kept only when configured."""
    if value is None:
        raise _BadRow(column, "missing")
    instruction = None
    if isinstance(value, list):
        if not _is_pair(value):
            raise _BadRow(column, f"expected text or [instruction, text], got a list of {len(value)}")
        instruction, value = value
    if not isinstance(value, str):
        raise _BadRow(column, f"expected text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise _BadRow(column, "empty text")
    if not instructed:
        return text
    if instruction is None:
        instruction = row.get(f"{column}_instruct")
        if instruction is None:
            raise _BadRow(column, f"no instruction to prepend: needs [instruction, text] values or a "
                                  f"'{column}_instruct' column (or turn the data.*_instruction option off)")
        if not isinstance(instruction, str):
            raise _BadRow(f"{column}_instruct", f"expected text, got {type(instruction).__name__}")
    # GISTEmbed joins with a space: " ".join([instruction, text]).strip()
    return f"{instruction.strip()} {text}".strip()


def _parse_row(row: Mapping[str, Any], fields: _Fields, num_negatives: int | None) -> tuple[str, str, list[str], str]:
    """Validate and normalise one raw row, or raise `_BadRow` naming the field."""
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
                raise _BadRow(column, "empty list of negatives")
            negs.extend(_text(v, column, row, instructed) for v in value)
        else:
            negs.append(_text(value, column, row, instructed))
    if fields.keep_negatives is not None:
        if len(negs) < fields.keep_negatives:
            raise _BadRow(fields.negs[-1] if fields.negs else None, f"{len(negs)} negatives, but the source's "
                          f"num_negatives is {fields.keep_negatives}")
        negs = negs[:fields.keep_negatives]
    if num_negatives is not None and len(negs) != num_negatives:
        raise _BadRow(fields.negs[-1], f"{len(negs)} negatives, but the first valid row has {num_negatives}; "
                                       "every row needs the same number")
    task = fields.default_task
    if fields.task is not None:
        value = row.get(fields.task)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise _BadRow(fields.task, "missing" if value is None else f"expected a task name, got {value!r}")
        task = value.strip()
    return query, pos, negs, task


def _decode_line(line: str) -> dict[str, Any]:
    try:
        row = json.loads(line.removeprefix("\ufeff"))  # the byte-order mark some Windows editors put first
    except json.JSONDecodeError as error:
        raise _BadRow(None, f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise _BadRow(None, f"expected a JSON object, got {type(row).__name__}")
    return row


def _rows(batch: Mapping[str, list], size: int, fields: _Fields,
          jsonl: bool) -> Iterator[str | Mapping[str, Any] | None]:
    """The batch's raw rows: mappings, or JSON lines still to decode (so the caller can name a line that fails);
    None for a blank line, which is not a row but keeps the line count."""
    if jsonl:
        for line in batch["text"]:
            yield line if line.strip() else None
        return
    columns = {c: batch[c] for c in fields.read() if c in batch}
    for i in range(size):
        yield {c: values[i] for c, values in columns.items()}


def _row_error(where: str, index: int, jsonl: bool, bad: _BadRow) -> str:
    """`FILE:LINE: reason` for JSON lines, `FILE:row N: reason` for other formats (`index` counted from 0)."""
    return f"{where}:{index + 1}: {bad}" if jsonl else f"{where}:row {index + 1}: {bad}"


def _missing_columns(where: str, fields: _Fields, columns: Sequence[str]) -> DataError | None:
    """The error for a table that lacks a configured column (a wrong column mapping), or None."""
    absent = [c for c in fields.required() if c not in columns]
    if not absent:
        return None
    return DataError(f"{where}:row 1: field '{absent[0]}': missing: no such column (columns: {', '.join(columns)}); "
                     f"set {fields.required()[absent[0]]}")


def _normalize_batch(batch: Mapping[str, list], indices: list[int], fields: _Fields, num_negatives: int | None,
                     where: str, jsonl: bool, source: int = 0) -> dict[str, list]:
    """Batched map: raw rows -> normalised rows of `source` with an `_error` message ("" when valid)."""
    out: dict[str, list] = {name: [] for name in _TEXT_FEATURES}
    for index, raw in zip(indices, _rows(batch, len(indices), fields, jsonl)):
        if raw is None:
            continue
        try:
            row = _decode_line(raw) if jsonl else raw
            query, pos, negs, task = _parse_row(row, fields, num_negatives)
            error = ""
        except _BadRow as bad:
            query, pos, negs, task = "", "", [], ""
            error = _row_error(where, index, jsonl, bad)
        for name, value in zip(_TEXT_FEATURES, (query, pos, negs, task, source, error)):
            out[name].append(value)
    return out


def _first_valid_negatives(ds: datasets.Dataset, fields: _Fields, jsonl: bool) -> int | None:
    """K, the negatives per row, from the first valid row (reading only as far as that row)."""
    for batch in ds.iter(batch_size=256):
        size = len(next(iter(batch.values())))
        for raw in _rows(batch, size, fields, jsonl):
            try:
                if raw is not None:
                    return len(_parse_row(_decode_line(raw) if jsonl else raw, fields, None)[2])
            except _BadRow:
                continue
    return None


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
    """What `load_triplets` read, for the startup summary."""

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


def _task_counts(ds: datasets.Dataset) -> dict[str, int]:
    """Rows per task, largest first, counted by Arrow."""
    counts = pc.value_counts(ds.with_format("arrow")["task_name"]).to_pylist()
    return dict(sorted(((c["values"], c["counts"]) for c in counts), key=lambda tc: (-tc[1], tc[0])))


def _resolve_source(cfg: DataConfig, split: str,
                    source: SourceConfig | None = None) -> tuple[_Fields, str, list[_Part]]:
    """`data.path`'s, or a mixture source's, columns, description and parts (a source's own options first)."""
    fields = _Fields.from_config(cfg, source)
    if source is not None:
        split = source.split or split
        cfg = dataclasses.replace(cfg, path=source.path, revision=source.revision, sources=[])
    return fields, *_resolve(cfg, split)


def _load_source(cfg: DataConfig, split: str, source: SourceConfig | None = None,
                 index: int = 0) -> tuple[datasets.Dataset, str, int | None, list[str], int]:
    """One source validated: its rows, description, K, the first skipped rows' messages and the skipped count."""
    fields, description, parts = _resolve_source(cfg, split, source)
    num_negatives: int | None = None
    loaded: list[datasets.Dataset] = []
    skipped, examples = 0, []
    for part in parts:
        raw = part.load()
        if not part.jsonl and len(raw) and (missing := _missing_columns(part.where, fields, raw.column_names)):
            raise missing
        if num_negatives is None:
            num_negatives = _first_valid_negatives(raw, fields, part.jsonl)
        ds = raw.map(
            _normalize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
            features=_TEXT_FEATURES, num_proc=cfg.num_proc, desc=f"validating {Path(part.where).name}",
            fn_kwargs={"fields": fields, "num_negatives": num_negatives, "where": part.where, "jsonl": part.jsonl,
                       "source": index},
        )
        errors = ds.data.column(_ERROR)
        bad = np.flatnonzero(pc.not_equal(errors, "").to_numpy(zero_copy_only=False))
        if len(bad) and (cfg.on_bad_rows == "error" or len(bad) == len(ds)):
            first = errors[int(bad[0])].as_py()
            if len(bad) == len(ds):
                raise DataError(f"{part.where}: none of its {len(ds)} rows is valid; first: {first}")
            raise DataError(f"{first} ({len(bad)} bad row{'s' * (len(bad) > 1)} in {part.where}; "
                            "--data.on_bad_rows=skip skips them)")
        if len(bad):
            skipped += len(bad)
            examples.extend(errors.take(pa.array(bad[:MAX_REPORTED_BAD_ROWS])).to_pylist())
            good = np.ones(len(ds), dtype=bool)
            good[bad] = False
            ds = ds.select(np.flatnonzero(good))
        loaded.append(ds.remove_columns(_ERROR))
    ds = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    if len(ds) == 0:
        raise DataError(f"{description}: no rows")
    if cfg.max_rows is not None and cfg.max_rows < len(ds):
        ds = ds.select(range(cfg.max_rows))
    return ds, description, num_negatives, examples, skipped


def load_triplets(cfg: DataConfig, split: str | None = None) -> tuple[datasets.Dataset, DataReport]:
    """Load, validate and normalise the configured triplets: `data.path`, or every source of `data.sources`.

    Returns a dataset with columns `query` (str), `pos` (str), `negs` (list of K str, the same K for every row of a
    source, possibly 0), `task_name` (str) and, for `data.sources`, `source` (the row's index in the list),
    instructions already prepended as configured, and its `DataReport`.
    Raises `DataError` on the first bad row (`FILE:LINE: field 'pos': empty text`) unless
    `data.on_bad_rows=skip`, and always when a file has no valid row at all (a wrong column mapping or format is
    a configuration error, not a few bad rows to skip); errors about a mixture source start with its name.
    `data.max_rows` applies to each source. On several ranks, call it on the main process first
    (`accelerator.main_process_first()`) so the others read its cache instead of validating concurrently.
    """
    split = split or cfg.split
    fields = _Fields.from_config(cfg)
    if not cfg.sources:
        ds, description, num_negatives, examples, skipped = _load_source(cfg, split)
        ds = ds.remove_columns("source")  # one source: nothing to tell apart
        return ds, DataReport(description, len(ds), skipped, examples[:MAX_REPORTED_BAD_ROWS], num_negatives or 0,
                              _task_counts(ds), sorted(fields.instructed))
    loaded, reports, examples, skipped = [], [], [], 0
    for index, source in enumerate(cfg.sources):
        try:
            ds, description, num_negatives, source_examples, source_skipped = _load_source(cfg, split, source, index)
        except DataError as error:
            raise DataError(f"data.sources {source.name!r}: {error}") from error
        loaded.append(ds)
        reports.append(SourceReport(source.name, description, len(ds), num_negatives or 0,
                                    int(pc.count_distinct(ds.with_format("arrow")["task_name"]).as_py())))
        examples.extend(source_examples)
        skipped += source_skipped
    ds = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    negatives = {r.num_negatives for r in reports}
    description = f"mixture of {len(reports)} source{'s' * (len(reports) > 1)}"
    return ds, DataReport(description, len(ds), skipped, examples[:MAX_REPORTED_BAD_ROWS],
                          negatives.pop() if len(negatives) == 1 else None, _task_counts(ds),
                          sorted(fields.instructed), reports)


# -------------------------------------------------------------------------------------------- tokenization


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str],
            max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids with the tokenizer's special tokens, cut at `max_length`, and which texts were cut."""
    if not texts:
        return [], []
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=False)
    if encoded.encodings is not None:  # a fast tokenizer keeps what truncation cut off
        truncated = [len(e.overflowing) > 0 for e in encoded.encodings]
    else:
        full = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        truncated = [len(ids) > max_length for ids in full["input_ids"]]
    return encoded["input_ids"], truncated


def _prompted(texts: list[str], prompts: list[str] | str) -> list[str]:
    """`prompt + text`, as sentence-transformers prepends its prompts."""
    if isinstance(prompts, str):
        return texts if not prompts else [prompts + t for t in texts]
    return [p + t for p, t in zip(prompts, texts)]


def _tokenize_batch(batch: Mapping[str, list], sides: Sequence[_Side]) -> dict[str, list]:
    """Batched map: texts -> unpadded ids for each side (student, guide), plus per-row truncation flags and, when
    a side leaves prompts out of pooling, each text's prompt length (`<side>_query_prompt`, ...). Rows may have
    different numbers of negatives (mixture sources differ)."""
    out: dict[str, list] = {}
    rows = len(batch["query"])
    ends = np.cumsum([len(negs) for negs in batch["negs"]]).tolist()
    starts = [0] + ends[:-1]
    for side, tokenizer, max_length, prompts in sides:
        query_prompts = [prompts.for_query(task) for task in batch["task_name"]]
        texts = {"query": _prompted(batch["query"], query_prompts), "pos": _prompted(batch["pos"], prompts.document)}
        for column in ("query", "pos"):
            out[f"{side}_{column}"], out[f"_truncated_{side}_{column}"] = _encode(tokenizer, texts[column], max_length)
        negs = _prompted([t for negs in batch["negs"] for t in negs], prompts.document)
        ids, truncated = _encode(tokenizer, negs, max_length)
        out[f"{side}_negs"] = [ids[a:b] for a, b in zip(starts, ends)]
        out[f"_truncated_{side}_negs"] = [sum(truncated[a:b]) for a, b in zip(starts, ends)]
        if not prompts.include_prompt:
            lengths = {p: prompt_length(tokenizer, p) for p in {*query_prompts, prompts.document}}
            document = lengths[prompts.document]
            out[f"{side}_query_prompt"] = [lengths[p] for p in query_prompts]
            out[f"{side}_pos_prompt"] = [document] * rows
            out[f"{side}_negs_prompt"] = [[document] * (b - a) for a, b in zip(starts, ends)]
    return out


_Side = tuple[str, PreTrainedTokenizerBase, int, Prompts]
"""(side name, tokenizer, max length, prompts) of one encoder to tokenize for."""


def _sides(student_tokenizer: PreTrainedTokenizerBase, student_max_length: int,
           guide_tokenizer: PreTrainedTokenizerBase | None, guide_max_length: int | None,
           student_prompts: Prompts | None = None, guide_prompts: Prompts | None = None) -> list[_Side]:
    sides = [("student", student_tokenizer, student_max_length, student_prompts or Prompts())]
    if guide_tokenizer is not None:
        if guide_max_length is None:
            raise ValueError("guide_max_length is required with a guide tokenizer")
        sides.append(("guide", guide_tokenizer, guide_max_length, guide_prompts or Prompts()))
    return sides


def tokenize_triplets(ds: datasets.Dataset, student_tokenizer: PreTrainedTokenizerBase, student_max_length: int,
                      guide_tokenizer: PreTrainedTokenizerBase | None = None, guide_max_length: int | None = None,
                      num_proc: int | None = None, *, student_prompts: Prompts | None = None,
                      guide_prompts: Prompts | None = None) -> tuple[datasets.Dataset, dict[str, float]]:
    """Tokenize every text for the student and the guide in one cached `datasets.map`.

    Returns the dataset with `student_query`, `student_pos`, `student_negs` (K id lists per row) and, with a guide,
    the same `guide_*` columns, all unpadded token ids with the tokenizer's special tokens (a decoder's EOS
    included, see `gist_scale.model.load_tokenizer`), plus `task_name` (and `source` for a mixture); and the
    fraction of texts truncated per column (`student_query`, ..., `guide_negs`; negatives over all negatives).
    Each side's `Prompts` are prepended to its texts; a side whose prompts are left out of pooling also gets
    `<side>_query_prompt`, `<side>_pos_prompt` (ints) and `<side>_negs_prompt` (K ints): each text's prompt
    length in tokens. The raw text columns are dropped. A second call with the same data, tokenizers, lengths and
    prompts reads the cache.
    """
    sides = _sides(student_tokenizer, student_max_length, guide_tokenizer, guide_max_length, student_prompts,
                   guide_prompts)
    kept = [c for c in ("task_name", "source") if c in ds.column_names]
    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({c: ds.features[c] for c in kept})
    for side, _, _, prompts in sides:
        features.update({f"{side}_query": ids, f"{side}_pos": ids, f"{side}_negs": datasets.List(ids)})
        features.update({f"_truncated_{side}_{c}": datasets.Value("int32") for c in ("query", "pos", "negs")})
        if not prompts.include_prompt:
            features.update({f"{side}_query_prompt": datasets.Value("int32"),
                             f"{side}_pos_prompt": datasets.Value("int32"), f"{side}_negs_prompt": ids})
    tokenized = ds.map(
        _tokenize_batch, batched=True, remove_columns=[c for c in ds.column_names if c not in kept],
        features=features, num_proc=num_proc, fn_kwargs={"sides": sides},
        desc="tokenizing " + " and ".join(side[0] for side in sides),
    )
    negatives = pc.sum(pc.list_value_length(tokenized.data.column("student_negs"))).as_py() or 0
    truncation: dict[str, float] = {}
    flags = [c for c in tokenized.column_names if c.startswith("_truncated_")]
    for flag in flags:
        column = flag.removeprefix("_truncated_")
        texts = negatives if column.endswith("_negs") else len(tokenized)
        total = pc.sum(tokenized.data.column(flag)).as_py() or 0
        truncation[column] = total / texts if texts else 0.0
    return tokenized.remove_columns(flags), truncation


def count_tokens(tok_ds: datasets.Dataset, side: str = "student") -> int:
    """Real (unpadded) tokens of one side's texts over the whole dataset, counted in Arrow without a Python loop."""
    total = 0
    for column in (f"{side}_query", f"{side}_pos", f"{side}_negs"):
        values = tok_ds.data.column(column)
        if column.endswith("_negs"):
            values = pc.list_flatten(values)
        total += pc.sum(pc.list_value_length(values)).as_py() or 0
    return total


def measure_tokenization_rate(ds: datasets.Dataset, student_tokenizer: PreTrainedTokenizerBase,
                              student_max_length: int, guide_tokenizer: PreTrainedTokenizerBase | None = None,
                              guide_max_length: int | None = None, rows: int = 2048) -> float:
    """Rows per second that `tokenize_triplets` tokenizes (student and guide) on one process, bypassing its cache.

    Compare with the rows per second that training consumes: the map runs once and is cached, so this only
    matters for the first run on a new dataset (raise `num_proc` if it is slow).
    """
    sample = ds[: min(rows, len(ds))]
    sides = _sides(student_tokenizer, student_max_length, guide_tokenizer, guide_max_length)
    start = time.perf_counter()
    for begin in range(0, len(sample["query"]), 1000):
        _tokenize_batch({k: v[begin:begin + 1000] for k, v in sample.items()}, sides)
    return len(sample["query"]) / max(time.perf_counter() - start, 1e-9)


# ------------------------------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class SamplerSummary:
    """Per-epoch facts for the startup summary; the same on every rank and in every epoch."""

    steps_per_epoch: int
    """Optimizer steps (global batches) per epoch."""
    dropped_rows: int
    """Rows left out of every epoch: tails dropped by `drop_last`, or too small to give every rank a row."""


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
    if weights is None and alpha == 1.0:
        return [int(n) for n in sizes], (sizes_arr / sizes_arr.sum()).tolist()
    raw = np.asarray(weights, dtype=np.float64) if weights is not None else sizes_arr ** alpha
    share = raw / raw.sum()
    epoch = int(sizes_arr[share > 0].sum())
    exact = share * epoch
    quotas = np.floor(exact).astype(np.int64)
    remainders = exact - quotas
    for s in np.argsort(-remainders, kind="stable")[: epoch - int(quotas.sum())]:
        quotas[s] += 1
    return quotas.tolist(), share.tolist()


def _codes(values: Any) -> np.ndarray:
    """Integer codes of a column of names, in sorted-name order, computed by Arrow (no Python string per row)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        array = values
    else:
        array = pa.array(values if isinstance(values, np.ndarray) else list(values), type=pa.string())
    names = pc.unique(array)
    names = names.take(pc.sort_indices(names))
    return pc.index_in(array, value_set=names).to_numpy(zero_copy_only=False)


class GlobalBatchSampler:
    """This rank's micro-batches of dataset indices, cut from task-homogeneous global batches.

    Per epoch, from a generator seeded with (seed, epoch): each task's rows are shuffled and cut into global
    batches of `batch_size * world_size * grad_accum_steps` rows, and the batch order is shuffled. Each global
    batch is split into `grad_accum_steps` micro-global batches of `batch_size * world_size` rows, each sliced
    contiguously by rank. Every rank computes the same plan, so in every step all ranks hold rows of one task.
    With `task_homogeneous=False` all rows form one group, mixing tasks.

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
        if batch_size < 1 or world_size < 1 or grad_accum_steps < 1:
            raise ValueError(f"batch_size={batch_size}, world_size={world_size} and "
                             f"grad_accum_steps={grad_accum_steps} must all be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.grad_accum_steps, self.seed, self.drop_last = grad_accum_steps, seed, drop_last
        self.global_batch_size = global_batch(batch_size, world_size, grad_accum_steps)
        count = len(task_names)
        # int32 per row (5M rows: 20 MB an array): the source index, then the (source, task) group key.
        key = (np.zeros(count, dtype=np.int32) if sources is None else
               np.asarray(sources.to_numpy() if isinstance(sources, pa.ChunkedArray) else sources, dtype=np.int32))
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
        sizes, dropped = [], 0
        for source_groups in self._groups:
            steps = 0
            for group in source_groups:
                full, tail = divmod(len(group), self.global_batch_size)
                kept_tail = self._keeps_tail(tail)
                steps += full + kept_tail
                dropped += 0 if kept_tail else tail
            sizes.append(steps)
        if num_sources == 1 and sizes[0] == 0:
            largest = max((len(g) for g in self._groups[0]), default=0)
            raise DataError(f"no global batch of {self.global_batch_size} rows (batch_size {batch_size} x world size "
                            f"{world_size} x grad_accum_steps {grad_accum_steps}) fits: the largest task has "
                            f"{largest} rows; lower train.batch_size, set data.drop_last=false or "
                            "data.task_homogeneous=false")
        for s, size in enumerate(sizes):
            if size == 0 and (weights is None or weights[s] > 0):
                largest = max((len(g) for g in self._groups[s]), default=0)
                raise DataError(f"data.sources {names[s]!r}: no global batch of {self.global_batch_size} rows fits "
                                f"in it (largest task: {largest} rows); lower train.batch_size, set "
                                "data.drop_last=false, or give it weight 0 or remove it")
        self._quotas, requested = mixture_quotas(sizes, weights, sampling_alpha)
        rows = [sum(len(g) for g in groups) for groups in self._groups]
        self.sources = [SourcePlan(n, r, b, q, p) for n, r, b, q, p in zip(names, rows, sizes, self._quotas,
                                                                           requested)]
        """The mixture, one `SourcePlan` per source (one entry without `sources`)."""
        self.summary = SamplerSummary(steps_per_epoch=sum(self._quotas), dropped_rows=dropped)
        self.epoch = 0
        self.position = 0
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
            full = len(rows) // self.global_batch_size
            batches.extend(rows[: full * self.global_batch_size].reshape(full, self.global_batch_size))
            tail = rows[full * self.global_batch_size:]
            if self._keeps_tail(len(tail)):
                batches.append(tail)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches in order, from (seed, epoch) alone, the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        drawn: list[list[np.ndarray]] = []
        for groups, quota in zip(self._groups, self._quotas):
            batches: list[np.ndarray] = []
            while len(batches) < quota:
                batches.extend(self._shuffled_batches(groups, rng))
            drawn.append(batches[:quota])
        order = rng.permutation(np.repeat(np.arange(len(drawn)), self._quotas))
        taken = [0] * len(drawn)
        batches = []
        for source in order.tolist():
            batches.append(drawn[source][taken[source]])
            taken[source] += 1
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._global_batches(self.epoch))
        batches = self._plan[1]
        while self.position < len(self):
            batch, micro = divmod(self.position, self.grad_accum_steps)
            indices = np.array_split(np.array_split(batches[batch], self.grad_accum_steps)[micro],
                                     self.world_size)[self.rank]
            self.position += 1
            yield indices.tolist()


@dataclass(frozen=True)
class TokenCounts:
    """Real (non-padding) tokens of one side's texts in a batch, counted by the collator on the host."""

    texts: int
    tokens: int
    tokens_squared: int
    """Sum of squared text lengths: what attention's FLOPs grow with."""


def text_identities(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """A 64-bit identity per token-id sequence (int64 `[n]`): equal sequences, equal ids; different ones collide
    with probability 2^-64 per pair. Hashed on the host (blake2b of the ids), so every rank and process agrees and
    the device never compares texts. The loss masks a candidate whose identity is its row's positive's or query's."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8)
                                        .digest(), "little", signed=True) for ids in sequences], dtype=torch.int64)


class TripletCollator:
    """Pads a list of tokenized rows into tensors, to the longest text of each column in this batch.

    Returns `{"student": {"query": {"input_ids", "attention_mask"}, "pos": {...}, "neg": {...}}, "guide": {...},
    "num_negatives": K, "token_counts": {"student": TokenCounts, "guide": ...}, "text_ids": {"query": [B],
    "pos": [B], "neg": [B*K]}}`; `neg` is `[B*K, L]` with row i's negatives at `i*K .. i*K+K-1`, absent when K is 0;
    `guide` is absent without a guide tokenizer. All tensors are int64. Rows tokenized with prompts left out of
    pooling add `prompt_length` `[N]` to each column's features. `text_ids` are :func:`text_identities` of the
    student's token ids, which hold the prompt and the truncation: identical as the student's encoder sees them.

    With `chunks`, each side is instead a :class:`gist_scale.chunking.ChunkedTexts`: the side's texts pooled,
    length-sorted and cut into `chunks` chunks padded to their own longest text, planned here on the host so that the
    training step never reads lengths back from the accelerator. `chunks` may be a function of the batch's K (a
    mixture's sources differ in K, and every batch holds one source). Rows of a mixture add the batch's `source`.
    """

    def __init__(self, student_tokenizer: PreTrainedTokenizerBase,
                 guide_tokenizer: PreTrainedTokenizerBase | None = None, pad_to_multiple_of: int | None = None,
                 chunks: int | Callable[[int], int | None] | None = None) -> None:
        for name, tokenizer in (("student", student_tokenizer), ("guide", guide_tokenizer)):
            if tokenizer is not None and tokenizer.pad_token_id is None:
                raise DataError(f"the {name} tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                                "tokenizer.eos_token: padded positions are masked out)")
        if isinstance(chunks, int) and chunks < 1:
            raise ValueError(f"chunks={chunks}: must be >= 1, or None for one tensor per column")
        self.sides = [("student", student_tokenizer)]
        if guide_tokenizer is not None:
            self.sides.append(("guide", guide_tokenizer))
        self.pad_to_multiple_of = pad_to_multiple_of
        self.chunks = chunks

    def _pad(self, tokenizer: PreTrainedTokenizerBase, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad({"input_ids": sequences}, padding="longest", return_attention_mask=True,
                               pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        return {"input_ids": padded["input_ids"].long(), "attention_mask": padded["attention_mask"].long()}

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("empty batch: GlobalBatchSampler never yields one")
        num_negatives = len(rows[0]["student_negs"])
        batch: dict[str, Any] = {"num_negatives": num_negatives, "token_counts": {}}
        if "source" in rows[0]:
            batch["source"] = rows[0]["source"]
        chunks = self.chunks(num_negatives) if callable(self.chunks) else self.chunks
        for side, tokenizer in self.sides:
            if f"{side}_query" not in rows[0]:
                raise DataError(f"rows have no '{side}_query': pass the {side} tokenizer to tokenize_triplets")
            texts = {column: [row[f"{side}_{column}"] for row in rows] for column in ("query", "pos")}
            if num_negatives:
                texts["neg"] = [ids for row in rows for ids in row[f"{side}_negs"]]
            lengths = [len(ids) for column in texts.values() for ids in column]
            batch["token_counts"][side] = TokenCounts(len(lengths), sum(lengths), sum(n * n for n in lengths))
            if side == "student":
                batch["text_ids"] = {column: text_identities(sequences) for column, sequences in texts.items()}
            encoded = {column: self._pad(tokenizer, sequences) for column, sequences in texts.items()}
            if f"{side}_query_prompt" in rows[0]:  # prompts left out of pooling: each text's prompt length
                prompt = {"query": [row[f"{side}_query_prompt"] for row in rows],
                          "pos": [row[f"{side}_pos_prompt"] for row in rows],
                          "neg": [n for row in rows for n in row[f"{side}_negs_prompt"]]}
                for column, features in encoded.items():
                    features["prompt_length"] = torch.tensor(prompt[column], dtype=torch.long)
            if chunks is not None:
                encoded = chunk_texts(encoded, chunks, tokenizer.pad_token_id, self.pad_to_multiple_of)
            batch[side] = encoded
        return batch


def build_sampler(tok_ds: datasets.Dataset, cfg: DataConfig, batch_size: int, world_size: int, rank: int,
                  grad_accum_steps: int, seed: int) -> GlobalBatchSampler:
    """The training sampler for `load_triplets`' (tokenized) rows: tasks and sources read as Arrow columns, the
    mixture weighted as `data.sources` and `data.sampling_alpha` say."""
    columns = tok_ds.with_format("arrow")
    sources = columns["source"] if cfg.sources else None
    weights = [s.weight for s in cfg.sources] if cfg.sources and cfg.sources[0].weight is not None else None
    return GlobalBatchSampler(
        columns["task_name"], batch_size, world_size, rank, grad_accum_steps, seed, cfg.task_homogeneous,
        cfg.drop_last, sources=sources, source_names=[s.name for s in cfg.sources] or None, weights=weights,
        sampling_alpha=cfg.sampling_alpha)


class MixtureMeter:
    """Counts the global batches each mixture source contributed, for `metrics.jsonl` (a host-side count of the
    collator's `source`, no device read). All ranks see the same source in a step, so no reduction is needed."""

    def __init__(self, names: Sequence[str], grad_accum_steps: int, global_batch_size: int) -> None:
        self.names = list(names)
        self.grad_accum_steps, self.global_batch_size = grad_accum_steps, global_batch_size
        self._micro = [0] * len(self.names)

    def count(self, batch: Mapping[str, Any]) -> None:
        """Count one micro-batch (call it for each micro-batch the training loop receives)."""
        if "source" in batch:
            self._micro[batch["source"]] += 1

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
    lines = [f"mixture: {len(sources)} sources, epoch = {steps_per_epoch} global batches"]
    lines.extend(f"  {s.name}: {s.rows} rows, {s.batches} batches; drawn {s.drawn} per epoch "
                 f"(share {s.drawn / max(steps_per_epoch, 1):.1%}, requested {s.requested:.1%})" for s in sources)
    return lines


def build_dataloader(tok_ds: datasets.Dataset, sampler: GlobalBatchSampler, collator: TripletCollator,
                     num_workers: int = 0) -> DataLoader:
    """The training DataLoader: the sampler's micro-batches, collated in `num_workers` processes.

    Do not pass it through `accelerator.prepare`: the sampler already gives each rank its own slice, and
    Accelerate would shard it again. Move batches to the device yourself.
    """
    # Its own generator: every new iterator draws a worker seed, and drawing it from the global RNG would shift the
    # dropout masks of a resumed run (its iterator starts after the RNG state is restored, not before).
    return DataLoader(tok_ds, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(sampler.seed))
