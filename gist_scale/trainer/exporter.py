"""The exporter: a trained student as a sentence-transformers folder with its model card, and the Hub upload.

What the folder holds (the whole encoder, or a merged LoRA model beside its adapter) is the student policy's; the
exporter adds what the run measured (`gist_scale.model_card.RunFacts`) and uploads `RUN/final/` when asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator

from gist_scale.config import JobConfig
from gist_scale.data import DataReport
from gist_scale.model_card import RunFacts, push_to_hub, write_model_card
from gist_scale.plan import RunPlan
from gist_scale.trainer.console import console
from gist_scale.trainer.student import StudentPolicy

__all__ = ["Exporter", "SentenceTransformersExporter"]


class Exporter(Protocol):
    def export(self, destination: Path, step: int, metrics: dict[str, float] | None = None) -> None:
        """Write the student as it is now to `destination` (every rank calls it), with `metrics` on its card."""

    def publish(self, destination: Path) -> None:
        """Upload an export where the config asks for it (main process; a no-op otherwise)."""


class SentenceTransformersExporter:
    def __init__(self, cfg: JobConfig, plan: RunPlan, total_steps: int, accelerator: Accelerator,
                 student: torch.nn.Module, policy: StudentPolicy, data_report: Callable[[], DataReport],
                 eval_source: str | None, started: float) -> None:
        self.cfg, self.plan, self.total_steps, self.accelerator = cfg, plan, total_steps, accelerator
        self.student, self.policy, self.data_report = student, policy, data_report
        self.eval_source, self.started = eval_source, started
        """`time.monotonic()` when the run started: the card's wall time counts from there."""

    def export(self, destination: Path, step: int, metrics: dict[str, float] | None = None) -> None:
        self.policy.export(self.accelerator, self.student, destination)
        if not self.accelerator.is_main_process:
            return
        write_model_card(destination, self.cfg, RunFacts(
            embedding_dim=self.accelerator.unwrap_model(self.student).dim, plan=self.plan, steps=step,
            total_steps=self.total_steps, wall_time_s=time.monotonic() - self.started, data=self.data_report(),
            eval_source=self.eval_source, metrics=metrics))
        console.print(f"model (sentence-transformers format): {destination}")

    def publish(self, destination: Path) -> None:
        if self.cfg.export.push_to_hub and self.accelerator.is_main_process:
            console.print(f"uploaded to the Hub: {push_to_hub(destination, self.cfg.export)}")
