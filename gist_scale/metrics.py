"""Retrieval metrics (nDCG@10, MRR@10, Recall@1/@10) and Spearman's rank correlation, on embeddings.

Pure functions of tensors: no data loading, no model, no process group. Used by evaluation during training and by
`gist-scale eval`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["K", "METRICS", "retrieval_metrics", "spearman", "top_k"]

K = 10
"""Ranking depth of nDCG, MRR and the larger recall."""

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")
"""Retrieval metrics, always reported; `spearman` is added when the eval data has STS pairs."""

QUERY_CHUNK = 1024
"""Queries scored at a time."""

CORPUS_CHUNK = 65536
"""Documents scored at a time: a block of QUERY_CHUNK x CORPUS_CHUNK fp32 scores is 256 MiB; the top 10 of each
block are merged into a running top 10, so memory does not grow with the corpus."""


def retrieval_metrics(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor,
                      relevant: Sequence[Sequence[int]]) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@1 and Recall@10 of cosine-similarity retrieval, averaged over queries.

    `relevant[i]` lists the corpus ids relevant to query i (at least one). nDCG uses binary relevance and the ideal
    ranking of `min(len(relevant[i]), 10)` hits; MRR@10 is 1/rank of the first hit (0 if none in the top 10);
    Recall@k is the fraction of a query's relevant documents in its top k.
    """
    if len(relevant) != query_embeddings.shape[0]:
        raise ValueError(f"{len(relevant)} relevance lists for {query_embeddings.shape[0]} queries")
    if any(len(ids) == 0 for ids in relevant):
        raise ValueError("every query needs at least one relevant document")
    device = query_embeddings.device
    queries = F.normalize(query_embeddings.float(), dim=-1)
    corpus = F.normalize(corpus_embeddings.float().to(device), dim=-1)
    depth = min(K, corpus.shape[0])
    # Relevant ids padded with -1 (never a corpus id) so that hits are one vectorized comparison.
    width = max(len(ids) for ids in relevant)
    table = torch.full((len(relevant), width), -1, dtype=torch.long)
    for i, ids in enumerate(relevant):
        table[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    table = table.to(device)
    num_relevant = (table >= 0).sum(1).double()
    discounts = 1.0 / torch.log2(torch.arange(2, depth + 2, device=device, dtype=torch.float64))
    ideal_dcg = discounts.cumsum(0)
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        end = start + QUERY_CHUNK
        _, top = top_k(queries[start:end], corpus, depth)  # [chunk, depth] corpus ids, best first
        hits = (top[:, :, None] == table[start:end, None, :]).any(-1).double()
        n_rel = num_relevant[start:end]
        ndcg = (hits * discounts).sum(1) / ideal_dcg[n_rel.clamp(max=depth).long() - 1]
        first = hits.argmax(1)  # position of the first hit; only used where there is one
        mrr = torch.where(hits.any(1), 1.0 / (first + 1).double(), torch.zeros_like(n_rel))
        recall_1, recall_k = hits[:, :1].sum(1) / n_rel, hits.sum(1) / n_rel
        totals += torch.stack([ndcg.sum(), mrr.sum(), recall_1.sum(), recall_k.sum()])
    values = (totals / queries.shape[0]).tolist()
    return dict(zip(METRICS, values))

def top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int,
          corpus_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and indices `[Q, min(k, C)]` of each query's most similar documents (dot product), best first.

    The corpus is scored `corpus_block` (default `CORPUS_CHUNK`) documents at a time and each block's top k merged
    into a running top k, so memory is `Q x corpus_block` scores whatever the corpus size. Hard-negative mining
    (`gist-scale mine`) uses it with deeper k.
    """
    k = min(k, corpus.shape[0])
    corpus_block = corpus_block or CORPUS_CHUNK
    best_scores = best_ids = None
    for start in range(0, corpus.shape[0], corpus_block):
        block = corpus[start:start + corpus_block]
        scores, ids = (queries @ block.T).topk(min(k, block.shape[0]), dim=1)
        ids = ids + start
        if best_scores is not None:
            scores, pick = torch.cat([best_scores, scores], 1).topk(min(k, best_scores.shape[1] + scores.shape[1]),
                                                                     dim=1)
            ids = torch.cat([best_ids, ids], 1).gather(1, pick)
        best_scores, best_ids = scores, ids
    return best_scores, best_ids

def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (so [5, 7, 7, 9] -> [1, 2.5, 2.5, 4])."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index (in sorted order) of each run of equal values, plus n as a sentinel end.
    new_run = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    starts = np.r_[np.flatnonzero(new_run), len(values)]
    run_of = np.cumsum(new_run) - 1  # run index of each sorted position
    # A run spanning sorted positions [s, e) holds ranks s+1 .. e; their mean is (s + 1 + e) / 2.
    mean_rank = (starts[:-1] + 1 + starts[1:]) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks

def spearman(x: Sequence[float] | np.ndarray | torch.Tensor, y: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """Spearman's rank correlation with average ranks for ties: the Pearson correlation of the ranks.

    NaN when either side is constant (the correlation is undefined), as scipy reports it.
    """
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    b = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two 1-d sequences of the same length >= 2, got {a.shape} and {b.shape}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
