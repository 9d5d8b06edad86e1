"""The trainer: a loop (`Trainer`) over components with small interfaces, each swappable without touching the loop.

| component | interface | implementations |
|---|---|---|
| batches (`batches.py`) | `BatchSource` | `PreparedBatches`, `StreamedBatches` |
| the student (`student.py`) | `StudentPolicy` | `FullFineTuning`, `LoRAFineTuning` |
| the update (`optimizer.py`) | `OptimizerStep` | `FusedStep` (one process, DDP), `DeepSpeedStep` |
| evaluation (`evaluator.py`) | `Evaluator` | `HeldOutEvaluator`, `NoEvaluation` |
| export (`exporter.py`) | `Exporter` | `SentenceTransformersExporter` |

`step_metrics.py` keeps a step's metrics on the device until a log step and writes the records; `nonfinite.py`
counts skipped steps; `accelerator.py` builds the Accelerator and the DeepSpeed config. docs/development.md shows how
to add a batch source or a student policy.
"""

from gist_scale.trainer.loop import Trainer
from gist_scale.trainer.step_metrics import StepOutcome

__all__ = ["StepOutcome", "Trainer"]
