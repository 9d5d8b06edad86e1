"""`gist-scale calibrate`: the masked shares equal what training logs on the same batches, the world size splits the
same global batches, a mixture keeps each source's policy, nothing but tokenizers is loaded with a guide cache, and
bad options fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import one_error_line

from gist_scale import cli
from gist_scale.config import DataConfig, GuideConfig, JobConfig
from gist_scale.data import sample_data_path
from gist_scale.guide_cache import build_guide_cache
from gist_scale.loss import BLOCKS
from gist_scale.options import load_config
from gist_scale.tools.calibrate import Setting, calibrate, main, parse_grid

CPU = torch.device("cpu")


def _rows(tmp_path: Path, name: str, task: str, count: int) -> Path:
    """The first `count` rows of one task of the shipped sample, in a file of its own (so no held-out evaluation
    runs, and every global batch is full)."""
    lines = [line for line in sample_data_path("train").read_text().splitlines()
             if json.loads(line)["task_name"] == task]
    out = tmp_path / f"{name}.jsonl"
    out.write_text("\n".join(lines[:count]) + "\n")
    return out


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """96 rows of one task and their guide cache (the tiny BERT, fp32)."""
    root = tmp_path_factory.mktemp("calibrate")
    data = _rows(root, "rows", "noun.act", 96)
    job = JobConfig(guide=GuideConfig(name=str(tiny_model_dir), dtype="fp32"), data=DataConfig(path=str(data)))
    build_guide_cache(job, root / "cache", rows_per_batch=96, chunk_size=64)
    return data, root / "cache"


def _config(tiny_model_dir: Path, data: Path, *extra: str) -> JobConfig:
    return load_config(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--guide.dtype",
                        "fp32", "--data.path", str(data), *extra])


def test_the_shares_are_those_training_logs(tmp_path, tiny_model_dir, cached):
    """Four steps of training, logged once: their masked share per block is calibrate's, to the last digit, at the
    run's margin (the same batches, the same loss)."""
    from gist_scale.train import main as train

    data, cache = cached
    options = ["--guide.cache", str(cache), "--loss.margin", "0.02", "--train.batch_size", "8",
               "--train.max_steps", "4"]
    assert train(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--guide.dtype", "fp32",
                  "--data.path", str(data), *options, "--train.log_every", "4",
                  "--train.output_dir", str(tmp_path / "run")]) == 0
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    run = calibrate(_config(tiny_model_dir, data, *options), [Setting("absolute", 0.0), Setting("absolute", 0.02)],
                    world_size=1, steps=None, device=CPU)
    assert run.steps == 4 and run.rows == 32  # the run's length: fewer than DEFAULT_STEPS, within one epoch
    chosen = run.settings[1]
    assert {block: pytest.approx(logged[f"masked_fraction/{block}"], abs=1e-12) for block in BLOCKS} == chosen.masked
    assert 0 < run.settings[0].masked_all < chosen.masked_all < 1  # a larger margin masks more


def test_world_size_cuts_the_same_global_batches(tiny_model_dir, cached, no_weight_reads):
    """With a guide cache nothing is loaded but tokenizers (weight files fail the test). 2 ranks of 4 rows contrast
    the global batch that 1 process of 8 holds; a live guide (fp32) gives the cached guide's shares."""
    data, cache = cached
    grid = parse_grid("0,0.05", "absolute,relative", Setting("absolute", 0.0))
    one, two = (calibrate(_config(tiny_model_dir, data, "--guide.cache", str(cache), "--train.batch_size", size),
                          grid, world_size=world, steps=4, device=CPU) for size, world in (("8", 1), ("4", 2)))
    assert (one.global_batch, two.global_batch, two.world_size, one.rows) == (8, 8, 2, 32)
    assert one.settings == two.settings
    # With 2 micro-batches per step (grad_accum_steps 2) each micro-step contrasts 4 rows only: fewer negatives.
    accumulated = calibrate(_config(tiny_model_dir, data, "--guide.cache", str(cache), "--train.batch_size", "4",
                                    "--train.grad_accum_steps", "2"), grid, world_size=1, steps=4, device=CPU)
    assert accumulated.settings[0].negatives_left_mean < one.settings[0].negatives_left_mean


def test_a_live_guide_gives_the_cached_shares(tiny_model_dir, cached):
    data, cache = cached
    grid = [Setting("absolute", 0.05)]
    live, stored = (calibrate(_config(tiny_model_dir, data, *extra, "--train.batch_size", "8"), grid, world_size=1,
                              steps=3, device=CPU) for extra in ([], ["--guide.cache", str(cache)]))
    # The cache holds the guide's fp32 embeddings in fp16: a score near a threshold may land on the other side.
    for block in BLOCKS:
        assert live.settings[0].masked[block] == pytest.approx(stored.settings[0].masked[block], abs=0.02)


def test_a_stream_is_calibrated_like_the_run_reads_it(tiny_model_dir, cached):
    """`data.streaming`: the global batches come from the stream's buffers, cut per rank as training cuts them."""
    data, _ = cached
    grid = [Setting("absolute", 0.0)]
    one, two = (calibrate(_config(tiny_model_dir, data, "--data.streaming", "true", "--train.max_steps", "2",
                                  "--train.batch_size", size), grid, world_size=world, steps=None, device=CPU)
                for size, world in (("8", 1), ("4", 2)))
    assert (one.steps, one.rows) == (2, 16)  # the run's 2 steps
    assert one.settings == two.settings


def test_a_mixture_keeps_each_sources_policy(tmp_path, tiny_model_dir):
    """Source `labels` turns in-batch negatives off: its anchors are judged against their own hard negative alone,
    so over a whole epoch its share is that of the same rows calibrated alone with the policy in the loss section,
    whatever the other source's batches."""
    first, second = _rows(tmp_path, "first", "noun.act", 24), _rows(tmp_path, "second", "verb.motion", 24)
    sources = (f"[{{path: {first}, name: plain}}, {{path: {second}, name: labels, in_batch_negatives: false, "
               "margin: 0.3}]")
    grid = [Setting("absolute", 0.0), Setting("absolute", 0.05)]
    mixture = calibrate(load_config(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir),
                                     "--guide.dtype", "fp32", "--data.sources", sources, "--train.batch_size", "8"]),
                        grid, world_size=1, steps=6, device=CPU)
    alone = calibrate(_config(tiny_model_dir, second, "--loss.in_batch_negatives", "false", "--train.batch_size", "8"),
                      grid, world_size=1, steps=3, device=CPU)
    assert mixture.rows == 48 and alone.rows == 24
    for in_mixture, by_itself in zip(mixture.settings, alone.settings):  # the grid's margin replaces the source's
        assert set(in_mixture.masked_by_source) == {"plain", "labels"}
        assert in_mixture.masked_by_source["labels"] == pytest.approx(by_itself.masked_all, abs=1e-12)
        assert by_itself.masked["qp"] is None and by_itself.masked["qq"] is None  # nothing else to judge
        assert by_itself.negatives_left_mean <= 1


def test_main_prints_the_table_and_writes_json(tmp_path, tiny_model_dir, cached, capsys):
    data, cache = cached
    out = tmp_path / "calibration.json"
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--guide.dtype", "fp32",
                 "--guide.cache", str(cache), "--data.path", str(data), "--train.batch_size", "8", "--margins",
                 "0.01,0.1", "--margin-strategies", "relative", "--steps", "2", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 global batches of 8 at world size 1" in err and "relative margin: masked share" in err
    assert "absolute margin" in err and "-> 0 " in err  # the configured margin (0, absolute) is always tried
    record = json.loads(out.read_text())
    assert [(s["margin_strategy"], s["margin"]) for s in record["settings"]] == [
        ("absolute", 0.0), ("relative", 0.01), ("relative", 0.1)]
    assert record["rows"] == 16 and set(record["settings"][0]["masked"]) == set(BLOCKS)


def _fails(capsys, *argv: str) -> str:
    return one_error_line(main, capsys, *argv)


def test_bad_options_fail_in_one_line(tmp_path, tiny_model_dir, capsys):
    data = _rows(tmp_path, "rows", "noun.act", 16)
    common = ["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--data.path", str(data)]
    assert "--margins 0,x: expected comma-separated numbers" in _fails(capsys, *common, "--margins", "0,x")
    assert "'cosine' is not one of absolute, relative" in _fails(capsys, *common, "--margin-strategies", "cosine")
    assert "--world-size 0: must be at least 1" in _fails(capsys, *common, "--world-size", "0")
    assert "cannot be split over 3 processes" in _fails(capsys, *common, "--world-size", "3", "--train.batch_size",
                                                        "8", "--train.global_batch_size", "8")
    assert "calibrate needs a guide" in _fails(capsys, "--model.name", str(tiny_model_dir), "--data.path", str(data),
                                               "--guide.name", "null")


def test_command_is_registered():
    assert cli.COMMANDS["calibrate"][0] == "gist_scale.tools.calibrate"
