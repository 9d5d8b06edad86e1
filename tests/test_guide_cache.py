"""The guide embedding cache: building, lookup, refusing stale caches, and cached == uncached training."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from dist_utils import loss_records, torchrun_command
from gist_scale import encode
from gist_scale.config import MINILM, ConfigError, DataConfig, GuideConfig, JobConfig
from gist_scale.data import (GlobalBatchSampler, TripletCollator, build_dataloader, load_triplets, sample_data_path,
                             tokenize_triplets)
from gist_scale.guide_cache import META_FILE, GuideCacheError, build_guide_cache, cache_key, main, open_guide_cache
from gist_scale.model import load_guide, load_tokenizer, resolve_model_path

datasets.disable_progress_bars()
ROWS = 48


def _job(guide_dir: Path, **guide) -> JobConfig:
    return JobConfig(guide=GuideConfig(name=str(guide_dir), **guide), data=DataConfig(max_rows=ROWS))


@pytest.fixture(scope="module")
def guide_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A private copy of the tiny model as the guide (some tests change or delete its files)."""
    out = tmp_path_factory.mktemp("guide") / "tiny-guide"
    shutil.copytree(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def cache_dir(guide_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "guide-cache"
    # Rows per batch and chunk size small enough that the shard spans several writes and chunks.
    assert build_guide_cache(_job(guide_dir), out, rows_per_batch=20, chunk_size=16) == out
    return out


def _rows(cfg: JobConfig):
    dataset, report = load_triplets(cfg.data)
    return dataset, report.num_negatives


def test_the_cache_holds_the_guide_embeddings_of_every_row(guide_dir, cache_dir):
    cfg = _job(guide_dir)
    meta = json.loads((cache_dir / META_FILE).read_text())
    assert meta["key"]["rows"] == ROWS and meta["key"]["num_negatives"] == 1 and meta["dim"] == 32
    assert meta["dtype"] == "float16" and meta["digest"] and len(meta["shards"]) == 1
    dataset, k = _rows(cfg)
    cache = open_guide_cache(GuideConfig(name=str(guide_dir), cache=str(cache_dir)), dataset, k)

    rows = [5, 0, 47, 5]
    got = cache.lookup(rows)
    assert got["query"].shape == (4, 32) and got["pos"].shape == (4, 32) and got["neg"].shape == (4, 1, 32)
    assert got["query"].dtype == torch.float16 and torch.equal(got["query"][0], got["query"][3])

    tokenizer = load_tokenizer(str(guide_dir))
    guide = load_guide(cfg.guide, torch.device("cpu"))
    tokenized, _ = tokenize_triplets(dataset, tokenizer, cfg.guide.max_length)
    batch = TripletCollator(tokenizer)(tokenized.__getitems__(rows)).student
    with torch.inference_mode():
        want = encode.encode_columns(guide, batch, 1)  # one call per column, as training without a cache
    for column, expected in zip(("query", "pos", "neg"), want):
        # The guide runs in bf16: equal up to its rounding (one bf16 ulp at |x| < 1 is at most 2**-8).
        torch.testing.assert_close(got[column].float(), expected.float(), rtol=0, atol=2**-8)


def test_a_cache_of_several_positives_holds_every_slot_in_the_batches_layout(guide_dir, tmp_path):
    """P = 3 over rows of 1 and 2 positives: the cache's `neg` is each row's 2 positive slots and its negative, as the
    collated batch lays them out (an empty slot: the row's first positive), so the cached batch has the roles and
    the embeddings of the live guide's slots."""
    rows = [json.loads(line) for line in sample_data_path("train").read_text().splitlines()[:12]]
    for i, row in enumerate(rows):
        row["pos"] = [row["pos"], f"another example of row {i}"][:1 + i % 2]
    rows.insert(5, {**rows[0], "pos": [], "task_name": "left out"})  # selected away: the cache has 12 rows
    path = tmp_path / "several.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = JobConfig(guide=GuideConfig(name=str(guide_dir)),
                    data=DataConfig(path=str(path), num_positives=3, exclude_tasks=["left out"]))
    out = build_guide_cache(job, tmp_path / "cache", rows_per_batch=5, chunk_size=8)
    key = json.loads((out / META_FILE).read_text())["key"]
    assert (key["num_positives"], key["num_negatives"]) == (3, 1)
    dataset, k = _rows(job)
    cache = open_guide_cache(GuideConfig(name=str(guide_dir), cache=str(out)), dataset, k)
    got = cache.lookup(range(12))
    assert cache.k == 3 and got["neg"].shape == (12, 3, 32)

    tokenizer = load_tokenizer(str(guide_dir))
    tokenized, _ = tokenize_triplets(dataset, tokenizer, job.guide.max_length)
    batch = TripletCollator(tokenizer)(tokenized.__getitems__(range(12)))
    with torch.inference_mode():
        want = encode.encode_columns(load_guide(job.guide, torch.device("cpu")), batch.student, 3)
    for column, expected in zip(("query", "pos", "neg"), want):
        torch.testing.assert_close(got[column].float(), expected.float(), rtol=0, atol=2**-8)
    torch.testing.assert_close(got["neg"][0, :2].float(), got["pos"][0].float().expand(2, -1), rtol=0, atol=2**-8)

    indexed, collator = cache.attach(tokenized, TripletCollator(tokenizer))
    cached = collator(indexed.__getitems__([0, 1]))
    assert cached.slot_roles.tolist() == [[-1, -1, 0], [1, -1, 0]]
    assert cached.guide_embeddings["neg"].shape == (2, 3, 32)
    other, k = _rows(JobConfig(data=DataConfig(path=str(path), num_positives=2, exclude_tasks=["left out"])))
    with pytest.raises(GuideCacheError, match="num_positives: cache 3, this run 2 \\(--data.num_positives\\)"):
        open_guide_cache(GuideConfig(name=str(guide_dir), cache=str(out)), other, k)
    sources = [{"path": str(path), "task_column": "task_name", "num_positives": 2, "name": "two"},
               {"path": str(path), "task_column": "task_name"}]
    mixed, _ = load_triplets(DataConfig(exclude_tasks=["left out"], sources=sources))
    with pytest.raises(GuideCacheError, match="the data.sources differ in num_positives"):
        cache_key(GuideConfig(name=str(guide_dir)), mixed, 1)


# Workers receive the cache pickled (by file path, not by content); chunks: the student side arrives chunked.
@pytest.mark.parametrize(("workers", "chunks"), [(0, None), (2, 3)])
def test_batches_carry_cached_embeddings_instead_of_guide_ids(guide_dir, cache_dir, tiny_model_dir, workers, chunks):
    cfg = _job(guide_dir)
    dataset, k = _rows(cfg)
    cache = open_guide_cache(GuideConfig(name=str(guide_dir), cache=str(cache_dir)), dataset, k)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenized, _ = tokenize_triplets(dataset, tokenizer, 128)  # student side only
    rows, collator = cache.attach(tokenized, TripletCollator(tokenizer, chunks=chunks))
    sampler = GlobalBatchSampler(["one task"] * len(tokenized), 8, 1, 0, seed=3)
    plan = list(sampler)
    sampler.set_epoch(0)
    for indices, batch in zip(plan, build_dataloader(rows, sampler, collator, workers), strict=True):
        assert batch.guide is None and "guide" not in batch.token_counts
        if chunks is None:
            assert batch.student["query"]["input_ids"].shape[0] == 8
        else:
            assert len(batch.student.chunks) == chunks and batch.student.counts["query"] == 8
        expected = cache.lookup(indices)
        for column in ("query", "pos", "neg"):
            assert torch.equal(batch.guide_embeddings[column], expected[column])


@pytest.mark.parametrize(("change", "needle"), [
    (dict(guide=dict(max_length=64)), "max_length: cache 128, this run 64 (--guide.max_length)"),
    (dict(guide=dict(pooling="cls")), "pooling"),
    (dict(guide=dict(dtype="fp32")), "dtype"),
    (dict(data=dict(max_rows=ROWS - 8)), "dataset_fingerprint"),
    (dict(data=dict(max_rows=ROWS, pos_column="neg", neg_columns=["pos"])), "dataset_fingerprint"),
])
def test_a_mismatched_cache_is_refused_with_the_fields_that_differ(guide_dir, cache_dir, change, needle):
    guide = GuideConfig(name=str(guide_dir), cache=str(cache_dir), **change.get("guide", {}))
    dataset, k = _rows(JobConfig(data=DataConfig(**change.get("data", {"max_rows": ROWS}))))
    with pytest.raises(GuideCacheError, match="refusing it") as error:
        open_guide_cache(guide, dataset, k)
    assert needle in str(error.value) and "gist-scale cache-guide" in str(error.value)


def test_another_guide_or_changed_guide_files_are_refused(guide_dir, cache_dir, tiny_model_dir, tmp_path):
    dataset, k = _rows(_job(guide_dir))
    with pytest.raises(GuideCacheError, match="guide: cache"):
        open_guide_cache(GuideConfig(name=str(tiny_model_dir), cache=str(cache_dir)), dataset, k)
    # Same name, other weights: a local guide directory is checked by a digest of its files.
    retrained = tmp_path / "guide"
    shutil.copytree(guide_dir, retrained)
    weights = load_file(retrained / "model.safetensors")
    from safetensors.torch import save_file

    save_file({key: value + 0.01 for key, value in weights.items()}, retrained / "model.safetensors")
    moved = tmp_path / "cache"
    shutil.copytree(cache_dir, moved)
    meta = json.loads((moved / META_FILE).read_text())
    meta["key"]["guide"] = str(retrained)
    (moved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GuideCacheError, match="files of guide .* changed"):
        open_guide_cache(GuideConfig(name=str(retrained), cache=str(moved)), dataset, k)
    # Gone from this machine: checked by name and settings only (the guide is never needed to train).
    shutil.rmtree(retrained)
    assert open_guide_cache(GuideConfig(name=str(retrained), cache=str(moved)), dataset, k).k == 1


def test_missing_or_incomplete_caches_are_refused(guide_dir, cache_dir, tmp_path):
    dataset, k = _rows(_job(guide_dir))
    with pytest.raises(GuideCacheError, match="no such directory"):
        open_guide_cache(GuideConfig(name=str(guide_dir), cache=str(tmp_path / "nope")), dataset, k)
    partial = tmp_path / "partial"
    shutil.copytree(cache_dir, partial)
    (partial / META_FILE).unlink()
    with pytest.raises(GuideCacheError, match="incomplete"):
        open_guide_cache(GuideConfig(name=str(guide_dir), cache=str(partial)), dataset, k)
    with pytest.raises(ConfigError, match="guide.cache needs guide.name"):
        GuideConfig(name=None, cache=str(cache_dir))


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "c"), "--guide.name", "null"]) == 2
    assert "cache-guide needs a guide: set --guide.name" in capsys.readouterr().err
    assert main([str(tmp_path / "c"), "--guide.max_length", "0"]) == 2
    assert "guide.max_length=0: must be a positive token count" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ multi-process training


def _train(model_dir: Path, guide: Path, out: Path, *extra: str) -> list[str]:
    return torchrun_command(
        2, "train", "--data.path", str(sample_data_path("train")), "--data.max_rows", str(ROWS),
        "--model.name", str(model_dir), "--guide.name", str(guide), "--model.dropout", "0.1",
        "--train.batch_size", "4", "--train.max_steps", "3", "--train.log_every", "1", "--optim.lr", "1e-3",
        "--train.output_dir", str(out), *extra)


def _losses(run: Path) -> list[tuple[float, float, float]]:
    return [(r["loss"], r["masked_fraction"], r["grad_norm"]) for r in loss_records(run)]


@pytest.mark.slow
def test_cached_training_equals_uncached_training(tiny_model_dir, launch_env, tmp_path):
    """2 ranks under a bare torchrun (no ACCELERATE_USE_CPU, on a machine without a GPU) build the cache, each
    embedding its share of the rows into the embeddings one process writes; a cached 2-rank run then matches the
    uncached run step for step, although its guide directory no longer exists (so the guide was never loaded).

    The guide is all-MiniLM-L6-v2, whose scores are spread out: the random tiny BERT scores every pair within a few
    hundredths, so the float noise between the cache's batching and the trainer's could flip near-tied masks."""
    minilm = Path(resolve_model_path(MINILM))
    guide = tmp_path / "guide-copy"
    shutil.copytree(minilm, guide)
    env = launch_env("plain")
    uncached_log = (tmp_path / "uncached.log").open("w")
    uncached = subprocess.Popen(_train(tiny_model_dir, minilm, tmp_path / "uncached"), env=env,
                                stdout=uncached_log, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    # The guide in its default bf16, as the training runs use it (float16 storage holds bf16 values exactly; an fp32
    # guide's rounding to float16 would flip near-tied masks against the uncached run).
    args = ["--guide.name", str(guide), "--data.path", str(sample_data_path("train")), "--data.max_rows", str(ROWS)]
    build = subprocess.run(torchrun_command(2, "cache-guide", str(tmp_path / "cache"), *args),
                           env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    one = tmp_path / "one-process-cache"
    assert main([str(one), *args]) == 0
    assert [len(json.loads((cache / META_FILE).read_text())["shards"]) for cache in (one, tmp_path / "cache")] == [1, 2]
    dataset, k = _rows(JobConfig(guide=GuideConfig(name=str(guide)),
                                 data=DataConfig(path=str(sample_data_path("train")), max_rows=ROWS)))
    embeddings = [open_guide_cache(GuideConfig(name=str(guide), cache=str(cache)), dataset, k).lookup(
        range(len(dataset))) for cache in (one, tmp_path / "cache")]
    assert embeddings[1].keys() == embeddings[0].keys() == {"query", "pos", "neg"}
    for column, expected in embeddings[0].items():
        # A float-noise difference of the ranks' batchings may round a bf16 output one ulp (2**-8 below 1) apart.
        torch.testing.assert_close(embeddings[1][column], expected, rtol=0, atol=2**-8)

    shutil.rmtree(guide)
    cached = subprocess.run(_train(tiny_model_dir, guide, tmp_path / "cached", "--guide.cache",
                                   str(tmp_path / "cache")), env=env, capture_output=True, text=True, timeout=300)
    assert cached.returncode == 0, cached.stdout[-3000:] + cached.stderr[-3000:]
    assert uncached.wait(timeout=300) == 0, (tmp_path / "uncached.log").read_text()[-3000:]

    # Same masks (the guide's only role) and hence the same losses and gradients, up to float noise.
    want, got = _losses(tmp_path / "uncached"), _losses(tmp_path / "cached")
    assert len(got) == len(want) == 3
    for (loss, masked, norm), (loss_c, masked_c, norm_c) in zip(want, got):
        assert masked_c == masked and loss_c == pytest.approx(loss, abs=1e-5) and norm_c == pytest.approx(norm, 1e-5)
    a = load_file(tmp_path / "uncached" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
