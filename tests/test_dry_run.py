"""`gist-scale train --dry-run`: everything checked that needs no weights, the plan and the per-rank memory printed,
no weight file opened, nothing trained or written into the run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from dist_utils import torchrun_command
from gist_scale.config import ModelConfig
from gist_scale.data import sample_data_path
from gist_scale.memory import GiB, count_parameters, estimate_model_states
from gist_scale.train import main


def printed_total(err: str) -> float:
    """The per-rank GiB figure of the dry run's memory line."""
    match = re.search(r"model states per rank \(.*?\): ([\d.]+) GiB", err)
    assert match, err
    return float(match.group(1))


def test_quickstart_dry_run_prints_the_plan_and_memory_and_trains_nothing(tmp_path, tiny_model_dir, capsys,
                                                                         no_weight_reads):
    run = tmp_path / "run"
    args = ["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--train.output_dir", str(run),
            "--train.batch_size", "16", "--train.max_steps", "null", "--train.epochs", "2"]
    assert main([*args, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "dry run: nothing is trained and no weights are loaded" in err
    assert "world size 1  per-device batch 16  grad accum 1  global batch 16  no ZeRO" in err
    assert "steps 512 (256 per epoch)" in err  # 4,096 rows in 8 tasks of 512: 256 global batches of 16
    assert "rows: 4096" in err and "truncated: " in err
    counts = count_parameters(ModelConfig(name=str(tiny_model_dir)))
    expected = estimate_model_states(counts, 0, 1, "no")
    assert printed_total(err) == pytest.approx(expected.total / GiB, abs=0.005)
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
    assert not any((run / "checkpoints").iterdir())


def test_dry_run_checks_the_data_and_the_checkpoint_to_resume(tmp_path, tiny_model_dir, capsys, no_weight_reads):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": " ", "neg": "n"}) + "\n")
    base = ["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--dry-run"]
    assert main([*base, "--data.path", str(bad), "--train.output_dir", str(tmp_path / "a")]) == 2
    assert "field 'pos': empty text" in capsys.readouterr().err
    assert main([*base, "--resume", str(tmp_path / "nowhere"), "--train.output_dir", str(tmp_path / "b")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_mixture_dry_run_prints_each_source(tmp_path, tiny_model_dir, capsys, no_weight_reads):
    rows = [json.loads(line) for line in sample_data_path("train").read_text().splitlines()[:1024]]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:512]))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[512:]))
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--train.output_dir",
                 str(tmp_path / "run"), "--data.sources", f"[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]",
                 "--train.batch_size", "8", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "source a:" in err and "source b:" in err and "global batch 8" in err


def test_cache_guide_dry_run_tokenizes_the_rows_and_writes_nothing(tmp_path, tiny_model_dir, capsys,
                                                                    no_weight_reads):
    from gist_scale.guide_cache import main as cache_guide

    out = tmp_path / "cache"
    assert cache_guide([str(out), "--guide.name", str(tiny_model_dir), "--data.max_rows", "100", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"would embed 100 rows x 3 texts = 300 texts with {tiny_model_dir} (32-dim, float16)" in err
    assert f"over 1 rank(s) into {out}: 0.00 GiB" in err and list(out.iterdir()) == []


def qwen3_8b_config_dir(tiny_decoder_dir, tmp_path: Path) -> Path:
    """A folder with the tiny Qwen3's tokenizer and Qwen3-Embedding-8B's architecture in config.json, no weights:
    the 8B model the recipe names, as far as a dry run can tell."""
    source = tiny_decoder_dir("qwen3-eos")
    out = tmp_path / "qwen3-8b-config"
    out.mkdir()
    for item in source.iterdir():
        if not item.name.endswith(".safetensors"):
            (out / item.name).write_bytes(item.read_bytes())
    config = json.loads((out / "config.json").read_text())
    config.pop("layer_types", None)  # one per layer: transformers derives the 36 of them
    config.update(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151665, max_position_embeddings=40960)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
def test_qwen3_8b_lora_zero3_recipe_dry_run_on_two_ranks(tmp_path, tiny_model_dir, tiny_decoder_dir, launch_env):
    """The 8B LoRA ZeRO-3 recipe under torchrun: the plan and the memory of an 8B student counted on the meta device
    (only rank 0 prints), the adapters alone in the optimizer, the frozen base partitioned over the 2 ranks."""
    model = qwen3_8b_config_dir(tiny_decoder_dir, tmp_path)
    run = tmp_path / "run"
    command = torchrun_command(2, "train", "--recipe", "qwen3-embedding-8b-lora", "--model.name", str(model),
                               "--guide.name", str(tiny_model_dir), "--guide.cache", "null", "--data.path", "null",
                               "--data.num_workers", "0", "--train.output_dir", str(run), "--train.batch_size", "4",
                               "--model.max_length", "64", "--guide.max_length", "64", "--dry-run")
    result = subprocess.run(command, env=launch_env("zero3"), capture_output=True, text=True, timeout=300)
    err = result.stdout + result.stderr
    assert result.returncode == 0, err[-3000:]
    assert err.count("dry run: nothing is trained") == 1  # rank 0 only
    assert "world size 2  per-device batch 4  grad accum 1  global batch 8  ZeRO-3  precision bf16" in err
    cfg = ModelConfig(name=str(model), pooling="last_token", lora_r=16, lora_alpha=32)
    counts = count_parameters(cfg)
    assert 7.0e9 < counts.total < 8.0e9 and counts.trainable < counts.total / 100  # adapters only
    expected = estimate_model_states(counts, 3, 2, "bf16")
    assert printed_total(err) == pytest.approx(expected.total / GiB, abs=0.005)
    assert expected.weights < 2 * counts.total * 2 / 2 + 1  # bf16 base weights, halved over 2 ranks
    assert not (run / "config.yaml").exists()
