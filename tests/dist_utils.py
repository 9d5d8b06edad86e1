"""Multi-process test helpers: N local gloo ranks, torchrun commands, and the loss records of a run.

Run a function on N local gloo ranks, failing (not hanging) if any rank stalls.

Usage::

    run_distributed(_worker, world_size=2, args=(...,))   # calls _worker(rank, world_size, *args)

``_worker`` must be a module-level function (it is pickled by reference into spawned
processes). An exception on any rank fails the calling test with that rank's traceback.
Two timeouts guard against hangs: gloo's own collective timeout (a rank blocked in a
collective raises) and a wall-clock deadline after which the parent kills the ranks it spawned.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    # Each rank gets one thread: the tests run on 2 cores and oversubscription makes them crawl.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    fn(rank, world_size, *args)
    # Tearing gloo down while a peer still has a collective in flight aborts the process
    # ("terminate called without an active exception"): leave together.
    dist.barrier()
    dist.destroy_process_group()
    # gloo's background threads can still abort the interpreter's own shutdown ("terminate called without an
    # active exception", SIGABRT) after a clean run: the work is verified, so leave without that shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (), timeout_s: float = 90.0
) -> None:
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``; raise on failure or timeout."""
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=0.2):  # join() raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            for proc in ctx.processes:
                proc.join(5)
            raise TimeoutError(f"distributed test did not finish within {timeout_s} s (hang?)")


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m gist_scale ARGS` with this interpreter.

    `--standalone` lets torchrun pick its own free rendezvous port, so several jobs may start at once.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "gist_scale", *args]


def loss_records(run_dir: Path) -> list[dict]:
    """The training records (those with a `loss`) of RUN_DIR/metrics.jsonl, in file order; [] before the first."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def assert_same_losses(run_dir: Path, reference: dict[int, float], tolerance: float = 1e-4) -> None:
    """Every logged step, including steps logged twice around a restart, has the reference's loss."""
    records = loss_records(run_dir)
    assert {r["step"] for r in records} == set(reference), f"steps logged: {[r['step'] for r in records]}"
    for record in records:
        assert record["loss"] == pytest.approx(reference[record["step"]], abs=tolerance), f"step {record['step']}"


def assert_same_steps(run_dir: Path, reference_dir: Path, first_step: int = 1, loss_abs: float = 1e-5,
                      grad_rel: float = 1e-5) -> None:
    """Every step logged by both runs from `first_step` on has the same loss, gradient norm (before clipping), guide
    mask share and duplicate count: the exactness contract, step by step (a final loss alone can hide a step that
    went astray and came back, and Adam's update hides a constant gradient scale)."""
    want = {r["step"]: r for r in loss_records(reference_dir) if r["step"] >= first_step}
    got = {r["step"]: r for r in loss_records(run_dir) if r["step"] >= first_step}
    assert set(got) == set(want) and want, f"steps logged: {sorted(got)} vs {sorted(want)}"
    for step, record in sorted(got.items()):
        reference = want[step]
        assert record["loss"] == pytest.approx(reference["loss"], abs=loss_abs), f"loss at step {step}"
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=grad_rel), f"grad norm at step {step}"
        assert record["masked_fraction"] == pytest.approx(reference["masked_fraction"], abs=1e-6), f"mask at {step}"
        assert record["duplicates_masked"] == reference["duplicates_masked"], f"duplicates at step {step}"


def one_error_line(main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command's `main(argv)` that must fail: exit 2, no traceback, exactly one `error:` line (returned)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]
