"""The trainer: a loop (`Trainer`, loop.py) over components with small interfaces (batch sources, student policies,
the optimizer step, evaluator, exporter), each swappable without touching the loop (docs/development.md, "The
trainer's components")."""

from gist_scale.trainer.loop import Trainer
from gist_scale.trainer.step_metrics import StepOutcome

__all__ = ["StepOutcome", "Trainer"]
