"""The evaluator: held-out retrieval metrics before training (RUN/eval_baseline.json), every `eval.every` steps, and
at the end, with the best model kept when asked (`checkpoint.keep_best`) and the before/after table.

Every rank evaluates (the encoding is sharded) and the keep-best decision is rank 0's for all
(`distributed.main_process_decides`): the export that follows gathers a ZeRO-3 student from every rank. A run
without held-out data has `NoEvaluation`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.table import Column, Table
from transformers import PreTrainedTokenizerBase

from gist_scale import distributed
from gist_scale.config import JobConfig
from gist_scale.evaluation import EvalData, evaluate_embedder, load_beir, load_eval_data, read_sts
from gist_scale.model_card import BASELINE_FILE
from gist_scale.trainer.console import console
from gist_scale.trainer.exporter import Exporter

__all__ = ["Evaluator", "HeldOutEvaluator", "NoEvaluation", "build_evaluator", "load_held_out"]


class Evaluator:
    """The loop's evaluations. Every method of this base does nothing, which is a run without held-out data."""

    def due(self, step: int) -> bool:
        """Is a periodic evaluation due after `step`?"""
        return False

    def baseline(self, step: int) -> None:
        """Evaluate the starting model (a fresh run, before its first step)."""

    def evaluate(self, step: int) -> dict[str, float] | None:
        """Evaluate (periodically, and the trained model at the end), keeping the model as RUN/best/ if it is the
        best so far; the metrics go on the final model card (None: nothing evaluated)."""
        return None

    def compare(self, final: dict[str, float] | None) -> None:
        """Print the before/after table."""


class NoEvaluation(Evaluator):
    """A run without held-out data: nothing is evaluated."""


class HeldOutEvaluator(Evaluator):
    def __init__(self, cfg: JobConfig, accelerator: Accelerator, student: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerBase, data: EvalData, record: Callable[[dict], None],
                 exporter: Exporter, run_dir: Path) -> None:
        self.cfg, self.accelerator, self.student, self.tokenizer, self.data = cfg, accelerator, student, tokenizer, data
        self.record, self.exporter, self.run_dir = record, exporter, run_dir
        best_file = run_dir / "best" / "best.json"
        # A resumed run must beat the best model it already kept, not start the contest over.
        self.best = (json.loads(best_file.read_text())[cfg.checkpoint.keep_best]
                     if cfg.checkpoint.keep_best and best_file.is_file() else float("-inf"))

    def due(self, step: int) -> bool:
        return bool(self.cfg.eval.every) and step % self.cfg.eval.every == 0

    def baseline(self, step: int) -> None:
        metrics = self._evaluate(step)
        if self.accelerator.is_main_process:
            (self.run_dir / BASELINE_FILE).write_text(json.dumps(metrics))

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = self._evaluate(step)
        best_metric = self.cfg.checkpoint.keep_best  # `JobConfig` made sure it names one of the metrics, if any
        # Rank 0 decides for all: ranks comparing their own floats could disagree (and then wait forever).
        if best_metric and distributed.main_process_decides(metrics[best_metric] > self.best):
            self.best = metrics[best_metric]
            self.exporter.export(self.run_dir / "best", step, metrics)
            if self.accelerator.is_main_process:
                (self.run_dir / "best" / "best.json").write_text(
                    json.dumps({"step": step, "metric": best_metric, **metrics}))
        return metrics

    def _evaluate(self, step: int) -> dict[str, float]:
        """Evaluate on every rank (the encoding is sharded) and record `eval/*` at `step`."""
        metrics = evaluate_embedder(self.accelerator.unwrap_model(self.student), self.tokenizer,
                                    self.cfg.model.max_length, self.data, self.cfg.eval.batch_size,
                                    self.accelerator.device, autocast=self.accelerator.autocast,
                                    dims=sorted(self.cfg.loss.matryoshka_dims or (), reverse=True))
        self.record({"step": step, **{f"eval/{name}": value for name, value in metrics.items()}})
        if self.accelerator.is_main_process:
            console.print(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def compare(self, final: dict[str, float] | None) -> None:
        baseline_file = self.run_dir / BASELINE_FILE
        if final is None or not self.accelerator.is_main_process or not baseline_file.is_file():
            return
        base = json.loads(baseline_file.read_text())
        table = Table("metric", *(Column(column, justify="right") for column in ("before", "after", "delta")),
                      title=f"held-out retrieval: {self.cfg.model.name} before vs after GIST fine-tuning")
        for name, value in final.items():
            before = base.get(name, float("nan"))
            table.add_row(name, f"{before:.4f}", f"{value:.4f}", f"{value - before:+.4f}")
        console.print(table)
        console.print(f"plot this run: gist-scale report {self.run_dir}")


def load_held_out(cfg: JobConfig, accelerator: Accelerator) -> EvalData | None:
    """The held-out split: `eval.beir`, `eval.path`, or the shipped sample's own eval split when training on it.
    Loaded before any model, so that bad eval data fails early."""
    if cfg.eval.path is None and cfg.eval.beir is None and not cfg.data.is_sample:
        return None
    with accelerator.main_process_first():
        if cfg.eval.beir is not None:
            return load_beir(cfg.eval.beir, cfg.eval.beir_split, read_sts(cfg.eval.sts) if cfg.eval.sts else None)
        return load_eval_data(cfg.eval.path, cfg.data, cfg.eval.corpus, sts=cfg.eval.sts, split=cfg.eval.split)


def build_evaluator(cfg: JobConfig, data: EvalData | None, accelerator: Accelerator, student: torch.nn.Module,
                    tokenizer: PreTrainedTokenizerBase, record: Callable[[dict], None], exporter: Exporter,
                    run_dir: Path) -> Evaluator:
    return (NoEvaluation() if data is None else
            HeldOutEvaluator(cfg, accelerator, student, tokenizer, data, record, exporter, run_dir))
