"""Evaluation of an embedder: in the training loop and as `gist-scale eval`.

`data.py` builds the eval data (`EvalData`: eval triplets, extra corpus files, STS pairs), `beir.py` reads BEIR
folders into the same `EvalData`, `scoring.py` encodes it across all ranks (`gist_scale.inference`) and computes
the metrics (`gist_scale.metrics`), `mteb.py` runs MTEB tasks through the optional mteb package, and `cli.py` is the
`gist-scale eval` command. The names below are what the trainer uses.
"""

from gist_scale.evaluation.beir import load_beir
from gist_scale.evaluation.data import EvalData, load_eval_data, read_sts
from gist_scale.evaluation.scoring import evaluate_embedder

__all__ = ["EvalData", "evaluate_embedder", "load_beir", "load_eval_data", "read_sts"]
