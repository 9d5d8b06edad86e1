"""Retrieval metrics (nDCG@10, MRR@10, Recall@1/@10/@100, MAP@100) and Spearman's rank correlation, on embeddings.

Pure functions of tensors: no data loading, no model, no process group. Used by evaluation during training and by
`gist-scale eval` (triplet eval data and BEIR folders alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

__all__ = ["DEPTH", "METRICS", "K", "Relevance", "retrieval_metrics", "spearman", "top_k"]

K = 10
"""Ranking depth of nDCG, MRR and Recall@10."""

DEPTH = 100
"""Documents retrieved per query: the deepest cutoff (Recall@100, MAP@100)."""

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")
"""Retrieval metrics, always reported; `spearman` is added when the eval data has STS pairs."""

QUERY_CHUNK = 1024
"""Queries scored at a time."""

CORPUS_CHUNK = 65536
"""Documents scored at a time: a block of QUERY_CHUNK x CORPUS_CHUNK fp32 scores is 256 MiB; the top DEPTH of each
block are merged into a running top DEPTH, so memory does not grow with the corpus."""

Relevance = Sequence[int] | Mapping[int, float]
"""One query's judgments: relevant corpus ids (binary relevance), or corpus id -> grade (graded; grades <= 0 are
judged non-relevant)."""


def _relevance_table(relevant: Sequence[Relevance], num_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, its judged corpus ids sorted ascending (padded with `num_docs`, never a corpus id) and their gains."""
    rows = [sorted(r.items()) if isinstance(r, Mapping) else [(i, 1.0) for i in sorted(set(r))] for r in relevant]
    ids = pad_sequence([torch.tensor([doc for doc, _ in row]) for row in rows], batch_first=True, padding_value=num_docs)
    gains = [torch.tensor([max(float(gain), 0.0) for _, gain in row], dtype=torch.float64) for row in rows]
    return ids, pad_sequence(gains, batch_first=True)


def retrieval_metrics(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor,
                      relevant: Sequence[Relevance], exclude: Sequence[int] | None = None) -> dict[str, float]:
    """`METRICS` of exact cosine-similarity retrieval, averaged over queries, as BEIR/MTEB (pytrec_eval) define them.

    `relevant[i]` holds query i's judgments: a list of relevant corpus ids (binary) or a mapping corpus id -> grade.
    A query judged with no grade above 0 scores 0 on every metric and counts in the averages, as in trec_eval's
    per-query results that BEIR and MTEB average (sentence-transformers' evaluator skips such queries). nDCG@10
    has gain = grade (linear, as trec_eval) and the ideal ranking of the query's judged grades; MRR@10 is 1/rank of
    the first relevant document (0 if none in the top 10); Recall@k is the fraction of the query's relevant
    documents in its top k; MAP@100 sums the precision at the rank of each relevant document found in the top 100
    and divides by the number of relevant documents (trec_eval's map_cut; sentence-transformers divides by
    min(100, relevant), the same below 100 relevant documents). With fewer documents than a cutoff, the whole
    corpus is ranked. `exclude[i]` (-1: none) is a corpus id never retrieved for query i: the document with the
    query's own id, which BEIR and MTEB skip.
    """
    if len(relevant) != query_embeddings.shape[0]:
        raise ValueError(f"{len(relevant)} relevance lists for {query_embeddings.shape[0]} queries")
    if any(len(ids) == 0 for ids in relevant):
        raise ValueError("every query needs at least one judged document")
    device = query_embeddings.device
    queries = F.normalize(query_embeddings.float(), dim=-1)
    corpus = F.normalize(corpus_embeddings.float().to(device), dim=-1)
    depth = min(DEPTH, corpus.shape[0])
    ids, gains = (t.to(device) for t in _relevance_table(relevant, corpus.shape[0]))
    skip = torch.as_tensor(exclude if exclude is not None else [-1] * len(relevant), dtype=torch.long, device=device)
    # Clamped: a query without relevant documents has no hits either, so its recall and AP are 0 / 1.
    num_relevant = (gains > 0).sum(1).double().clamp(min=1)
    # The ideal ranking: the query's own grades, best first, cut at K.
    ideal_gains = gains.sort(1, descending=True).values[:, :K]
    discounts = 1.0 / torch.log2(torch.arange(2, depth + 2, device=device, dtype=torch.float64))
    ideal_dcg = (ideal_gains * discounts[: ideal_gains.shape[1]]).sum(1)
    ideal_dcg = torch.where(ideal_dcg > 0, ideal_dcg, torch.ones_like(ideal_dcg))  # no relevant documents: DCG 0 / 1
    ranks = torch.arange(1, depth + 1, device=device, dtype=torch.float64)
    totals = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        chunk = slice(start, start + QUERY_CHUNK)
        _, top = top_k(queries[chunk], corpus, depth, skip[chunk])  # [chunk, depth] ids, best first
        # The gain of each retrieved document: binary search in the query's sorted judged ids.
        where = torch.searchsorted(ids[chunk], top).clamp(max=ids.shape[1] - 1)
        judged = ids[chunk].gather(1, where) == top
        gain = gains[chunk].gather(1, where) * judged
        hits = (gain > 0).double()
        ndcg = (gain[:, :K] * discounts[:K]).sum(1) / ideal_dcg[chunk]
        mrr = (hits[:, :K] / ranks[:K]).amax(1)  # 1 / rank of the first hit in the top K, 0 without one
        found = hits.cumsum(1)
        average_precision = (hits * found / ranks).sum(1) / num_relevant[chunk]
        recall = [found[:, min(k, depth) - 1] / num_relevant[chunk] for k in (1, K, DEPTH)]
        totals += torch.stack([ndcg.sum(), mrr.sum(), *(r.sum() for r in recall), average_precision.sum()])
    return dict(zip(METRICS, (totals / queries.shape[0]).tolist()))


def top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
          corpus_block: int = CORPUS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and indices `[Q, min(k, C)]` of each query's most similar documents (dot product), best first.

    The corpus is scored `corpus_block` documents at a time and each block's top k merged into a running top k, so
    memory is `Q x corpus_block` scores whatever the corpus size. Hard-negative mining (`gist-scale mine`) uses it
    with deeper k. `exclude[i]` (-1: none) is a document that query i must not retrieve; it scores -inf, so it can
    only fill ranks beyond every other document.
    """
    k = min(k, corpus.shape[0])
    rows = torch.arange(queries.shape[0], device=queries.device)
    best_scores, best_ids = queries.new_empty(len(rows), 0), rows.new_empty(len(rows), 0)
    for start in range(0, corpus.shape[0], corpus_block):
        block = corpus[start:start + corpus_block]
        scores = queries @ block.T
        if exclude is not None:
            inside = (exclude >= start) & (exclude < start + block.shape[0])
            scores[rows[inside], exclude[inside] - start] = float("-inf")
        scores, ids = scores.topk(min(k, block.shape[0]), dim=1)
        merged = torch.cat([best_scores, scores], 1)
        best_scores, pick = merged.topk(min(k, merged.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, ids + start], 1).gather(1, pick)
    return best_scores, best_ids


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (so [5, 7, 7, 9] -> [1, 2.5, 2.5, 4])."""
    _, run_of, run_lengths = np.unique(values, return_inverse=True, return_counts=True)
    # A run of c equal values ending at rank e holds ranks e - c + 1 .. e; their mean is e - (c - 1) / 2.
    ends = np.cumsum(run_lengths)
    return (ends - (run_lengths - 1) / 2.0)[run_of]


def spearman(x: Sequence[float] | np.ndarray | torch.Tensor, y: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """Spearman's rank correlation with average ranks for ties: the Pearson correlation of the ranks.

    NaN when either side is constant (the correlation is undefined), as scipy reports it.
    """
    a, b = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (x, y))
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two 1-d sequences of the same length >= 2, got {a.shape} and {b.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant side: 0 / 0, NaN
        return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])
