"""Timing one mode: build it, take its warm-up steps, then time its optimizer steps one by one (the device
synchronised around each), and make its record; in this process or a fresh one.

The ZeRO modes always run in a fresh process (one per stage): DeepSpeed comes through the environment there, as a
launcher sets it, and its process group and Accelerate's DeepSpeed state never reach this one (so does `--device
cpu` on a machine with CUDA, for Accelerate's CPU switch). `--isolate` runs every mode alone in a fresh process, for
a per-mode peak resident memory on a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from rich.console import Console
from transformers import AutoConfig

from gist_scale.flops import forward_flops
from gist_scale.tools.bench.modes import (MATRYOSHKA_MODES, REFERENCE_MODES, CaseSetup, batch_facts, build_mode,
                                          mode_environment)
from gist_scale.tools.data_memory import memory_status

__all__ = ["RECORD_FIELDS", "Timing", "datasets_cache", "device_name", "measure"]

console = Console(stderr=True, highlight=False, soft_wrap=True)

RECORD_FIELDS = ("case", "student", "guide", "mode", "batch", "chunk_size", "triplets_per_s", "real_tokens_per_s",
                 "padding_fraction", "model_tflops_per_s", "mfu", "peak_mem_gib", "ratio_vs_st", "first_loss",
                 "seconds_per_step", "steps", "oom", "device", "precision", "matryoshka_dims", "lora_r",
                 "trainable_params", "peak_mem_kind")


@dataclass(frozen=True)
class Timing:
    """How every mode is measured."""

    steps: int
    """Timed optimizer steps."""
    warmup: int
    """Untimed optimizer steps first (the first one's loss is `first_loss`)."""
    isolate: bool
    threads: int | None
    peak_tflops: float | None


@contextlib.contextmanager
def datasets_cache(work_dir: Path) -> Iterator[None]:
    """`datasets`' Arrow caches of a case's rows go under its `work_dir` (deleted with it), without progress bars."""
    saved, bars = datasets.config.HF_DATASETS_CACHE, datasets.is_progress_bar_enabled()
    datasets.config.HF_DATASETS_CACHE = work_dir / "datasets_cache"
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = saved
        if bars:
            datasets.enable_progress_bars()


def measure(names: list[str], case: str, setup: CaseSetup, timing: Timing) -> list[dict]:
    """The records of modes `names`, in their order. Measured in this process, but the modes that need the same
    environment of their own (the ZeRO modes of one stage; every mode under `--device cpu` on a machine with CUDA)
    together in one fresh process; with `--isolate`, every mode alone in a fresh process."""
    alike: dict[tuple, list[int]] = {}
    for index, name in enumerate(names):
        alike.setdefault(tuple(mode_environment(name, setup).items()), []).append(index)
    records: dict[int, dict] = {}
    for environment, indices in alike.items():
        if not environment and not timing.isolate:
            records.update((i, _measure(names[i], case, setup, timing)) for i in indices)
            continue
        for together in ([i] for i in indices) if timing.isolate else [indices]:
            # Spawned, not forked: a forked child would share the parent's pages (and OpenMP is not fork-safe).
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_set_environment,
                                     initargs=(dict(environment),)) as pool:
                measured = pool.submit(_measure_in_child, [names[i] for i in together], case, setup, timing).result()
            records.update(zip(together, measured))
    return [records[i] for i in range(len(names))]


def _set_environment(variables: dict[str, str]) -> None:
    os.environ.update(variables)


def _measure_in_child(names: list[str], case: str, setup: CaseSetup, timing: Timing) -> list[dict]:
    if timing.threads:
        torch.set_num_threads(timing.threads)
    with datasets_cache(setup.work_dir):
        if not timing.isolate:  # in a process of their own for their environment's sake only
            return [_measure(name, case, setup, timing) for name in names]
        # Every mode's process imports the same libraries, so that their peaks differ by what the modes hold.
        for module in ("sentence_transformers", "peft", "deepspeed"):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        name, = names
        record = _measure(name, case, setup, timing, after_build=_reset_peak_rss)
    if not record["oom"]:
        record.update(peak_mem_gib=memory_status("VmHWM")["VmHWM"] / 2**30,
                      peak_mem_kind="process peak RSS over the steps")
    return [record]


def _reset_peak_rss() -> None:
    """Start `VmHWM` over from the current resident set (Linux >= 4.0), so the peak is the steps', not loading's
    (`from_pretrained` briefly holds the weights twice, plus the memory-mapped file). What loading freed goes back
    to the system first: glibc keeps freed heap pages resident until `malloc_trim`."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak may then include loading's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(name: str, case: str, setup: CaseSetup, timing: Timing,
             after_build: Callable[[], None] | None = None) -> dict:
    """Build the mode, run its warm-up steps then its timed ones, and return its record (`oom` when it did not
    fit). On CUDA the peak memory is counted from the end of the build, as the CPU's with `--isolate`."""
    console.print(f"[dim]{case} batch {setup.batch}: {name}")
    device = torch.device(setup.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    student, guide = case.split("/")
    record = {"case": case, "student": student, "guide": guide, "mode": name, "batch": setup.batch,
              "chunk_size": None, "steps": timing.steps, "oom": False, "device": device_name(device),
              "matryoshka_dims": list(setup.matryoshka_dims) if name in MATRYOSHKA_MODES else None,
              "lora_r": setup.lora_r, "peak_mem_kind": "accelerator peak allocation" if device.type == "cuda" else None}
    mode = None
    try:
        torch.manual_seed(setup.seed)
        mode = build_mode(name, setup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if after_build is not None:
            after_build()
        losses = [mode.step(mode.next_group()) for _ in range(timing.warmup)]
        work, elapsed = _Work(setup, name in REFERENCE_MODES, mode.guide_runs), 0.0
        for _ in range(timing.steps):
            group = mode.next_group()
            _sync(device)  # the group's copy to the device belongs to the data path, not to the step
            start = time.perf_counter()
            losses.append(mode.step(group))
            _sync(device)
            elapsed += time.perf_counter() - start
            work.count(group)
        # Read back once, after the timing: the trainer leaves out the update of a step with a non-finite loss.
        if not bool(torch.isfinite(torch.stack(losses)).all()):
            raise FloatingPointError(f"{case} batch {setup.batch}, {name}: a non-finite loss (its update left out, so "
                                     "its time is not a step's); try a lower --lr")
        first_loss = float(losses[0])
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        tflops = work.flops / elapsed / 1e12
        record.update(chunk_size=mode.chunk_size, precision=mode.precision, trainable_params=mode.trainable_params,
                      first_loss=first_loss, peak_mem_gib=peak, seconds_per_step=elapsed / timing.steps,
                      triplets_per_s=setup.batch * timing.steps / elapsed, real_tokens_per_s=work.real / elapsed,
                      padding_fraction=1.0 - work.real / work.processed, model_tflops_per_s=tflops,
                      mfu=tflops / timing.peak_tflops if timing.peak_tflops else None)
    except torch.OutOfMemoryError:
        record.update(oom=True, **{key: None for key in RECORD_FIELDS if key not in record})
    finally:
        del mode
        _release(device)  # before the next mode builds: a Trainer holds reference cycles
    return record


class _Work:
    """What the timed steps computed, counted on the host from the collator's numbers: real (non-padding) student
    tokens, the token positions the student's calls processed, padding included, and model FLOPs on real tokens (the
    student's forward and backward, 3x a forward, and the guide's forward where it runs; GradCache's recomputation is
    not counted)."""

    def __init__(self, setup: CaseSetup, reference: bool, guide_runs: bool) -> None:
        self.student = AutoConfig.from_pretrained(setup.student_dir)
        self.guide = AutoConfig.from_pretrained(setup.guide_dir) if guide_runs else None
        self.reference = reference
        self.real, self.processed, self.flops = 0, 0, 0.0

    def count(self, group: list) -> None:
        for facts in map(batch_facts, group):
            tokens = facts.student_tokens
            self.real += tokens.tokens
            self.processed += facts.processed_tokens
            self.flops += 3 * forward_flops(self.student, tokens.tokens, tokens.tokens_squared)
            if self.guide is not None:
                # sentence-transformers' guide reads the student's features; ours tokenizes for the guide.
                guide = tokens if self.reference else facts.guide_tokens
                self.flops += forward_flops(self.guide, guide.tokens, guide.tokens_squared)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
