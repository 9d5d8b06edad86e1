"""Fault tolerance of the trainer itself: preemption signals, dead and stalled ranks, interrupted and damaged
checkpoints.

Multi-rank runs start the 2 ranks as bare processes with the env:// variables that torchrun would set (RANK,
WORLD_SIZE, MASTER_ADDR, ...), without a launcher in between: what is observed is the trainer's own exit codes and
its own collective timeout, not a launcher tearing the group down. (tests/test_launch.py runs the same faults through
the real launch scripts.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import assert_same_losses, free_port, loss_records
from gist_scale.checkpoint import (COMPLETE_MARKER, CheckpointError, complete_checkpoints, incomplete_checkpoints,
                                   resolve_resume, verify_checkpoint)
from gist_scale.preemption import EXIT_PREEMPTED

STEPS = 10
TIMEOUT_S = 300


def train_args(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    # dropout 0 and an fp32 guide (the exactness contract): 2 ranks x 4 triplets log one process's losses.
    return ["--model.name", str(model_dir), "--guide.name", str(model_dir), "--guide.dtype", "fp32",
            "--model.dropout", "0.0",
            "--train.batch_size", "4", "--train.log_every", "1", "--train.max_steps", str(STEPS),
            "--train.output_dir", str(run_dir), *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in loss_records(run_dir)}


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "GIST_SCALE_FAULT"))}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1", **extra)
    return env


def wait_for(condition, what: str, procs=(), timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"a rank ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Ranks:
    """2 trainer processes forming one gloo group through env://, each logging to its own file."""

    def __init__(self, args: list[str], log_dir: Path, **env: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        port = str(free_port())
        self.logs = [log_dir / f"rank{rank}.log" for rank in range(2)]
        self.procs = []
        for rank in range(2):
            rank_env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
            with self.logs[rank].open("w") as log:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "gist_scale", "train", *args],
                                                   env=rank_env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) for proc in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ranks still running after {timeout} s:\n{self.log(0)[-3000:]}") from None

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")


def run_single(args: list[str], **env: str) -> subprocess.CompletedProcess:
    # A subprocess even for one rank: the fault hook ends its process with os._exit.
    return subprocess.run([sys.executable, "-m", "gist_scale", "train", *args], env=cpu_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted run: one process (this one) with the whole global batch of 8, which 2 ranks x 4
    match step for step, so the interrupted 2-rank runs below are held to it."""
    from gist_scale.train import main

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(tiny_model_dir, run_dir, "--train.batch_size", "8")) == 0
    result = losses(run_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


# ------------------------------------------------------------------------------------------------ no training


def _fake_checkpoint(path: Path, complete: bool, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True)
    files = files or {"model.safetensors": b"weights", "trainer_state.json": b"{}"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    if complete:
        sizes = {name: len(data) for name, data in files.items()}
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": 0, "files": sizes}))
    return path


def test_resume_auto_resolves_to_no_checkpoint_in_an_empty_or_missing_folder(tmp_path):
    assert resolve_resume("auto", tmp_path / "no-such-run" / "checkpoints") is None
    (tmp_path / "checkpoints").mkdir()
    assert resolve_resume("auto", tmp_path / "checkpoints") is None
    assert resolve_resume(None, tmp_path / "checkpoints") is None


def test_checkpoints_without_their_marker_are_ignored_and_reported(tmp_path):
    root = tmp_path / "checkpoints"
    step2 = _fake_checkpoint(root / "step_2", complete=True)
    step10 = _fake_checkpoint(root / "step_10", complete=True)
    step12 = _fake_checkpoint(root / "step_12", complete=False)  # renamed but never marked: not trusted
    tmp14 = _fake_checkpoint(root / ".tmp-step_14", complete=True)  # never renamed: not trusted either
    assert complete_checkpoints(root) == [step2, step10]  # numeric order, not lexical
    assert incomplete_checkpoints(root) == [tmp14, step12]
    assert resolve_resume("auto", root) == step10
    with pytest.raises(CheckpointError, match=re.escape(f"{step12 / COMPLETE_MARKER}: missing")):
        resolve_resume(str(step12), root)


def test_damaged_checkpoint_files_are_named(tmp_path):
    path = _fake_checkpoint(tmp_path / "step_4", complete=True)
    verify_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"weig")  # truncated
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'model.safetensors'}: 4 bytes, but 7 when")):
        verify_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'model.safetensors'}: listed in ") + ".* missing"):
        verify_checkpoint(path)
    for marker in ("{not json", json.dumps({"step": 4, "files": ["model.safetensors"]})):  # names without sizes
        (path / COMPLETE_MARKER).write_text(marker)
        with pytest.raises(CheckpointError, match=re.escape(f"{path / COMPLETE_MARKER}: unreadable completion marker")):
            verify_checkpoint(path)


# ------------------------------------------------------------------------------------------------ one rank


@pytest.fixture(scope="module")
def save_killed_midway(tiny_model_dir, tmp_path_factory):
    """A run whose process dies in the middle of saving its step-4 checkpoint (the GIST_SCALE_FAULT hook)."""
    root = tmp_path_factory.mktemp("killed-save")
    run_dir = root / "run"
    args = train_args(tiny_model_dir, run_dir, "--train.max_steps", "6", "--checkpoint.every", "2")
    result = run_single(args, GIST_SCALE_FAULT="die_during_checkpoint_save:4")
    assert result.returncode == 137, result.stderr[-3000:]
    # A pristine copy of the complete checkpoint, for the corruption tests.
    shutil.copytree(run_dir / "checkpoints" / "step_2", root / "step_2_copy")
    return run_dir, args, losses(run_dir), root / "step_2_copy"


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_the_previous_one_and_resume_uses_it(save_killed_midway):
    run_dir, args, first_losses, _ = save_killed_midway
    checkpoints = run_dir / "checkpoints"
    # The shards of step 4 were written, but neither its marker nor the rename happened.
    assert (checkpoints / ".tmp-step_4").is_dir() and not (checkpoints / ".tmp-step_4" / COMPLETE_MARKER).exists()
    assert not (checkpoints / "step_4").exists()
    assert (checkpoints / "step_2" / COMPLETE_MARKER).is_file()
    assert sorted(first_losses) == [1, 2, 3, 4]

    result = run_single([*args, "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ignoring incomplete checkpoint {checkpoints / '.tmp-step_4'}" in result.stderr
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in result.stderr
    resumed = loss_records(run_dir)[len(first_losses):]
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for record in resumed[:2]:  # the steps both runs made
        assert record["loss"] == pytest.approx(first_losses[record["step"]], abs=1e-6)
    assert (checkpoints / "step_6" / COMPLETE_MARKER).is_file()


@pytest.mark.slow
def test_a_corrupted_checkpoint_file_fails_the_resume_with_the_file_named(save_killed_midway, tmp_path):
    """Same size, garbage content: the marker's sizes cannot tell, deserializing does, and the file is named.
    (Missing and truncated files are caught before loading: test_damaged_checkpoint_files_are_named.)"""
    _, args, _, pristine = save_killed_midway
    corrupted = shutil.copytree(pristine, tmp_path / "corrupted")
    victim = corrupted / "optimizer.bin"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    args = list(args)
    args[args.index("--train.output_dir") + 1] = str(tmp_path / "run")
    result = run_single([*args, "--resume", str(corrupted)])
    assert result.returncode == 2
    assert f"{victim}: corrupted, it cannot be deserialized" in " ".join(result.stderr.split())


# ------------------------------------------------------------------------------------------------ two ranks


@pytest.mark.slow
def test_sigusr1_to_one_rank_then_a_killed_rank_stop_every_rank_and_each_resume_is_exact(tiny_model_dir, reference,
                                                                                        tmp_path):
    """One run, two faults, three starts (a start less than a run per fault). SIGUSR1 to one rank stops every rank
    with 124 at the same step, checkpointed; the resume repeats no step. Then that resume loses a rank to SIGKILL
    after its next checkpoint, which ends the survivor with a clear message; the restart completes, and every step,
    those done again after the kill included, has the uninterrupted run's loss."""
    run_dir = tmp_path / "run"
    timeout_s = 60
    args = [*train_args(tiny_model_dir, run_dir), "--checkpoint.every", "2",
            "--train.collective_timeout_s", str(timeout_s), "--resume", "auto"]
    ranks = Ranks(args, tmp_path / "logs1")
    wait_for(lambda: len(loss_records(run_dir)) >= 2, "step 2", ranks.procs)
    # Only rank 1 is signalled: the ranks agree through a collective, so rank 0 stops at the same step.
    ranks.procs[1].send_signal(signal.SIGUSR1)
    assert ranks.wait() == [EXIT_PREEMPTED, EXIT_PREEMPTED], ranks.log(0)[-3000:]
    stopped = loss_records(run_dir)[-1]["step"]
    assert stopped < STEPS - 2, "preempted too late to leave a checkpoint and steps for the kill"
    assert (run_dir / "checkpoints" / f"step_{stopped}" / COMPLETE_MARKER).is_file()
    assert f"preempted at step {stopped}: checkpoint saved; exiting with 124" in ranks.log(0)

    resumed = Ranks(args, tmp_path / "logs2")
    checkpoint = run_dir / "checkpoints" / f"step_{stopped + 2 - stopped % 2}"  # the resume's first periodic one
    wait_for(lambda: (checkpoint / COMPLETE_MARKER).is_file(), f"the {checkpoint.name} checkpoint", resumed.procs)
    killed_at = time.monotonic()
    resumed.procs[1].kill()
    rc = resumed.wait(timeout=timeout_s + 30)[0]
    # gloo sees the dead peer's socket close, so the survivor does not even wait for the timeout.
    assert time.monotonic() - killed_at < timeout_s
    assert rc == 1
    log = " ".join(resumed.log(0).split())
    assert "resumed from" in log and f"at step {stopped}" in log
    assert "rank 0: a collective failed: another rank died" in log and "--resume auto" in log
    # The preempted run and its resume logged every step once, up to the kill.
    steps = [r["step"] for r in loss_records(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= int(checkpoint.name.split("_")[1])

    restarted = Ranks(args, tmp_path / "logs3")
    assert restarted.wait() == [0, 0], restarted.log(0)[-3000:]
    assert "resumed from" in restarted.log(0)
    assert loss_records(run_dir)[-1]["step"] == STEPS
    assert_same_losses(run_dir, reference)  # steps redone after the restart included


@pytest.mark.slow
def test_a_stalled_rank_ends_the_others_after_the_collective_timeout(tiny_model_dir, tmp_path):
    """A rank that stops answering without dying (SIGSTOP: a hung GPU, a frozen node) is caught by the timeout."""
    run_dir = tmp_path / "run"
    timeout_s = 10
    ranks = Ranks([*train_args(tiny_model_dir, run_dir), "--train.max_steps", "500",
                   "--train.collective_timeout_s", str(timeout_s)], tmp_path / "logs")
    try:
        wait_for(lambda: len(loss_records(run_dir)) >= 2, "step 2", ranks.procs)
        stopped_at = time.monotonic()
        ranks.procs[1].send_signal(signal.SIGSTOP)
        try:
            rc = ranks.procs[0].wait(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 0 still waiting {timeout_s + 60} s after its peer stalled") from None
        elapsed = time.monotonic() - stopped_at
    finally:
        ranks.kill()
    assert rc == 1
    assert timeout_s * 0.8 <= elapsed < timeout_s + 60
    log = " ".join(ranks.log(0).split())
    assert f"stalled longer than train.collective_timeout_s ({timeout_s} s)" in log
    assert "imed out" in log  # gloo's own words, kept at the end of the message


@pytest.mark.parametrize(("world_size", "finalized"), [("1", True), ("2", False)])
def test_a_rank_of_a_multi_process_job_exits_without_interpreter_finalization(world_size, finalized):
    """`python -m gist_scale` on a rank of a multi-process job ends with the command's exit code and its output
    flushed, but skips interpreter finalization (where gloo's threads can abort the process); a single process
    exits normally."""
    script = ("import atexit, sys; atexit.register(lambda: print('FINALIZED', flush=True)); "
              "sys.argv = ['gist-scale', 'nonsense']; from gist_scale.cli import run; sys.exit(run())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, WORLD_SIZE=world_size))
    assert result.returncode == 2
    assert "unknown command 'nonsense'" in result.stderr
    assert ("FINALIZED" in result.stdout) is finalized
