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
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import torch
from transformers import AutoConfig

from gist_scale.tools.bench.modes import (MATRYOSHKA_MODES, REFERENCE_MODES, CaseSetup, ReferenceMode, TrainerMode,
                                          mode_environment, processed_tokens)
from gist_scale.tools.data_memory import memory_status
from gist_scale.trainer.console import console
from gist_scale.trainer.step_metrics import model_flops

__all__ = ["RECORD_FIELDS", "device_name", "measure"]

RECORD_FIELDS = ("case", "student", "guide", "mode", "batch", "chunk_size", "triplets_per_s", "real_tokens_per_s",
                 "padding_fraction", "model_tflops_per_s", "mfu", "peak_mem_gib", "ratio_vs_st", "first_loss",
                 "seconds_per_step", "steps", "oom", "device", "precision", "matryoshka_dims", "lora_r",
                 "trainable_params", "peak_mem_kind")


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


def measure(names: list[str], setup: CaseSetup) -> list[dict]:
    """The records of modes `names`, in their order. Measured in this process, but the modes that need the same
    environment of their own (the ZeRO modes of one stage; every mode under `--device cpu` on a machine with CUDA)
    together in one fresh process; with `--isolate`, every mode alone in a fresh process."""
    alike: dict[tuple, list[int]] = {}
    for index, name in enumerate(names):
        alike.setdefault(tuple(mode_environment(name, setup).items()), []).append(index)
    records: dict[int, dict] = {}
    for environment, indices in alike.items():
        if not environment and not setup.cfg.isolate:
            records.update((i, _measure(names[i], setup)) for i in indices)
            continue
        for together in ([i] for i in indices) if setup.cfg.isolate else [indices]:
            # Spawned, not forked: a forked child would share the parent's pages (and OpenMP is not fork-safe).
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                job = pool.submit(_measure_in_child, [names[i] for i in together], setup, dict(environment))
            records.update(zip(together, job.result()))
    return [records[i] for i in range(len(names))]


def _measure_in_child(names: list[str], setup: CaseSetup, environment: dict[str, str]) -> list[dict]:
    os.environ.update(environment)  # before the mode builds its Accelerator, which reads it
    if setup.cfg.threads:
        torch.set_num_threads(setup.cfg.threads)
    if setup.cfg.isolate:
        # Every mode's process imports the same libraries, so that their peaks differ by what the modes hold.
        for module in ("sentence_transformers", "peft", "deepspeed"):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
    return [_measure(name, setup) for name in names]


def _reset_peak_rss() -> None:
    """Start `VmHWM` over from the current resident set (Linux >= 4.0), so the peak is the steps', not loading's
    (`from_pretrained` briefly holds the weights twice, plus the memory-mapped file). What loading freed goes back
    to the system first: glibc keeps freed heap pages resident until `malloc_trim`."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak may then include loading's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _measure(name: str, setup: CaseSetup) -> dict:
    """Build the mode, run its warm-up steps then its timed ones, and return its record (`oom` when it did not
    fit). The peak memory is counted from the end of the build: the accelerator's peak allocation on CUDA; on a CPU,
    with `--isolate` (the mode alone in its process), the process's peak resident set.

    Counted on the host from the collator's numbers: real (non-padding) student tokens, the token positions the
    student's calls processed, padding included, and model FLOPs on real tokens (`model_flops`, as the trainer
    counts them; sentence-transformers' guide reads the student's tokens)."""
    cfg, device, cuda = setup.cfg, setup.cfg.device, setup.cuda
    console.print(f"[dim]{setup.case} batch {setup.batch}: {name}")
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    record = {"case": setup.case, "student": setup.student, "guide": setup.guide, "mode": name, "batch": setup.batch,
              "chunk_size": None, "steps": cfg.steps, "oom": False, "device": device_name(device),
              "matryoshka_dims": list(setup.matryoshka_dims) if name in MATRYOSHKA_MODES else None,
              "lora_r": cfg.lora_r, "peak_mem_kind": "accelerator peak allocation" if cuda else
              "process peak RSS over the steps" if cfg.isolate else None}
    mode = None
    try:
        torch.manual_seed(cfg.seed)
        with datasets_cache(setup.work_dir):  # where the mode's build reads, tokenizes and caches the rows
            mode = (ReferenceMode if name in REFERENCE_MODES else TrainerMode)(name, setup)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        elif cfg.isolate:
            _reset_peak_rss()
        configs = {"student": AutoConfig.from_pretrained(setup.student_dir)}
        if mode.guide_runs:
            configs["guide"] = AutoConfig.from_pretrained(setup.guide_dir)
        losses = [mode.step(next(mode.groups)) for _ in range(cfg.warmup)]
        real = processed = flops = elapsed = 0
        for _ in range(cfg.steps):
            group = next(mode.groups)
            if cuda:
                torch.cuda.synchronize(device)  # the group's copy to the device belongs to the data path
            start = time.perf_counter()
            losses.append(mode.step(group))
            if cuda:
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            for batch in group:
                counts = batch.token_counts
                real += counts["student"].tokens
                processed += processed_tokens(batch)
                flops += model_flops(configs, {"student": counts["student"], "guide": counts["student"]}
                                     if name in REFERENCE_MODES else counts)
        # Read back once, after the timing: the trainer leaves out the update of a step with a non-finite loss.
        if not bool(torch.isfinite(torch.stack(losses)).all()):
            raise FloatingPointError(f"{setup.case} batch {setup.batch}, {name}: a non-finite loss (its update left "
                                     "out, so its time is not a step's); try a lower --lr")
        tflops = flops / elapsed / 1e12
        record.update(chunk_size=mode.chunk_size, precision=mode.precision, trainable_params=mode.trainable_params,
                      first_loss=float(losses[0]), seconds_per_step=elapsed / cfg.steps,
                      peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                      triplets_per_s=setup.batch * cfg.steps / elapsed, real_tokens_per_s=real / elapsed,
                      padding_fraction=1.0 - real / processed, model_tflops_per_s=tflops,
                      mfu=tflops / cfg.peak_tflops if cfg.peak_tflops else None)
        if cfg.isolate:
            record["peak_mem_gib"] = memory_status("VmHWM")["VmHWM"] / 2**30
    except torch.OutOfMemoryError:
        record.update(oom=True, **{key: None for key in RECORD_FIELDS if key not in record})
    finally:
        del mode
        gc.collect()  # before the next mode builds: a Trainer holds reference cycles
        if cuda:
            torch.cuda.empty_cache()
    return record


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
