"""A step's metrics, kept on the device until a log step, and the run's records: trackers, RUN/metrics.jsonl and
the log line.

A log step is the loop's sync point: the window's values cross ranks (two all-reduces) and reach the host here, and
nowhere in between.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from transformers.utils import flatten_dict

from gist_scale import distributed
from gist_scale.config import METRICS_FILE, JobConfig
from gist_scale.data import TokenCounts
from gist_scale.flops import forward_flops
from gist_scale.loss import BLOCKS, LossStats
from gist_scale.trainer.console import console

__all__ = ["MetricsLog", "MetricsWindow", "StepMetrics", "StepOutcome", "model_flops", "progress_bar"]


@dataclass
class StepMetrics:
    """One micro-batch's values: device tensors, and host numbers the collator counted."""

    loss: Tensor
    stats: LossStats
    """What the loss says of the guide's mask: masked shares (by block too), duplicates, candidates per anchor."""
    tokens: int
    triplets: int
    model_flops: float
    source: int | None = None
    """The micro-batch's mixture source (`data.sources` index); None for a single source."""


@dataclass
class StepOutcome:
    """What one optimizer step did, the same on every rank; nothing in it has been read back from the device."""

    skipped: Tensor
    """0-dim bool on the device: the update was left out (a non-finite loss on some rank). The step still counts."""
    preempted: bool
    """A preemption signal reached some rank: stop after this step."""
    metrics: list[StepMetrics] = field(default_factory=list)
    """One entry per micro-batch."""
    grad_norm: Tensor | float | None = None
    """Global gradient norm before clipping (with clipping on)."""

    @property
    def applied(self) -> bool:
        """Was the update applied? Reading it waits for the device (the loop itself never asks)."""
        return not bool(self.skipped)


def model_flops(encoder_configs: dict, counts: dict[str, TokenCounts]) -> float:
    """Training FLOPs of a micro-batch on real tokens: the student's forward and backward (3x a forward) and the live
    guide's forward. GradCache's second forward is recomputation and is not counted."""
    return sum((3 if side == "student" else 1) * forward_flops(config, counts[side].tokens, counts[side].tokens_squared)
               for side, config in encoder_configs.items())


@dataclass
class MetricsWindow:
    """The steps since the last log line, and, as separate fields, the time spent in evaluation and checkpoints in
    between (so neither is mixed into the throughput)."""

    steps: list[StepOutcome] = field(default_factory=list)
    opened: float = field(default_factory=lambda: time.perf_counter())  # looked up per call: a test's clock applies
    other_seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, action: Callable[[], object]) -> None:
        # The steps queued before it are the window's work, not the action's: wait for them first (such a step reads
        # back anyway).
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()
        started = time.perf_counter()
        action()
        self.other_seconds[name] = self.other_seconds.get(name, 0.0) + time.perf_counter() - started

    def train_seconds(self) -> float:
        """The steps' own wall time: call it once their values have been read (the device has caught up)."""
        return time.perf_counter() - self.opened - sum(self.other_seconds.values())


class MetricsLog:
    """The run's records (trackers and RUN/metrics.jsonl, main process) and its log lines."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, total_steps: int, grad_accum_steps: int,
                 peak_tflops: float | None, source_names: list[str]) -> None:
        self.accelerator, self.run_dir, self.total_steps = accelerator, run_dir, total_steps
        self.grad_accum_steps, self.peak_tflops = grad_accum_steps, peak_tflops
        # A mixture's masked share is also recorded per source (one source: the totals say it).
        self.source_names = source_names if len(source_names) > 1 else []

    def init_trackers(self, cfg: JobConfig) -> None:
        if cfg.logging.trackers:
            # Trackers take flat scalar hyperparameters: {"optim.lr": 2e-5, ...}.
            flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                    for key, value in flatten_dict(cfg.to_dict()).items()}
            self.accelerator.init_trackers(cfg.logging.project, config=flat)

    def record(self, record: dict) -> None:
        """Send a metrics record to the trackers and append it to RUN/metrics.jsonl (main process)."""
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with (self.run_dir / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def log(self, window: MetricsWindow, record: dict) -> None:
        """Reduce the window over the ranks, add it to `record` (`step`, `epoch`, `lr`, ...), record and print it.
        Skipped steps count in the throughput (their work was done) but not in the loss statistics; a window of
        skipped steps only has no loss."""
        applied = (~torch.stack([s.skipped for s in window.steps])).tolist()  # the same on every rank
        seconds = window.train_seconds()
        kept = [m for step, ok in zip(window.steps, applied) if ok for m in step.metrics]
        counts = torch.tensor([[m.tokens, m.triplets, m.model_flops] for step in window.steps for m in step.metrics],
                              dtype=torch.float64, device=self.accelerator.device).sum(0)
        duplicates = sum((m.stats.duplicates_masked.double() for m in kept), counts.new_zeros(1))
        masks = self._mask_counts(kept, counts)
        # One collective for every sum of the window.
        summed = distributed.all_reduce_sum(torch.cat([counts, duplicates, masks.flatten()]))
        tokens, triplets, flops, duplicates = summed[:4].tolist()
        masks = summed[4:].reshape(masks.shape).tolist()
        tflops = flops / seconds / self.accelerator.num_processes / 1e12
        record = {**record, "triplets_per_s": triplets / seconds, "tokens_per_s": tokens / seconds,
                  "model_tflops_per_s": tflops, **window.other_seconds}
        if self.peak_tflops:
            record["mfu"] = tflops / self.peak_tflops
        if kept:
            local = torch.stack([torch.stack([m.loss, m.stats.masked_fraction, m.stats.candidates_per_anchor]).float()
                                 for m in kept]).mean(0)
            loss, masked, candidates = distributed.all_reduce_mean(local).tolist()
            # Per optimizer step over the global batch: summed over micro-batches and ranks, averaged over steps.
            record.update(loss=loss, masked_fraction=masked, candidates_per_anchor=candidates,
                          duplicates_masked=duplicates / (len(kept) / self.grad_accum_steps))
            # The guide's judgement by block and by source: flagged over judged, summed over the window and ranks;
            # a block or source the window did not judge has no entry.
            names = [*BLOCKS, *(f"source/{name}" for name in self.source_names)]
            record.update({f"masked_fraction/{name}": flagged / judged
                           for name, (flagged, judged) in zip(names, masks) if judged})
            grad_norm = next(s.grad_norm for s, ok in zip(reversed(window.steps), reversed(applied)) if ok)
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
        self.record(record)
        if self.accelerator.is_main_process:
            console.print(self._line(record))

    def _mask_counts(self, kept: list[StepMetrics], like: Tensor) -> Tensor:
        """``[4 + sources, 2]`` float64 on the device: (flagged, judged) per block, then per mixture source."""
        rows = like.new_zeros(len(BLOCKS) + len(self.source_names), 2)
        for m in kept:
            pair = torch.stack([m.stats.flagged_by_block, m.stats.judged_by_block], 1).to(rows)
            rows[:len(BLOCKS)] += pair
            if self.source_names and m.source is not None:
                rows[len(BLOCKS) + m.source] += pair.sum(0)
        return rows

    def _line(self, record: dict) -> str:
        line = f"step {record['step']:>6}/{self.total_steps}  "
        if "loss" in record:
            line += (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  masked {record['masked_fraction']:.3f}  "
                     f"duplicates {record['duplicates_masked']:.1f}  "
                     f"cand/anchor {record['candidates_per_anchor']:.0f}  ")
        else:
            line += f"every step skipped  lr {record['lr']:.2e}  "
        return (line + f"{record['triplets_per_s']:.1f} triplets/s  {record['tokens_per_s']:.0f} tokens/s"
                + (f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""))


def progress_bar(enabled: bool) -> Progress:
    """A Rich progress bar over optimizer steps; log lines printed through `console` appear above it."""
    return Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=True)
