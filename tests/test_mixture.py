"""Weighted mixtures: source configs, per-source loading and K, the mixture sampler, and a short mixed training run."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_data import batches_until
from gist_scale.config import ConfigError, DataConfig
from gist_scale.options import load_config
from gist_scale.data import (DataError, GlobalBatchSampler, TripletCollator, build_sampler, load_triplets,
                             mixture_quotas, tokenize_triplets)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(prefix: str, n: int, negs: int = 1, task: str | None = None) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        row: dict[str, Any] = {"query": f"{prefix} query {i}", "pos": f"{prefix} positive {i}",
                               "neg": [f"{prefix} negative {i}.{j}" for j in range(negs)]}
        if task:
            row["task_name"] = f"{task}{i % 2}"
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ config


def test_sources_from_yaml_text_on_the_command_line(tmp_path: Path) -> None:
    cfg = load_config(["--data.sources", "[{path: a.jsonl, weight: 2}, {path: /x/b.parquet, weight: 1, "
                                         "num_negatives: 3, name: bee}]", "--data.sampling_alpha", "0.5"])
    a, b = cfg.data.sources
    assert (a.name, a.weight, a.num_negatives, b.name, b.weight, b.num_negatives) == ("a", 2.0, None, "bee", 1.0, 3)
    paths_only = load_config(["--data.sources", "[{path: a.jsonl}, {path: b.jsonl}]"]).data.sources
    assert [s.name for s in paths_only] == ["a", "b"] and paths_only[0].weight is None
    config = tmp_path / "mix.yaml"
    config.write_text("data:\n  sources:\n    - {path: a.jsonl, weight: 0.7}\n    - {path: b.jsonl, weight: 0.3}\n")
    assert [s.weight for s in load_config([], config).data.sources] == [0.7, 0.3]


@pytest.mark.parametrize("sources, message", [
    ([{"path": "a.jsonl", "weight": -1}], "entry 'a': weight=-1 must be a number >= 0"),
    ([{"path": "a.jsonl", "weight": 0}, {"path": "b.jsonl", "weight": 0}], "every weight is 0"),
    ([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}], "'a' have a weight and 'b' have none"),
    ([{"path": "x/a.jsonl"}, {"path": "y/a.jsonl"}], "two sources are named 'a'"),
    ([{"path": "a.jsonl", "wieght": 1}], "data.sources\\[0\\]: 'wieght'; did you mean 'weight'"),
    ([{"weight": 1}], "data.sources\\[0\\]: missing `path`"),
])
def test_bad_source_configs_name_the_source(sources: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(sources=sources)


def test_path_and_sources_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="data.path and data.sources are both set"):
        DataConfig(path="x.jsonl", sources=["a.jsonl"])


def test_bad_mixture_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gist_scale.train import main

    assert main(["--data.sources", "[{path: a.jsonl, weight: 0}]", "--train.output_dir", str(tmp_path)]) == 2
    assert "every weight is 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- loading


def test_sources_load_with_their_own_columns_negatives_and_tasks(tmp_path: Path) -> None:
    pairs = [{"anchor": f"a{i}", "positive": f"p{i}"} for i in range(5)]
    cfg = DataConfig(sources=[
        {"path": write_jsonl(tmp_path / "nli.jsonl", rows_of("nli", 6, negs=3)), "num_negatives": 2},
        {"path": write_jsonl(tmp_path / "pairs.jsonl", pairs), "query_column": "anchor", "pos_column": "positive",
         "neg_columns": []},
        {"path": write_jsonl(tmp_path / "tasks.jsonl", rows_of("t", 4, task="qa")), "task_column": "task_name"},
    ])
    ds, report = load_triplets(cfg)
    assert ds.column_names == ["query", "pos", "negs", "task_name", "source"]
    assert ds["source"] == [0] * 6 + [1] * 5 + [2] * 4
    assert ds[0]["negs"] == ["nli negative 0.0", "nli negative 0.1"]  # num_negatives keeps the first 2 of 3
    assert ds[6]["negs"] == [] and ds[6]["task_name"] == "pairs"  # the source's name is its rows' task
    assert report.tasks == {"pairs": 5, "nli": 6, "qa0": 2, "qa1": 2} or report.tasks == {
        "nli": 6, "pairs": 5, "qa0": 2, "qa1": 2}
    assert report.num_negatives is None  # the sources differ in K
    assert [(s.name, s.rows, s.num_negatives, s.tasks) for s in report.sources] == [
        ("nli", 6, 2, 1), ("pairs", 5, 0, 1), ("tasks", 4, 1, 2)]
    assert any(line.startswith("  source pairs: 5 rows, 0 negatives") for line in report.lines())


def test_a_bad_row_or_an_empty_source_names_the_source_and_file(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", rows_of("g", 3))
    bad_rows = rows_of("b", 3)
    bad_rows[1]["pos"] = " "
    bad = write_jsonl(tmp_path / "bad.jsonl", bad_rows)
    with pytest.raises(DataError, match=rf"^data.sources 'bad': {bad}:2: field 'pos': empty text"):
        load_triplets(DataConfig(sources=[good, bad]))
    short = write_jsonl(tmp_path / "short.jsonl", rows_of("s", 2, negs=1))
    with pytest.raises(DataError, match=rf"^data.sources 'short': {short}: none of its 2 rows is valid; first: "
                                        rf"{short}:1: field 'neg': 1 negatives, but the source's num_negatives is 2"):
        load_triplets(DataConfig(sources=[good, {"path": short, "num_negatives": 2}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"^data.sources 'empty': .*empty.jsonl: no rows"):
        load_triplets(DataConfig(sources=[good, str(tmp_path / "empty.jsonl")]))


def test_mixed_k_tokenizes_and_collates_per_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    from gist_scale.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = DataConfig(sources=[write_jsonl(tmp_path / "k3.jsonl", rows_of("three", 8, negs=3)),
                              write_jsonl(tmp_path / "k1.jsonl", rows_of("one", 8, negs=1))])
    ds, _ = load_triplets(cfg)
    tokenized, truncation = tokenize_triplets(ds, tokenizer, 16)
    assert [len(n) for n in tokenized["student_negs"]] == [3] * 8 + [1] * 8 and truncation["student_negs"] == 0.0
    assert tokenized[9]["student_negs"][0] == tokenizer("one negative 1.0")["input_ids"]
    sampler = build_sampler(tokenized, cfg, batch_size=4, world_size=1, rank=0, grad_accum_steps=1, seed=0)
    # The chunk count follows each batch's K, as the trainer's `_chunks` does.
    collator = TripletCollator(tokenizer, chunks=lambda k: 2 + k)
    seen = set()
    for indices in sampler:
        batch = collator(tokenized.__getitems__(indices))
        k = 3 if batch.source == 0 else 1
        assert batch.num_negatives == k and len(batch.student.chunks) == 2 + k
        seen.add(batch.source)
    assert seen == {0, 1}


def test_sources_with_their_own_positives_and_task_filters(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`multi` reads 2 positives per row and inherits data.include_tasks; `one` reads 1 and has its own filter: every
    batch holds one source's slots, with that source's roles."""
    from gist_scale.model import load_tokenizer

    multi = [{"query": f"m query {i}", "pos": [f"m positive {i}.{j}" for j in range(1 + i % 3)],
              "neg": f"m negative {i}", "task_name": f"mteb_{i % 2}" if i < 8 else "other"} for i in range(12)]
    cfg = DataConfig(include_tasks=["mteb_*"], sources=[
        {"path": write_jsonl(tmp_path / "multi.jsonl", multi), "task_column": "task_name", "num_positives": 2},
        {"path": write_jsonl(tmp_path / "one.jsonl", rows_of("one", 8, negs=2)), "include_tasks": ["on?"]}])
    ds, report = load_triplets(cfg)
    assert ds.column_names == ["query", "pos", "negs", "task_name", "source", "extra_pos"]
    assert ds["extra_pos"][:3] == [[None], ["m positive 1.1"], ["m positive 2.1"]] and ds["extra_pos"][8:] == [[]] * 8
    assert report.num_positives is None and report.num_negatives is None  # the sources differ in both
    assert [(s.name, s.rows, s.num_negatives, s.num_positives) for s in report.sources] == [
        ("multi", 8, 1, 2), ("one", 8, 2, 1)]
    lines = report.lines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  source multi: 8 rows, 1 negatives, 2 positives"))
    assert lines[at + 1] == "    include_tasks ['mteb_*'] left out 4 rows of 1 task (other)"

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenized, _ = tokenize_triplets(ds, tokenizer, 16)
    sampler = build_sampler(tokenized, cfg, batch_size=4, world_size=1, rank=0, grad_accum_steps=1, seed=0)
    collator = TripletCollator(tokenizer)
    seen = set()
    for indices in sampler:
        batch = collator(tokenized.__getitems__(indices))
        assert batch.num_negatives == 2  # multi: 1 positive slot + 1 negative; one: 2 negatives
        if batch.source == 0:
            assert set(batch.slot_roles[:, 0].tolist()) <= {1, -1} and not batch.slot_roles[:, 1].any()
        else:
            assert batch.slot_roles is None
        seen.add(batch.source)
    assert seen == {0, 1}
    with pytest.raises(DataError, match=r"^data.sources 'one': .*one.jsonl: the task filter left no rows: "
                                        r"exclude_tasks \['o\*'\] left out 8 rows of 1 task \(one\)"):
        load_triplets(DataConfig(sources=[cfg.sources[0], {"path": cfg.sources[1].path, "exclude_tasks": ["o*"]}]))


# ----------------------------------------------------------------------------------------------- sampling


def source_rows(sizes: list[int], tasks_per_source: int = 1) -> tuple[list[str], list[int]]:
    """Per-row task names and sources, rows of all sources interleaved in a fixed shuffled order."""
    rows = [(f"t{i % tasks_per_source}", s) for s, n in enumerate(sizes) for i in range(n)]
    random.Random(0).shuffle(rows)
    return [t for t, _ in rows], [s for _, s in rows]


def mixture_ranks(sizes: list[int], world_size: int, **kwargs: Any) -> tuple[list[GlobalBatchSampler], list[int]]:
    names, sources = source_rows(sizes, kwargs.pop("tasks_per_source", 1))
    samplers = [GlobalBatchSampler(names, world_size=world_size, rank=r, sources=sources,
                                   source_names=[f"s{i}" for i in range(len(sizes))], **kwargs)
                for r in range(world_size)]
    return samplers, sources


def test_quotas_follow_weights_and_alpha() -> None:
    sizes = [50, 25, 5]
    assert mixture_quotas(sizes) == (sizes, [50 / 80, 25 / 80, 5 / 80])
    for weights, alpha in (([0.5, 0.3, 0.2], 1.0), (None, 0.0), (None, 0.5), ([1, 0, 1], 1.0)):
        quotas, shares = mixture_quotas(sizes, weights, alpha)
        raw = np.array(weights if weights is not None else [n ** alpha for n in sizes], dtype=float)
        np.testing.assert_allclose(shares, raw / raw.sum())
        epoch = sum(n for n, p in zip(sizes, shares) if p > 0)  # a source of weight 0 does not count
        assert sum(quotas) == epoch and all(abs(q - epoch * p) < 1 for q, p in zip(quotas, shares))
    assert mixture_quotas(sizes, None, 0.0)[0] == [27, 27, 26]


def test_realised_shares_match_the_weights() -> None:
    """Per epoch the quotas are exact; any stretch of steps is a draw without replacement from the epoch's
    batches, so the first 20 steps of 40 epochs (800 draws) must each lie within 4 binomial standard deviations
    of the requested share (a looser bound than the hypergeometric one; a false alarm has odds below 1e-4)."""
    weights = [0.5, 0.3, 0.2]
    samplers, sources = mixture_ranks([400, 200, 40], 2, batch_size=4, weights=weights, seed=7)
    sampler = samplers[0]
    assert [s.drawn for s in sampler.sources] == [40, 24, 16] and sampler.summary.steps_per_epoch == 80
    prefix, epochs = 20, 40
    counts = np.zeros(3)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        steps = [sources[batch[0]] for batch in sampler]
        assert np.bincount(steps, minlength=3).tolist() == [40, 24, 16]  # exact per epoch
        counts += np.bincount(steps[:prefix], minlength=3)
    n = prefix * epochs
    for count, p in zip(counts, weights):
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (counts, weights)


def test_every_global_batch_is_single_source_and_task_on_every_rank() -> None:
    samplers, sources = mixture_ranks([96, 60, 30], 3, batch_size=2, grad_accum_steps=2, weights=[1, 1, 2],
                                      tasks_per_source=2, seed=3)
    names, _ = source_rows([96, 60, 30], 2)
    steps = list(zip(*samplers))
    assert len(steps) == len(samplers[0]) and len(steps) % 2 == 0
    for first, second in zip(steps[::2], steps[1::2]):  # the two micro-batches of one global batch
        rows = [i for batch in first + second for i in batch]
        assert len(rows) == 12 and len({(sources[i], names[i]) for i in rows}) == 1


def test_subsampled_and_cycled_sources_without_replacement_where_possible() -> None:
    samplers, sources = mixture_ranks([80, 16], 1, batch_size=4, weights=[1, 1], seed=1)
    sampler = samplers[0]
    assert [(s.batches, s.drawn) for s in sampler.sources] == [(20, 12), (4, 12)]
    for epoch in range(3):
        sampler.set_epoch(epoch)
        big = [i for batch in sampler for i in batch if sources[i] == 0]
        sampler.set_epoch(epoch)
        small = [i for batch in sampler for i in batch if sources[i] == 1]
        assert len(big) == len(set(big)) == 48  # subsampled: no row twice
        assert set(np.bincount(small)[[i for i in range(96) if sources[i] == 1]]) == {3}  # 3 full passes


def test_mixture_resumes_exactly() -> None:
    def make() -> GlobalBatchSampler:
        return mixture_ranks([30, 21, 17], 2, batch_size=2, grad_accum_steps=2, weights=[3, 1, 1], seed=5,
                             drop_last=False)[0][1]

    uninterrupted = batches_until(2, make())
    for stop in (0, 7, 13):
        first = make()
        consumed = [batch for _, batch in zip(range(stop), first)]
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert consumed + batches_until(2, resumed) == uninterrupted


def old_plan(names: list[str], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The single-source sampler before mixtures existed (np.unique over the task names), as a reference."""
    _, codes = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for group in np.split(order, np.cumsum(np.bincount(codes))[:-1]):
        rows = group[rng.permutation(len(group))]
        full = len(rows) // global_batch
        batches.extend(rows[: full * global_batch].reshape(full, global_batch))
    return [batches[i].tolist() for i in rng.permutation(len(batches))]


def test_one_source_keeps_the_single_source_plan() -> None:
    names, _ = source_rows([300], 5)
    names = [n + "x" * (i % 3) for i, n in enumerate(names)]  # tasks whose sorted order differs from first sight
    for epoch in (0, 3):
        plain = GlobalBatchSampler(names, batch_size=8, world_size=1, rank=0, seed=11)
        sourced = GlobalBatchSampler(names, batch_size=8, world_size=1, rank=0, seed=11, sources=[0] * 300,
                                     source_names=["only"], weights=[2.0])
        for sampler in (plain, sourced):
            sampler.set_epoch(epoch)
            assert list(sampler) == old_plan(names, 8, 11, epoch)


def test_a_source_too_small_for_one_global_batch_is_named() -> None:
    with pytest.raises(DataError, match="data.sources 's1': no global batch of 8 rows fits in it .largest task: 5"):
        mixture_ranks([40, 5], 1, batch_size=8)
    samplers, _ = mixture_ranks([40, 5], 1, batch_size=8, weights=[1, 0])  # weight 0 leaves it out instead
    assert [s.drawn for s in samplers[0].sources] == [5, 0]


# -------------------------------------------------------------------------------------------------- training


def mixture_files(tmp_path: Path) -> str:
    """Two sources cut from the shipped sample, as a `--data.sources` value: triplets (K = 1) and pairs (K = 0)."""
    from gist_scale.data import sample_data_path

    lines = sample_data_path("train").read_text().splitlines()
    (tmp_path / "triplets.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[48:96]) + "\n")
    return (f"[{{path: {tmp_path / 'triplets.jsonl'}, weight: 3}}, "
            f"{{path: {tmp_path / 'pairs.jsonl'}, weight: 1, neg_columns: []}}]")


def test_training_on_a_mixture_logs_and_draws_it(tmp_path: Path, tiny_model_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Two sources with different K (triplets and pairs) in one run, chunked encoding planned per batch's K."""
    from gist_scale.tools.report import plot_run
    from gist_scale.train import main

    run = tmp_path / "run"
    sources = mixture_files(tmp_path)
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--data.sources", sources,
                 "--train.batch_size", "4", "--train.chunk_size", "8",
                 "--train.max_steps", "12", "--train.log_every", "1", "--train.output_dir", str(run)]) == 0
    out = capsys.readouterr().err
    assert "mixture: 2 sources, epoch = 24 global batches" in out
    assert "triplets: 48 rows, 12 batches; drawn 18 per epoch (share 75.0%, requested 75.0%)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 12
    for record in train:  # one global batch per step, from one source, 4 rows
        drawn = {k: v for k, v in record.items() if k.startswith("source/")}
        assert len(drawn) == 2 and sorted(drawn.values()) == [1.0, 4.0]
    assert json.loads((run / "mixture.json").read_text())["pairs"]["requested"] == 0.25
    assert plot_run(run).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_two_ranks_train_a_mixture_like_one_process(tmp_path: Path, tiny_model_dir: Path, launch_env) -> None:
    """2 DDP ranks x 2 rows == 1 process x 4 rows on a mixture whose sources differ in K: the same losses and the
    same source in every step (the sampler's plan depends on the global batch only)."""
    import subprocess

    from dist_utils import loss_records, torchrun_command
    from gist_scale.train import main

    def args(out: Path, batch: int) -> list[str]:
        return ["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--data.sources",
                mixture_files(tmp_path), "--train.batch_size", str(batch), "--train.max_steps", "6",
                "--train.log_every", "1", "--model.dropout", "0.0", "--train.output_dir", str(out)]

    assert main(args(tmp_path / "single", 4)) == 0
    result = subprocess.run(torchrun_command(2, "train", *args(tmp_path / "ddp", 2)), env=launch_env("ddp"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    single, ddp = loss_records(tmp_path / "single"), loss_records(tmp_path / "ddp")
    assert len(ddp) == 6
    sources = [[{k: v for k, v in r.items() if k.startswith("source/")} for r in records] for records in (single, ddp)]
    assert sources[0] == sources[1] and len({tuple(s) for s in sources[0]}) == 2  # both sources were drawn
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], abs=1e-4)
