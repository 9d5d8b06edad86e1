"""MTEB tasks run by the `mteb` package with our `Embedder` doing the encoding (`gist-scale eval MODEL --mteb ...`).

`EmbedderEncoder` is an mteb encoder (`mteb.models.AbsEncoder`: mteb hands it a DataLoader of texts, the task's
metadata and whether they are queries or documents; it returns the embeddings), so mteb reads the datasets, builds
the tasks and computes its metrics while the texts are tokenized and embedded exactly as in gist-scale's own
evaluation (`gist_scale.inference.encode_texts`). Prompts are the model's own (`prompts` in `config_sentence_transformers.json`, chosen
per task and query/document by mteb's rules, as mteb does for a sentence-transformers model); without any, texts go
in as they are.

mteb is an optional dependency (`pip install 'gist-scale[mteb]'`). Task datasets come from the HF Hub, or from the
HF cache when offline (`HF_HUB_OFFLINE=1`); a dataset that can be reached neither way is named in one line.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mteb
import numpy as np
import torch
from mteb import AbsTask
from mteb.models.abs_encoder import AbsEncoder, get_prompt
from mteb.models.model_meta import ModelMeta, ScoringFunction
from transformers import PreTrainedTokenizerBase

from gist_scale.data import DataError
from gist_scale.inference import encode_texts
from gist_scale.model import Embedder

__all__ = ["STARTER_TASKS", "EmbedderEncoder", "MtebError", "resolve_tasks", "run_mteb"]

STARTER_TASKS = ("NanoBEIR", "SciFact", "NFCorpus", "STSBenchmark")
"""Small standard tasks to start with: NanoBEIR (a benchmark of 13 small BEIR retrieval tasks), SciFact and
NFCorpus (small BEIR retrieval corpora), STSBenchmark (sentence similarity)."""


class MtebError(DataError):
    """An MTEB task cannot be named or loaded; the message says which and how to fix it (bad input: exit 2)."""


def resolve_tasks(names: Sequence[str]) -> list[AbsTask]:
    """mteb tasks for task or benchmark names (a benchmark, e.g. NanoBEIR, stands for its tasks), in order.

    An unknown name raises `MtebError` listing the closest task and benchmark names.
    """
    tasks: list[AbsTask] = []
    for name in names:
        with contextlib.suppress(KeyError):
            tasks.append(mteb.get_task(name))
            continue
        with contextlib.suppress(KeyError):
            tasks.extend(mteb.get_benchmark(name).tasks)
            continue
        known = [task.metadata.name for task in mteb.get_tasks(exclude_superseded=False)]
        known += [benchmark.name for benchmark in mteb.get_benchmarks()]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else f"start with one of {', '.join(STARTER_TASKS)}"
        raise MtebError(f"--mteb {name}: mteb {mteb.__version__} knows no such task or benchmark; {hint}")
    return tasks


class EmbedderEncoder(AbsEncoder):
    """Our `Embedder` as an mteb encoder: mteb's tasks and metrics, our tokenization, pooling and normalization."""

    def __init__(self, embedder: Embedder, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 device: torch.device | str, name: str, prompts: dict[str, str] | None = None,
                 batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.max_length = embedder, tokenizer, max_length
        self.device, self.batch_size = device, batch_size
        # mteb keys prompts by task name, task type or prompt type (query/document); sentence-transformers models
        # often say "passage" for documents.
        prompts = dict(prompts or {})
        if "passage" in prompts and "document" not in prompts:
            prompts["document"] = prompts.pop("passage")
        self.model_prompts = self.validate_task_to_prompt_name(prompts, raise_for_invalid_keys=False)[0]
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": name, "revision": "local", "similarity_fn_name": ScoringFunction.COSINE, "embed_dim": embedder.dim,
            "max_tokens": max_length, "framework": ["PyTorch"], "use_instructions": bool(self.model_prompts),
        })

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        prompt = get_prompt(self.model_prompts, task_metadata, prompt_type) or ""
        texts = [prompt + text for batch in inputs for text in batch["text"]]
        return encode_texts(self.model, self.tokenizer, texts, self.max_length,
                            kwargs.get("batch_size") or self.batch_size, self.device).cpu().numpy()


def _load(task: AbsTask) -> None:
    """Load a task's dataset, turning "not in the cache and no Hub" into one line naming the dataset."""
    try:
        task.load_data()
    except OSError as error:  # datasets' ConnectionError, huggingface_hub's offline and not-found errors
        dataset = task.metadata.dataset
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MtebError(f"--mteb {task.metadata.name}: could not reach its dataset {dataset['path']} (revision "
                        f"{dataset.get('revision')}): {reason}; it is not in the HF cache and the Hub is not "
                        "reachable: run once with network (or copy a populated HF_HOME) and retry") from None


def run_mteb(encoder: EmbedderEncoder, tasks: Sequence[AbsTask], out_dir: Path,
             batch_size: int) -> dict[str, dict[str, Any]]:
    """Run `tasks` one by one; mteb writes its result JSON under `out_dir/results/`; returns our summary.

    The summary maps each task to its main score's name and value (mteb's mean over splits and subsets), the value
    per split, and the path of mteb's result file.
    """
    cache = mteb.ResultCache(out_dir)
    summary: dict[str, dict[str, Any]] = {}
    for task in tasks:
        _load(task)
        try:
            result = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy="always", show_progress_bar=False,
                                   encode_kwargs={"batch_size": batch_size}).task_results[0]
        finally:
            task.unload_data()
        name = task.metadata.name
        summary[name] = {"main_score": task.metadata.main_score, "value": float(result.get_score()),
                         "splits": {split: float(result.get_score(splits=[split])) for split in result.scores},
                         "result_file": str(cache.get_task_result_path(name, encoder.mteb_model_meta))}
    return summary
