"""`data.streaming` (gist_scale/data/streaming.py): local files read through `datasets` streaming, checked against the
prepared path's rows (`load_triplets`), against the tokenizer itself, and against uninterrupted runs for resume."""

from __future__ import annotations

import json
import math
import re
import shutil
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dist_utils import loss_records
from gist_scale.config import DataConfig
from gist_scale.data import DataError, TripletCollator, load_triplets, rank_micro_batches, tokenize_triplets
from gist_scale.model import load_tokenizer
from gist_scale.data.streaming import StreamingBatches, stream_fingerprint
from gist_scale.train import main

datasets.disable_progress_bars()

TASKS = ("alpha", "beta", "gamma")


def triplets(count: int, tag: str = "", negatives: int = 1) -> list[dict]:
    """Rows whose texts name their source and index; tasks in an irregular order, so buffers fill unevenly."""
    return [{"query": f"{tag} query {i}", "pos": f"{tag} positive {i}",
             "neg": [f"{tag} negative {i}.{k}" for k in range(negatives)], "task_name": TASKS[(i * i) % 3]}
            for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_source(tmp_path: Path, kind: str, rows: list[dict]) -> Path:
    """One source in the format `kind`: a JSONL file, a Parquet file (small row groups), or a folder of 3 files."""
    if kind == "jsonl":
        return write_jsonl(tmp_path / "rows.jsonl", rows)
    if kind == "parquet":
        path = tmp_path / "rows.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
        return path
    folder = tmp_path / "folder"
    for index, start in enumerate(range(0, len(rows), 11)):
        write_jsonl(folder / f"train-{index:03d}.jsonl", rows[start:start + 11])
    return folder


@pytest.fixture(autouse=True)
def no_download_counts(monkeypatch):
    """Every `load_dataset` pings the hub to count downloads (3 s timeout); without a network a name lookup can
    hang for seconds, so the tests switch the ping off, as HF_UPDATE_DOWNLOAD_COUNTS=0 would."""
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def stream(tokenizer, batch_size: int = 4, world_size: int = 1, rank: int = 0, grad_accum_steps: int = 1,
           seed: int = 0, **data) -> StreamingBatches:
    cfg = DataConfig(streaming=True, **data)
    return StreamingBatches(cfg, TripletCollator(tokenizer), tokenizer, 32, batch_size=batch_size,
                            world_size=world_size, rank=rank, grad_accum_steps=grad_accum_steps, seed=seed)


def take(batches: StreamingBatches, count: int) -> list[tuple[int, list]]:
    return [(source, [tuple(row[:2]) + (tuple(row[2]), row[3]) for row in rows])
            for source, rows in islice(batches.global_batches(), count)]


def prepared_rows(path: Path) -> list[tuple]:
    """The prepared path's validated rows, in order: the reference the stream must reproduce."""
    ds, _ = load_triplets(DataConfig(path=str(path)))
    return [(r["query"], r["pos"], tuple(r["negs"]), r["task_name"]) for r in ds]


# ------------------------------------------------------------------------------------- the rows and their order


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "folder"])
def test_streamed_batches_are_the_prepared_rows_in_file_order(kind, tmp_path, tokenizer):
    """Over several passes: with task_homogeneous off, global batches are consecutive cuts of the file's rows,
    repeated; with it on, each task's batches are consecutive cuts of that task's rows, and a batch is emitted as
    soon as its last row is read."""
    path = write_source(tmp_path, kind, triplets(30))
    reference = prepared_rows(path)
    assert len(reference) == 30
    endless = [reference[i % 30] for i in range(200)]

    mixed = take(stream(tokenizer, batch_size=4, path=str(path), task_homogeneous=False), 12)  # 48 rows: 2 passes
    assert [rows for _, rows in mixed] == [endless[4 * b:4 * b + 4] for b in range(12)]

    batches = take(stream(tokenizer, batch_size=4, path=str(path)), 12)
    taken = {task: 0 for task in TASKS}
    completed_at = []
    for _, rows in batches:
        task = rows[0][3]
        assert {row[3] for row in rows} == {task}  # one task per global batch
        # the task's next 4 rows in file order, and where in the stream the last of them is read
        positions = [i for i, row in enumerate(endless) if row[3] == task]
        assert rows == [endless[i] for i in positions[taken[task]:taken[task] + 4]]
        taken[task] += 4
        completed_at.append(positions[taken[task] - 1])
    assert completed_at == sorted(completed_at)  # emitted in the order their last rows are read


def test_ranks_partition_each_global_batch_as_one_process_holding_it_all(tmp_path, tokenizer):
    """2 ranks x 2 rows x 2 accumulation steps: the two ranks' micro-batches partition each global batch of 8 and,
    tokenized, equal the micro-batches of one process with 4 rows; one source and one task per global batch."""
    a = write_jsonl(tmp_path / "a.jsonl", triplets(40, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", triplets(24, "b", negatives=2))
    sources = [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}]
    ranks = [stream(tokenizer, batch_size=2, world_size=2, rank=r, grad_accum_steps=2, seed=3, sources=sources)
             for r in range(2)]
    whole = stream(tokenizer, batch_size=4, world_size=1, grad_accum_steps=2, seed=3, sources=sources)
    drawn = set()
    for (s0, rows0), (s1, rows1), (s, rows) in islice(zip(*(r.global_batches() for r in ranks + [whole])), 10):
        assert s0 == s1 == s and rows0 == rows1 == rows and len(rows) == 8
        assert len({row[3] for row in rows}) == 1 and all(row[0].startswith("ab"[s]) for row in rows)
        drawn.add(s)
        slices = [rank_micro_batches(rows, 2, 2, r) for r in range(2)]
        for micro, one in enumerate(rank_micro_batches(rows, 2, 1, 0)):
            assert slices[0][micro] + slices[1][micro] == one
        assert sorted(map(tuple, (row for sl in slices for m in sl for row in m))) == sorted(map(tuple, rows))
    assert drawn == {0, 1}

    # Collated: rank 0's and rank 1's token ids are one process's, and the tokenizer's own ids for the texts.
    fresh = [stream(tokenizer, batch_size=2, world_size=2, rank=r, grad_accum_steps=2, seed=3, sources=sources)
             for r in range(2)]
    single = stream(tokenizer, batch_size=4, grad_accum_steps=2, seed=3, sources=sources)
    texts = [rows for _, rows in islice(
        stream(tokenizer, batch_size=4, grad_accum_steps=2, seed=3, sources=sources).global_batches(), 3)]
    for step, (m0, m1, m) in enumerate(islice(zip(*(iter(x) for x in fresh + [single])), 6)):
        assert m0.source == m1.source == m.source and m0.num_negatives == m.num_negatives
        micro_texts = rank_micro_batches(texts[step // 2], 2, 1, 0)[step % 2]
        expected = tokenizer([row[0] for row in micro_texts], truncation=True, max_length=32)["input_ids"]
        for got_ids, got_mask, want in zip(
                [*m0.student["query"]["input_ids"], *m1.student["query"]["input_ids"]],
                [*m0.student["query"]["attention_mask"], *m1.student["query"]["attention_mask"]], expected):
            assert got_ids[got_mask.bool()].tolist() == want
        assert m.student["query"]["input_ids"].shape[0] == 4


# --------------------------------------------------------------------------- several positives, task filters


def with_positives(rows: list[dict]) -> list[dict]:
    """Row i gets 1 + i % 4 positives."""
    return [{**row, "pos": [f"{row['pos']}.{j}" for j in range(1 + i % 4)]} for i, row in enumerate(rows)]


def take_rows(batches: StreamingBatches, count: int) -> list[list]:
    """Whole rows (extra positives included) of the next `count` global batches."""
    return [list(row) for _, rows in islice(batches.global_batches(), count) for row in rows]


def test_several_positives_and_a_task_filter_stream_the_prepared_rows(tmp_path, tokenizer):
    """P = 3 and `exclude_tasks`: the stream's rows are the prepared path's (extra positives included) in file order,
    its collated batches the prepared collator's (slot roles included), and the filtered rows are counted."""
    path = write_jsonl(tmp_path / "rows.jsonl", with_positives(triplets(30)))
    options = {"num_positives": 3, "exclude_tasks": ["beta"]}  # beta: 20 of the 30 rows
    ds, _ = load_triplets(DataConfig(path=str(path), **options))
    reference = [[r["query"], r["pos"], r["negs"], r["task_name"], r["extra_pos"]] for r in ds]
    assert len(reference) == 10 and {tuple(r[4]) for r in reference} >= {(None, None), ("positive 9.1", None)}

    batches = stream(tokenizer, batch_size=4, path=str(path), task_homogeneous=False, **options)
    assert take_rows(batches, 3) == (reference * 2)[:12]  # a pass and 2 rows of the next
    left_out = batches.report().left_out
    assert [t.describe() for t in left_out] == ["exclude_tasks ['beta'] left out 22 rows of 1 task (beta)"]
    assert "    so far exclude_tasks ['beta'] left out 22 rows of 1 task (beta)" in batches.lines()

    streamed = next(iter(stream(tokenizer, batch_size=4, path=str(path), task_homogeneous=False, **options)))
    tokenized, _ = tokenize_triplets(ds, tokenizer, 32)
    prepared = TripletCollator(tokenizer)(tokenized.__getitems__(range(4)))
    assert streamed.num_negatives == prepared.num_negatives == 3  # 2 positive slots + 1 negative
    assert torch.equal(streamed.slot_roles, prepared.slot_roles)
    assert streamed.slot_roles.tolist() == [[-1, -1, 0], [1, 1, 0], [1, 1, 0], [1, -1, 0]]  # rows 0, 3, 6, 9
    for column in ("query", "pos", "neg"):
        assert torch.equal(streamed.student[column]["input_ids"], prepared.student[column]["input_ids"])
        assert torch.equal(streamed.text_ids[column], prepared.text_ids[column])


def test_buffered_rows_keep_their_extra_positives_through_a_resume(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", with_positives(triplets(30)))
    make = lambda: stream(tokenizer, batch_size=4, path=str(path), num_positives=2)  # noqa: E731
    reference = take_rows(make(), 6)
    first = make()
    assert take_rows(first, 2) == reference[:8]
    state = json.loads(json.dumps(first.state_dict()))
    # Read so far: beta's rows 1, 2, 4, 5 and alpha's 0, 3, 6, 9 became batches; beta's 7 and 8 wait.
    assert [(row[0], row[4]) for row in state["sources"][0]["buffers"]["beta"]] == [
        ("query 7", ["positive 7.1"]), ("query 8", [None])]
    second = make()
    second.load_state_dict(state)
    assert take_rows(second, 4) == reference[8:]


def test_the_fingerprint_covers_what_the_stream_reads_not_a_sources_loss_policy():
    def fingerprint(**source) -> str:
        return stream_fingerprint(DataConfig(streaming=True, sources=[{"path": "a.jsonl", "weight": 1, **source}]))

    assert fingerprint() == fingerprint(margin=0.1, in_batch_negatives=False, false_negatives="relabel")
    assert len({fingerprint(), fingerprint(num_positives=2), fingerprint(include_tasks=["mteb_*"])}) == 3


def test_a_task_filter_that_leaves_a_stream_no_rows_fails_at_the_check(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", triplets(30))
    with pytest.raises(DataError, match=re.escape(f"{path}: the task filter left no rows: include_tasks ['gam*'] left "
                                                  "out 30 rows of 2 tasks (alpha, beta)")):
        stream(tokenizer, path=str(path), include_tasks=["gam*"]).check()
    with pytest.raises(DataError, match=re.escape("data.sources 'rows': ") + ".*exclude_tasks \\['\\*'\\] left out"):
        stream(tokenizer, include_tasks=["alpha"],
               sources=[{"path": str(path), "weight": 1, "task_column": "task_name", "exclude_tasks": ["*"]}]).check()
    # A source's own filter replaces the data section's.
    kept = stream(tokenizer, include_tasks=["alpha"], task_homogeneous=False, batch_size=2,
                  sources=[{"path": str(path), "weight": 1, "task_column": "task_name", "include_tasks": ["beta"]}])
    assert {row[3] for row in take_rows(kept, 3)} == {"beta"}


# ------------------------------------------------------------------------------------------------------ resume


def resumed_equals_uninterrupted(make, before: int, after: int, make_resumed=None) -> dict:
    """Read `before` global batches, save the state through JSON, continue on a fresh object: the next `after`
    batches equal those of an uninterrupted run. Returns the saved state."""
    reference = take(make(), before + after)
    first = make()
    assert take(first, before) == reference[:before]
    state = json.loads(json.dumps(first.state_dict()))
    second = (make_resumed or make)()
    second.load_state_dict(state)
    assert take(second, after) == reference[before:]
    return state


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "folder"])
def test_resume_is_exact_mid_file_and_across_passes(kind, tmp_path, tokenizer):
    path = write_source(tmp_path, kind, triplets(30))
    for before in (1, 5, 9):  # 5 x 4 rows: inside a file of the folder; 9: after the first pass
        state = resumed_equals_uninterrupted(lambda: stream(tokenizer, batch_size=4, path=str(path)), before, 6)
        if before == 9:
            assert state["sources"][0]["pass"] == 1
    if kind == "folder":
        parts = {resumed_equals_uninterrupted(lambda: stream(tokenizer, batch_size=3, path=str(path),
                                                             task_homogeneous=False), n, 2)["sources"][0]["part"]
                 for n in (2, 5, 8)}
        assert parts == {0, 1, 2}  # resumed inside the first, second and third file


def test_a_hub_dataset_streams_its_shards_and_resumes_inside_one(monkeypatch, tokenizer):
    """A hub name goes to `load_dataset(name, revision=, split=, streaming=True)`; its shards (here 3, as a hub
    dataset of 3 Parquet files) are resumed by `datasets`' own shard and offset."""
    rows = triplets(30, "hub")
    calls = []

    def fake_load_dataset(name: str, **kwargs) -> datasets.IterableDataset:
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    endless = [(r["query"], r["pos"], tuple(r["neg"]), r["task_name"]) for r in rows] * 2
    make = lambda: stream(tokenizer, batch_size=4, path="org/triplets", revision="abc123",  # noqa: E731
                          task_homogeneous=False)
    assert [rows for _, rows in take(make(), 10)] == [endless[4 * b:4 * b + 4] for b in range(10)]
    assert calls[0] == ("org/triplets", {"revision": "abc123", "split": "train", "streaming": True})
    state = resumed_equals_uninterrupted(make, 4, 5)  # 16 rows: inside the second shard
    assert '"shard_idx": 1' in json.dumps(state["sources"][0]["position"])  # datasets' own shard and offset


def test_resume_with_buffers_of_a_weighted_mixture_and_on_another_world_size(tmp_path, tokenizer):
    """Rows waiting in per-task buffers are part of the state; 2 ranks saving, 1 process resuming with the same
    global batch continues with the same global batches."""
    a = write_jsonl(tmp_path / "a.jsonl", triplets(23, "a"))
    b = write_source(tmp_path / "b", "parquet", triplets(17, "b"))
    sources = [{"path": str(a), "weight": 1, "task_column": "task_name"},
               {"path": str(b), "weight": 1, "task_column": "task_name"}]
    state = resumed_equals_uninterrupted(
        lambda: stream(tokenizer, batch_size=3, world_size=2, rank=1, seed=5, sources=sources), 7, 8,
        make_resumed=lambda: stream(tokenizer, batch_size=6, world_size=1, seed=5, sources=sources))
    assert any(source["buffers"] for source in state["sources"])

    # Through the collated iterator with accumulation: the state is taken between optimizer steps only.
    batches = stream(tokenizer, batch_size=2, grad_accum_steps=2, seed=5, sources=sources)
    iterator = iter(batches)
    next(iterator)
    with pytest.raises(RuntimeError, match="optimizer-step boundary"):
        batches.state_dict()
    next(iterator)
    assert batches.state_dict()["batches"] == 1


# -------------------------------------------------------------------------------------------------- weights


def test_realised_shares_match_the_weights(tmp_path, tokenizer):
    """600 global batches drawn with replacement, weights 3:1:0: each realised share within 4 binomial standard
    deviations (sqrt(p(1-p)/n), 1.8 points for p = 0.75) of its weight; a weight-0 source is never drawn (nor read:
    its file is not JSON)."""
    a = write_jsonl(tmp_path / "a.jsonl", triplets(50, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", triplets(50, "b"))
    c = tmp_path / "c.jsonl"
    c.write_text("not JSON\n")
    sources = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}, {"path": str(c), "weight": 0}]
    batches = stream(tokenizer, batch_size=1, sources=sources, task_homogeneous=False, seed=11)
    n = 600
    drawn = [source for source, _ in take(batches, n)]
    for source, p in ((0, 0.75), (1, 0.25), (2, 0.0)):
        share = drawn.count(source) / n
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n), (source, share)


# ------------------------------------------------------------------------------------------------ bad input


def test_a_bad_row_names_its_file_and_row_and_skip_counts_it(tmp_path, tokenizer):
    folder = tmp_path / "folder"
    write_jsonl(folder / "train-000.jsonl", triplets(8))
    second = folder / "train-001.jsonl"
    lines = [json.dumps(row) for row in triplets(8, "2")]
    lines[2] = '{"query": "broken'
    second.write_text("\n".join(lines) + "\n")
    batches = stream(tokenizer, batch_size=2, path=str(folder), task_homogeneous=False)
    batches.check()  # the first file is fine: reading starts
    with pytest.raises(DataError, match=rf"^{second}:3: malformed JSON \(Unterminated string"):
        take(batches, 8)
    skipping = stream(tokenizer, batch_size=2, path=str(folder), task_homogeneous=False, on_bad_rows="skip")
    assert len(take(skipping, 8)) == 8  # 15 valid rows, then the second pass
    report = skipping.report()
    assert report.skipped == 1 and report.skipped_examples[0].startswith(f"{second}:3: malformed JSON")


def test_a_wrong_column_or_an_empty_source_fails_at_the_check(tmp_path, tokenizer):
    parquet = write_source(tmp_path, "parquet", triplets(5))
    with pytest.raises(DataError, match=r"rows.parquet:row 1: field 'positive': missing: no such column \(columns: "
                                        r"query, pos, neg, task_name\); set --data.pos_column"):
        stream(tokenizer, path=str(parquet), pos_column="positive").check()
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    good = write_jsonl(tmp_path / "good.jsonl", triplets(5))
    with pytest.raises(DataError, match=rf"^data.sources 'blank': {blank}: no rows"):
        stream(tokenizer, sources=[{"path": str(good), "weight": 1}, {"path": str(blank), "weight": 1}]).check()


def test_streamed_training_resumes_with_the_uninterrupted_losses(tmp_path, tiny_model_dir, capsys):
    """In-process runs: 6 steps on a weighted two-source stream (triplets and pairs, accumulation 2) with
    checkpoints every 2 steps; a run resumed from step 2's checkpoint logs the same losses at steps 3-6."""
    a = write_jsonl(tmp_path / "a.jsonl", triplets(20, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", [{k: v for k, v in row.items() if k != "neg"} for row in triplets(9, "b")])
    sources = f"[{{path: {a}, weight: 2}}, {{path: {b}, weight: 1, neg_columns: []}}]"

    def args(run: Path, *extra: str) -> list[str]:
        return ["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--data.streaming", "true",
                "--data.sources", sources, "--train.batch_size", "2", "--train.grad_accum_steps", "2",
                "--train.max_steps", "6", "--train.log_every", "1", "--checkpoint.every", "2",
                "--checkpoint.keep_last", "5", "--train.output_dir", str(run), *extra]

    full = tmp_path / "full"
    assert main(args(full)) == 0
    out = capsys.readouterr().err
    assert "steps 6 (streamed: no epochs)" in out and "a: 1 negatives and 1 positive per row, share 66.7%" in out
    records = loss_records(full)
    assert sum(v for r in records for k, v in r.items() if k.endswith("/batches")) == 6
    assert json.loads((full / "mixture.json").read_text())["a"]["requested"] == pytest.approx(2 / 3)
    state = json.loads((full / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["stream"]["batches"] == 2

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    assert main(args(resumed, "--resume", "auto")) == 0
    assert "resumed a in pass" in capsys.readouterr().err
    expected = {r["step"]: r["loss"] for r in records}
    got = {r["step"]: r["loss"] for r in loss_records(resumed)}
    assert sorted(got) == [3, 4, 5, 6]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-6)


def test_a_bad_row_met_during_training_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys):
    rows = [json.dumps(row) for row in triplets(12)]
    rows[9] = json.dumps({**triplets(1)[0], "pos": ""})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    code = main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--data.streaming", "true",
                 "--data.path", str(data), "--data.task_homogeneous", "false", "--train.batch_size", "4",
                 "--train.max_steps", "4", "--train.output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{data}:10: field 'pos': empty text (--data.on_bad_rows=skip skips bad rows)" in errors[0]
