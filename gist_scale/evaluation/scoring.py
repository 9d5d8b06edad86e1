"""Scoring an embedder on `EvalData`: encode every distinct text once across all ranks, then the metrics.

Reported (`gist_scale.metrics.METRICS`): nDCG@10, MRR@10, Recall@1/@10/@100 (the fraction of a query's relevant
documents found in the top k; with one relevant document per query this is the hit rate) and MAP@100. With scored
sentence pairs, `spearman` is Spearman's rank correlation of cosine similarity with the gold scores.

Encoding is sharded (`gist_scale.inference.encode_texts`): each rank embeds a contiguous shard of the texts and
every rank then receives all embeddings, so the metrics (a cheap matrix product and a top-k, `gist_scale.metrics`)
are computed identically on every rank and any rank may log them. Every rank must call `evaluate_embedder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from gist_scale.evaluation.data import EvalData
from gist_scale.inference import encode_texts
from gist_scale.metrics import retrieval_metrics, spearman
from gist_scale.model import Embedder

__all__ = ["evaluate_embedder"]


def evaluate_embedder(embedder: Embedder, tokenizer: PreTrainedTokenizerBase, max_length: int, eval_data: EvalData,
                      batch_size: int, device: torch.device | str,
                      autocast: Callable[[], AbstractContextManager] | None = None,
                      dims: Sequence[int] = ()) -> dict[str, float]:
    """Encode `eval_data` across all ranks and return its metrics (`METRICS`, plus `spearman` with STS pairs).

    Every rank must call it (see `encode_texts`) and every rank gets the same values. Pass the training
    tokenizer and `max_length`, so texts are embedded exactly as in training; the `Embedder` applies its own
    pooling and normalization, and its prompts: `query` before the queries, `document` before the corpus and the
    STS sentences (per-task instructions are not applied: the eval rows are not grouped by task). `dims`
    (Matryoshka sizes) adds every metric at each size, as `ndcg@10@256`: the embeddings truncated to their first
    256 features and re-normalized, as sentence-transformers' `truncate_dim`.
    """
    query_prompt, document_prompt = (embedder.prompts.get(name, "") for name in ("query", "document"))
    embeddings = encode_texts(embedder, tokenizer, eval_data.texts, max_length, batch_size, device, autocast,
                              prompt=document_prompt)
    queries = (embeddings[eval_data.query_ids] if query_prompt == document_prompt else
               encode_texts(embedder, tokenizer, eval_data.queries, max_length, batch_size, device, autocast,
                            prompt=query_prompt))
    metrics = _embedding_metrics(queries, embeddings, eval_data)
    for dim in dims:
        if dim > embeddings.shape[1]:
            raise ValueError(f"Matryoshka size {dim} is larger than the embedding dimension {embeddings.shape[1]}")
        truncated = _embedding_metrics(F.normalize(queries[:, :dim], dim=-1), F.normalize(embeddings[:, :dim], dim=-1),
                                       eval_data)
        metrics.update({f"{name}@{dim}": value for name, value in truncated.items()})
    return metrics


def _embedding_metrics(queries: torch.Tensor, embeddings: torch.Tensor, eval_data: EvalData) -> dict[str, float]:
    """Metrics of the query embeddings against `embeddings` (every distinct text, in `eval_data.texts` order)."""
    metrics = retrieval_metrics(queries, embeddings[eval_data.corpus_ids], eval_data.relevant, eval_data.exclude)
    if eval_data.sts is not None:
        first, second = eval_data.sts_ids
        cosine = F.cosine_similarity(embeddings[first], embeddings[second], dim=-1)
        metrics["spearman"] = spearman(cosine, eval_data.sts.scores)
    return metrics
