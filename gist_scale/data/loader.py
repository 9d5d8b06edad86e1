"""The prepared path: every source read and validated into one memory-mapped Arrow dataset (`load_triplets`), its
global-batch sampler (`build_sampler`) and its DataLoader (`build_dataloader`).

Everything heavy runs through `datasets` (Arrow files, memory-mapped, cached by fingerprint), so a restarted or
resumed job, and every rank of a job, reuses the first run's work instead of re-reading the text.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from gist_scale.config import DataConfig, SourceConfig
from gist_scale.data.batching import GlobalBatchSampler
from gist_scale.data.collate import TripletCollator
from gist_scale.data.errors import DataError
from gist_scale.data.rows import (MAX_REPORTED_BAD_ROWS, BadRow, DataReport, Fields, SourceReport, TasksLeftOut,
                                  decode_line, left_out_task, missing_columns, no_rows_left, parse_row, row_error)
from gist_scale.data.sources import resolve

__all__ = ["build_dataloader", "build_sampler", "load_triplets"]

_ERROR = "_error"
_LEFT_OUT = "_left_out"


def _text_features(extra_positives: bool) -> datasets.Features:
    """Validated rows; `source` is the row's index in `data.sources` (dropped for a single `data.path`), `extra_pos`
    (only when a source has `num_positives` > 1) its other positives; `_error` and `_left_out` ("" for a row kept)
    say why a row is not kept, until the kept rows are selected."""
    text = datasets.Value("string")
    features = {"query": text, "pos": text, "negs": datasets.List(text), "task_name": text,
                "source": datasets.Value("int32")}
    if extra_positives:
        features["extra_pos"] = datasets.List(text)
    return datasets.Features({**features, _ERROR: text, _LEFT_OUT: text})


def _normalize_batch(batch: Mapping[str, list], indices: list[int], fields: Fields, num_negatives: int | None,
                     where: str, jsonl: bool, source: int, features: datasets.Features) -> dict[str, list]:
    """Batched map: raw rows -> normalised rows of `source`, with an `_error` message for a bad row and the option
    that left out a row of a filtered task (`_left_out`; the row is not validated further)."""
    out: dict[str, list] = {name: [] for name in features}
    if jsonl:  # JSON lines still to decode, so that a line that fails is named; None: a blank line, not a row
        raws = [line if line.strip() else None for line in batch["text"]]
    else:
        columns = {c: batch[c] for c in fields.read() if c in batch}
        raws = [{c: values[i] for c, values in columns.items()} for i in range(len(indices))]
    for index, raw in zip(indices, raws):
        if raw is None:
            continue
        values: dict[str, Any] = {"query": "", "pos": "", "negs": [], "task_name": "", "source": source,
                                  "extra_pos": [], _ERROR: "", _LEFT_OUT: ""}
        try:
            row = decode_line(raw) if jsonl else raw
            if (left_out := left_out_task(row, fields)) is not None:
                values[_LEFT_OUT], values["task_name"] = left_out
            else:
                values.update(parse_row(row, fields, num_negatives)._asdict())
        except BadRow as bad:
            values[_ERROR] = row_error(where, index, jsonl, bad)
        for name, column in out.items():
            column.append(values[name])
    return out


def _first_valid_negatives(ds: datasets.Dataset, fields: Fields, jsonl: bool) -> int | None:
    """K, the negatives per row, from the first valid row of a kept task (reading only as far as that row)."""
    for raw in ds:
        try:  # a blank JSON line is no JSON object: passed over with the bad rows
            row = decode_line(raw["text"]) if jsonl else raw
            if left_out_task(row, fields) is None:
                return len(parse_row(row, fields, None).negs)
        except BadRow:
            continue
    return None


def _task_counts(ds: datasets.Dataset) -> dict[str, int]:
    """Rows per task, largest first, counted by Arrow."""
    counts = pc.value_counts(ds.with_format("arrow")["task_name"]).to_pylist()
    return dict(sorted(((c["values"], c["counts"]) for c in counts), key=lambda tc: (-tc[1], tc[0])))


def _count_left_out(ds: datasets.Dataset, rows: np.ndarray, into: defaultdict[str, Counter[str]]) -> None:
    """Add the left-out `rows` of `ds` to `into`'s `{option: {task: rows}}`, grouped by Arrow."""
    table = ds.data.table.select([_LEFT_OUT, "task_name"]).take(pa.array(rows))
    for group in table.group_by([_LEFT_OUT, "task_name"]).aggregate([("task_name", "count")]).to_pylist():
        into[group[_LEFT_OUT]][group["task_name"]] += group["task_name_count"]


def _load_source(cfg: DataConfig, split: str, extra_positives: bool, source: SourceConfig | None = None,
                 index: int = 0) -> tuple[datasets.Dataset, DataReport]:
    """One source validated, its rows of filtered-out tasks left out and counted, and its report."""
    fields = Fields.from_config(cfg, source)
    description, parts = resolve(cfg, split, source)
    features = _text_features(extra_positives)
    num_negatives: int | None = None
    loaded: list[datasets.Dataset] = []
    skipped, examples = 0, []
    left_out: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for part in parts:
        raw = part.load()
        if not part.jsonl and len(raw) and (missing := missing_columns(part.where, fields, raw.column_names)):
            raise missing
        if num_negatives is None:
            num_negatives = _first_valid_negatives(raw, fields, part.jsonl)
        ds = raw.map(_normalize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                     features=features, num_proc=cfg.num_proc, desc=f"validating {Path(part.where).name}",
                     fn_kwargs={"fields": fields, "num_negatives": num_negatives, "where": part.where,
                                "jsonl": part.jsonl, "source": index, "features": features})
        errors = ds.data.column(_ERROR)
        is_bad = pc.not_equal(errors, "").to_numpy(zero_copy_only=False)
        is_left_out = pc.not_equal(ds.data.column(_LEFT_OUT), "").to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(is_bad)
        considered = len(ds) - int(is_left_out.sum())
        if len(bad) and (cfg.on_bad_rows == "error" or len(bad) == considered):
            first = errors[int(bad[0])].as_py()
            if len(bad) == considered:
                raise DataError(f"{part.where}: none of its {considered} rows is valid; first: {first}")
            raise DataError(f"{first} ({len(bad)} bad row{'s' * (len(bad) > 1)} in {part.where}; "
                            "--data.on_bad_rows=skip skips them)")
        skipped += len(bad)
        examples.extend(errors.take(pa.array(bad[:MAX_REPORTED_BAD_ROWS])).to_pylist())
        _count_left_out(ds, np.flatnonzero(is_left_out), left_out)
        if len(bad) or is_left_out.any():
            ds = ds.select(np.flatnonzero(~(is_bad | is_left_out)))
        loaded.append(ds.remove_columns([_ERROR, _LEFT_OUT]))
    ds = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    left_out_report = TasksLeftOut.count(fields, left_out)
    if len(ds) == 0:
        raise no_rows_left(description, left_out_report) if left_out_report else DataError(f"{description}: no rows")
    if cfg.max_rows is not None and cfg.max_rows < len(ds):
        ds = ds.select(range(cfg.max_rows))
    return ds, DataReport(description, len(ds), skipped, examples[:MAX_REPORTED_BAD_ROWS], num_negatives or 0,
                          _task_counts(ds), sorted(fields.instructed), num_positives=fields.num_positives,
                          left_out=left_out_report)


def load_triplets(cfg: DataConfig, split: str | None = None) -> tuple[datasets.Dataset, DataReport]:
    """Load, validate and normalise the configured triplets: `data.path`, or every source of `data.sources`.

    Returns a dataset with columns `query` (str), `pos` (str, the row's first positive), `negs` (list of K str, the
    same K for every row of a source, possibly 0), `task_name` (str), for `data.sources` `source` (the row's index
    in the list) and, when a source has `num_positives` P > 1, `extra_pos` (list of P-1: the row's other positives,
    None where it has fewer; empty for a source with P = 1), instructions already prepended as configured, and its
    `DataReport`. Rows of tasks that `include_tasks` / `exclude_tasks` leave out are dropped before they are
    validated, and counted in the report.
    Raises `DataError` on the first bad row (`FILE:LINE: field 'pos': empty text`) unless
    `data.on_bad_rows=skip`, and always when a file has no valid row at all (a wrong column mapping or format is
    a configuration error, not a few bad rows to skip) or a task filter leaves a source no row; errors about a
    mixture source start with its name.
    `data.max_rows` applies to each source, after the task filter. On several ranks, call it on the main process
    first (`accelerator.main_process_first()`) so the others read its cache instead of validating concurrently.
    """
    split = split or cfg.split
    if not cfg.sources:
        ds, report = _load_source(cfg, split, cfg.num_positives > 1)
        return ds.remove_columns("source"), report  # one source: nothing to tell apart
    extra_positives = any(Fields.from_config(cfg, source).num_positives > 1 for source in cfg.sources)
    loaded, reports = [], []
    for index, source in enumerate(cfg.sources):
        try:
            ds, report = _load_source(cfg, split, extra_positives, source, index)
        except DataError as error:
            raise DataError(f"data.sources {source.name!r}: {error}") from error
        loaded.append(ds)
        reports.append(report)
    sources = [SourceReport(source.name, r.source, r.rows, r.num_negatives, len(r.tasks), r.num_positives,
                            tuple(r.left_out)) for source, r in zip(cfg.sources, reports)]
    ds = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    negatives = {r.num_negatives for r in sources}
    positives = {r.num_positives for r in sources}
    description = f"mixture of {len(sources)} source{'s' * (len(sources) > 1)}"
    return ds, DataReport(description, len(ds), sum(r.skipped for r in reports),
                          [e for r in reports for e in r.skipped_examples][:MAX_REPORTED_BAD_ROWS],
                          negatives.pop() if len(negatives) == 1 else None, _task_counts(ds),
                          sorted(Fields.from_config(cfg).instructed), sources,
                          positives.pop() if len(positives) == 1 else None)


def build_sampler(tok_ds: datasets.Dataset, cfg: DataConfig, batch_size: int, world_size: int, rank: int,
                  grad_accum_steps: int, seed: int) -> GlobalBatchSampler:
    """The training sampler for `load_triplets`' (tokenized) rows: tasks and sources read as Arrow columns, the
    mixture weighted as `data.sources` and `data.sampling_alpha` say."""
    columns = tok_ds.with_format("arrow")
    sources = columns["source"] if cfg.sources else None
    weights = [s.weight for s in cfg.sources] if cfg.sources and cfg.sources[0].weight is not None else None
    return GlobalBatchSampler(columns["task_name"], batch_size, world_size, rank, grad_accum_steps, seed,
                              cfg.task_homogeneous, cfg.drop_last, sources=sources, weights=weights,
                              source_names=[s.name for s in cfg.sources] or None, sampling_alpha=cfg.sampling_alpha)


def build_dataloader(tok_ds: datasets.Dataset, sampler: GlobalBatchSampler, collator: TripletCollator,
                     num_workers: int = 0) -> DataLoader:
    """The training DataLoader: the sampler's micro-batches, collated into `TripletBatch`es in `num_workers`
    processes.

    Do not pass it through `accelerator.prepare`: the sampler already gives each rank its own slice, and
    Accelerate would shard it again. Move batches to the device yourself.
    """
    # Its own generator: every new iterator draws a worker seed, and drawing it from the global RNG would shift the
    # dropout masks of a resumed run (its iterator starts after the RNG state is restored, not before).
    return DataLoader(tok_ds, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(sampler.seed))
