"""Elastic resume (gist_scale/resume.py): another world size continues the same run; another run is refused.

The multi-process tests chain their resumes to spare the CPU: an uninterrupted 2-rank run (the reference) saves
step 2; a 1-process run resumes it and saves step 4 (written by 1 process); a 2-rank run resumes that. Every
resumed run must log the reference's losses (dropout 0, within 1e-4) and export its final weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dist_utils import assert_same_steps, torchrun_command
from test_beir import write_beir_folder
from gist_scale.data import GlobalBatchSampler
from gist_scale.evaluation.cli import load_model
from gist_scale.evaluation.cli import main as evaluate
from gist_scale.plan import per_device_batch
from gist_scale.train import main

STEPS = 6


def run_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    # An fp32 guide: the exactness contract's condition (a bf16 guide's near-ties may flip with each rank's padding).
    return ["--model.name", str(model_dir), "--guide.name", str(model_dir), "--guide.dtype", "fp32",
            "--model.dropout", "0.0",
            "--train.log_every", "1", "--train.max_steps", str(STEPS), "--checkpoint.every", "2",
            "--checkpoint.keep_last", "5", "--train.output_dir", str(out), *extra]


def launch(nproc: int, layout: str, args: list[str], launch_env) -> str:
    result = subprocess.run(torchrun_command(nproc, "train", *args), env=launch_env(layout), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stderr


def resume_from(checkpoint: Path, run: Path) -> None:
    """A new run directory holding only `checkpoint`, as a requeued job would find its own."""
    shutil.copytree(checkpoint, run / "checkpoints" / checkpoint.name)


def assert_same_run(run: Path, reference: Path, first_step: int, tolerance: float = 1e-5) -> None:
    """The resumed steps have the reference's losses, gradient norms and masks, and the same final weights."""
    assert_same_steps(run, reference, first_step, loss_abs=tolerance)
    want = load_file(reference / "final" / "model.safetensors")
    got = load_file(run / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name].float(), tensor.float(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ one process


def test_non_dividing_world_sizes_are_answered_with_the_ones_that_work():
    assert per_device_batch(12, 3, 1, "x") == 4
    with pytest.raises(ValueError) as error:
        per_device_batch(12, 5, 1, "train.global_batch_size=12")
    assert str(error.value) == (
        "global batch 12 (train.global_batch_size=12) cannot be split over 5 processes x 1 accumulation steps "
        "(12 / 5 is not a whole number); world sizes that work with train.grad_accum_steps=1: 1 (12 per device), "
        "2 (6 per device), 3 (4 per device), 4 (3 per device), 6 (2 per device), 12 (1 per device). Start the job "
        "with one of those process counts")
    with pytest.raises(ValueError, match=r"with train.grad_accum_steps=2: 1 \(6 per device\), 2 \(3 per device\), "
                                         r"3 \(2 per device\), 6 \(1 per device\)\."):
        per_device_batch(12, 4, 2, "x")


def test_the_sampler_cuts_the_same_global_batches_on_any_world_size():
    """What an elastic resume relies on: the plan depends on the global batch, not on how many ranks share it."""
    tasks = [f"task{i % 3}" for i in range(150)]

    def global_batches(world: int, position: int = 0) -> list[list[int]]:
        ranks = []
        for rank in range(world):
            sampler = GlobalBatchSampler(tasks, 12 // world, world, rank, seed=7)
            sampler.load_state_dict({"epoch": 1, "position": position})
            ranks.append(list(sampler))
        return [sorted(sum(parts, [])) for parts in zip(*ranks)]

    reference = global_batches(1)
    assert len(reference) == 12 and all(len(batch) == 12 for batch in reference)
    for world in (2, 3, 4, 6):
        assert global_batches(world) == reference
        assert global_batches(world, position=5) == reference[5:]


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_a_resume_that_would_change_the_run_is_refused_before_anything_loads(tmp_path, tiny_model_dir, monkeypatch,
                                                                              capsys):
    run = tmp_path / "run"
    base = run_args(tiny_model_dir, run, "--train.max_steps", "2", "--train.global_batch_size", "12")
    assert main(base) == 0
    checkpoint = run / "checkpoints" / "step_2"
    before = _snapshot(run)
    capsys.readouterr()

    from gist_scale.trainer import batches, loop, student

    loaded = []
    real_tokenizer = loop.load_tokenizer
    for module in (loop, batches):  # the student's tokenizer, and the guide's for the data
        monkeypatch.setattr(module, "load_tokenizer", lambda *a, **k: loaded.append("tokenizer")
                            or real_tokenizer(*a, **k))
    for module, name in ((student, "load_student"), (loop, "load_guide")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a model was loaded"))
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    refusals = [  # (flags, the field named, what may already have been loaded: only the tokenizers for data)
        (["--model.name", str(other_model)], f"model.name: checkpoint '{tiny_model_dir}', this run '{other_model}'",
         []),
        (["--loss.temperature", "0.05"], "loss.temperature: checkpoint 0.01, this run 0.05", []),
        # A per-device batch means "at the checkpoint's world size" (1 here): 6 x 1 is another global batch.
        (["--train.global_batch_size", "null", "--train.batch_size", "6"],
         "train.global_batch_size: checkpoint 12, this run 6", []),
        (["--data.max_rows", "2048"], "data.fingerprint: checkpoint '", ["tokenizer"] * 2),
    ]
    for flags, named, may_load in refusals:
        loaded.clear()
        assert main([*base, *flags, "--resume", "auto"]) == 2, flags
        err = capsys.readouterr().err
        assert f"{checkpoint} is from another run; refusing to resume it" in err and named in err, err
        assert "--checkpoint.allow_changes '[" in err
        assert loaded == may_load, flags
        assert _snapshot(run) == before, flags

    # Five processes cannot split 12 rows: refused before anything is loaded, with the process counts that work.
    loaded.clear()
    with monkeypatch.context() as five:
        five.setattr(Accelerator, "num_processes", property(lambda self: 5))
        assert main([*base, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "global batch 12 (the checkpoint step_2's global batch) cannot be split over 5 processes" in err
    assert "1 (12 per device), 2 (6 per device), 3 (4 per device), 4 (3 per device)" in err
    assert loaded == [] and _snapshot(run) == before

    assert main([*base, "--checkpoint.allow_changes", "[loss.temprature]"]) == 2
    assert "checkpoint.allow_changes: 'loss.temprature' is not a field of the run's identity" in capsys.readouterr().err

    # Explicitly allowed: resumed (nothing left to train at step 2 of 2), and the change is in the summary.
    monkeypatch.undo()
    assert main([*base, "--loss.temperature", "0.05", "--checkpoint.allow_changes", "[loss.temperature]",
                 "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint.allow_changes: loss.temperature changed from 0.01 to 0.05" in err
    assert f"resumed from {checkpoint} at step 2" in err


# ------------------------------------------------------------------------------------------------ world size changes


@pytest.mark.slow
def test_ddp_resumes_on_one_two_and_three_processes_with_the_same_global_batch(tmp_path, tiny_model_dir,
                                                                               launch_env):
    """Global batch 12: 2 ranks x 6 -> 1 process x 12 -> 2 ranks x 6, and 2 ranks -> 3 ranks x 4. The first 2 ranks
    run with ACCELERATE_USE_CPU=1, the later ones under a bare torchrun: one process continuing the former and the
    latter continuing one process both log the same steps, so both CPU launches train in sync."""
    reference = tmp_path / "two"
    launch(2, "cpu", run_args(tiny_model_dir, reference, "--train.batch_size", "6"), launch_env)

    # 2 -> 1, in this process. The same flags: a per-device batch of 6 was chosen on the checkpoint's 2 ranks.
    one = tmp_path / "one"
    resume_from(reference / "checkpoints" / "step_2", one)
    assert main(run_args(tiny_model_dir, one, "--train.batch_size", "6", "--resume", "auto")) == 0
    assert_same_run(one, reference, first_step=3)
    assert (one / "checkpoints" / "step_4" / "run.json").is_file()

    # 1 -> 2, from the checkpoint the single process wrote.
    again = tmp_path / "two-again"
    resume_from(one / "checkpoints" / "step_4", again)
    err = launch(2, "ddp", run_args(tiny_model_dir, again, "--train.global_batch_size", "12", "--resume", "auto"),
                 launch_env)
    assert "resuming a checkpoint of 1 process on 2: same global batch 12, per-device batch 12 -> 6" in err
    assert_same_run(again, reference, first_step=5)

    # 2 -> 3.
    three = tmp_path / "three"
    resume_from(reference / "checkpoints" / "step_2", three)
    err = launch(3, "ddp", run_args(tiny_model_dir, three, "--train.global_batch_size", "12", "--resume", "auto"),
                 launch_env)
    assert "world size 3  per-device batch 4  grad accum 1  global batch 12" in err
    assert_same_run(three, reference, first_step=3)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_zero_resumes_on_one_process_and_back_through_a_universal_checkpoint(layout, tmp_path, tiny_model_dir,
                                                                             launch_env, capsys):
    """ZeRO shards of 2 ranks -> 1 process -> 2 ranks, converted through DeepSpeed's universal checkpoint; and
    2 ZeRO ranks -> 1 process without DeepSpeed. Every leg holds losses and gradient norms to 1e-5: DeepSpeed's
    ZeRO-3 loader shares one Adam `step` between the decaying and the non-decaying weights, which put them 1e-4 off
    within four steps until `resume._repair_loaded_optimizer` undid it. The ZeRO-3 reference run also shows that a
    sharded checkpoint evaluates like the run's export (`assert_checkpoint_evaluates_like_the_export`)."""
    reference = tmp_path / "two"
    launch(2, layout, run_args(tiny_model_dir, reference, "--train.global_batch_size", "8"), launch_env)

    one = tmp_path / "one"
    resume_from(reference / "checkpoints" / "step_2", one)
    err = launch(1, layout, run_args(tiny_model_dir, one, "--train.global_batch_size", "8", "--resume", "auto"),
                 launch_env)
    stage = layout[-1]
    universal = one / "checkpoints" / "step_2" / "universal"
    assert f"ZeRO-{stage} states resharded through DeepSpeed's universal checkpoint {universal}" in err
    assert (universal / "pytorch_model").is_dir()
    assert_same_run(one, reference, first_step=3)

    again = tmp_path / "two-again"
    resume_from(one / "checkpoints" / "step_4", again)
    err = launch(2, layout, run_args(tiny_model_dir, again, "--train.global_batch_size", "8", "--resume", "auto"),
                 launch_env)
    assert "resuming a checkpoint of 1 process on 2" in err
    assert_same_run(again, reference, first_step=5)

    # Without DeepSpeed (in this process): whole weights and AdamW moments by parameter, from the universal form.
    plain = tmp_path / "plain"
    resume_from(reference / "checkpoints" / "step_2", plain)
    capsys.readouterr()
    assert main(run_args(tiny_model_dir, plain, "--train.global_batch_size", "8", "--resume", "auto")) == 0
    consolidated = plain / "checkpoints" / "step_2" / "plain"
    assert f"ZeRO-{stage} states consolidated for a run without DeepSpeed into {consolidated}" in capsys.readouterr().err
    assert_same_run(plain, reference, first_step=3)

    if layout == "zero3":
        assert_checkpoint_evaluates_like_the_export(reference, tiny_model_dir, tmp_path)


def assert_checkpoint_evaluates_like_the_export(run: Path, model_dir: Path, tmp_path: Path) -> None:
    """A ZeRO-3 checkpoint (each rank holds a shard; `gist-scale eval` consolidates it with DeepSpeed's
    `zero_to_fp32`) has the run's exported weights and evaluates like the export, on a BEIR folder."""
    checkpoint = run / "checkpoints" / f"step_{STEPS}"
    assert (checkpoint / "pytorch_model").is_dir() and not (checkpoint / "model.safetensors").exists()
    trained = load_model(str(checkpoint))[0].state_dict()
    exported = load_model(str(run / "final"))[0].state_dict()
    initial = load_model(str(model_dir))[0].state_dict()
    assert trained.keys() == exported.keys()
    for key in trained:
        torch.testing.assert_close(trained[key], exported[key], atol=1e-6, rtol=0)
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 1e-5  # training moved the weights
    folder = write_beir_folder(tmp_path / "beir", rows=40)
    outs = {}
    for name, model in (("final", run / "final"), ("checkpoint", checkpoint)):
        outs[name] = tmp_path / f"{name}.json"
        assert evaluate([str(model), "--beir", str(folder), "--out", str(outs[name])]) == 0
    metrics = json.loads(outs["final"].read_text())["model"]
    assert json.loads(outs["checkpoint"].read_text())["model"] == pytest.approx(metrics, abs=1e-6)
