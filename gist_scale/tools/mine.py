"""`gist-scale mine`: hard negatives for (query, positive) pairs, picked by the guide with GIST's own rule.

    gist-scale mine --data.path pairs.jsonl [--corpus FILE ...] --guide.name MODEL --num-negatives K \\
        --range-min 10 --range-max 100 --margin 0.05 --margin-strategy relative --out triplets.jsonl

1. Rows are read with `load_triplets` (any `--data.*` source and column mapping; negative columns, if any, are
   ignored: the rows are read as pairs). Queries are deduplicated: a query text on several rows is one query whose
   positives are all of those rows' positives. The corpus is every distinct positive plus the texts of `--corpus`
   files (a `text` column or plain lines).
2. The guide embeds every distinct text once, sharded across the ranks of a `torchrun`/`accelerate launch` job
   (`gist_scale.inference.encode_texts`). With `--guide.cache DIR` (built by `gist-scale cache-guide` with the same
   `--data.*` options and `--data.neg_columns '[]'`) the queries and positives come from the cache and only the
   extra corpus is embedded.
3. Each rank searches its share of the queries against the whole corpus: exact top-k by blocked matrix products on
   the device (`gist_scale.metrics.top_k`, never the full similarity matrix), or a faiss `IndexFlatIP` with
   `--index faiss` (also exact; faiss's BLAS and GPU kernels for corpora of tens of millions).
4. Filtering and sampling, per query, sentence-transformers' `mine_hard_negatives` semantics: the guide retrieves
   the top `range_max + P + 1` corpus texts (P: the most positives any query has, and 1 for the query's own text,
   so that neither can push candidates out). Dropped by identity: the query's own positives (same text) and the
   query's own text where it is also a corpus text (as sentence-transformers 6.3 does); then every candidate the
   guide scores strictly
   above the positive minus the margin, exactly the rule by which `GISTLoss` masks false negatives
   (`gist_scale.loss.margin_threshold`; with several positives the lowest positive score sets the threshold, so the
   rule holds for every row). **Ranks are counted after this filtering**: rank 0 is the best surviving candidate.
   K negatives are taken from ranks `[range_min, range_max)`: the K best (`--sampling top`) or K drawn uniformly
   without replacement (`--sampling random`, seeded per block of queries, so the draw does not depend on the
   number of ranks). A query with fewer than K allowed candidates gets none, and its rows are left out (counted).
5. Before writing, the main process prints the drop table: for a grid of margins around `--margin` (`margin_grid`,
   the chosen one marked), the share of the searched candidates the rule drops and the rows it would leave without
   negatives. It is counted on the candidates the search returned anyway (a few comparisons per candidate, no
   second search), so the chosen margin's row is exactly what this run does.
6. The main process writes one JSON line per input row, in input order, in the MEDI schema that `gist-scale train`
   reads by default: `query`, `pos`, `neg` (a list of K texts, best first), `task_name`, plus the guide's scores
   `pos_score` (of this row's pair) and `neg_scores`. The file is written to a temporary name and renamed, so an
   interrupted run leaves no partial `--out`; an existing `--out` is kept unless `--overwrite`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from rich.table import Table
from torch.nn.utils.rnn import pad_sequence

from gist_scale import distributed
from gist_scale.config import MARGIN_STRATEGIES, ConfigError, LossConfig
from gist_scale.data import DataError, load_triplets
from gist_scale.evaluation.data import retrieval_task
from gist_scale.guide_cache import open_guide_cache
from gist_scale.inference import encode_texts, shards
from gist_scale.loss import margin_threshold
from gist_scale.metrics import top_k
from gist_scale.model import load_guide, load_tokenizer
from gist_scale.options import job_parser, parse_job
from gist_scale.trainer.console import console

__all__ = ["MarginSweep", "MineConfig", "MineStats", "margin_grid", "mine_negatives", "main"]

SCORE_DIGITS = 6
"""Decimals of the scores written (the guide's fp32 cosines carry about 7)."""

MARGIN_LADDER = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""The margins the drop table is drawn from (`margin_grid`): the range in which GIST runs and miners set theirs
(GISTEmbed 0, NV-Retriever's TopK-PercPos a relative 0.05)."""


@dataclass(frozen=True)
class MineConfig:
    """How negatives are chosen; every field is a `gist-scale mine` option (`--num-negatives` for `num_negatives`)."""

    num_negatives: int = 3
    """K, the negatives written per row."""
    range_min: int = 0
    """Skip the best `range_min` surviving candidates (ranks are counted after dropping positives and margin
    violators): a guard against unlabelled positives the margin did not catch."""
    range_max: int = 100
    """Take negatives from surviving ranks below this; also how deep the guide searches (`range_max + P + 1`)."""
    margin: float = LossConfig.margin
    """Drop candidates the guide scores strictly above `g(q,p) - margin` (absolute) or `g(q,p) - |g(q,p)| * margin`
    (relative): GISTLoss's false-negative rule, with the same defaults."""
    margin_strategy: str = LossConfig.margin_strategy
    """`absolute` or `relative`, as `loss.margin_strategy`."""
    sampling: Literal["random", "top"] = "random"
    """`random`: K drawn uniformly from the allowed ranks (seeded); `top`: the K best allowed ones."""
    seed: int = 0
    """Seed of the random draw."""
    index: Literal["torch", "faiss"] = "torch"
    """`torch`: blocked matrix products on this rank's device; `faiss`: an exact faiss IndexFlatIP (needs faiss)."""
    batch_size: int = 128
    """Texts per guide forward."""
    query_block: int = 1024
    """Queries searched at a time (and the unit of the random draw's seeding): with the corpus scored in blocks of
    `metrics.CORPUS_CHUNK`, the largest score matrix is 1024 x 65536 fp32 (256 MiB)."""

    def __post_init__(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        check(self.num_negatives >= 1, f"--num-negatives {self.num_negatives}: must be at least 1")
        check(self.range_min >= 0, f"--range-min {self.range_min}: must be >= 0")
        check(self.range_max > self.range_min,
              f"--range-max {self.range_max}: must be larger than --range-min {self.range_min}")
        check(self.num_negatives <= self.range_max - self.range_min,
              f"--num-negatives {self.num_negatives} is more than the {self.range_max - self.range_min} ranks allowed "
              f"by --range-min {self.range_min} --range-max {self.range_max}: lower --num-negatives or widen the range")
        check(math.isfinite(self.margin), f"--margin {self.margin}: must be a finite number")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be positive")
        check(self.query_block > 0, f"--query-block {self.query_block}: must be positive")
        # The command line checks these choices too; a MineConfig built in Python must not fall back silently.
        check(self.margin_strategy in MARGIN_STRATEGIES,
              f"--margin-strategy {self.margin_strategy!r}: use one of {', '.join(MARGIN_STRATEGIES)}")
        check(self.sampling in ("random", "top"), f"--sampling {self.sampling!r}: use random or top")
        check(self.index in ("torch", "faiss"), f"--index {self.index!r}: use torch or faiss")


# ---------------------------------------------------------------------------------------------- search


Search = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""(queries [B, D], depth) -> (scores, corpus ids) [B, <= depth], best first."""


def _faiss_search(corpus: torch.Tensor, depth: int) -> Search:
    try:
        import faiss
    except ImportError as error:
        raise ConfigError("--index faiss needs faiss: pip install 'gist-scale[faiss]' (faiss-cpu), or faiss-gpu; "
                          "or use --index torch") from error
    index = faiss.IndexFlatIP(corpus.shape[1])
    if corpus.device.type == "cuda" and faiss.get_num_gpus() > 0:
        if depth > 2048:
            raise ConfigError(f"faiss on GPU returns at most 2048 neighbours, this search needs {depth} (--range-max "
                              "plus the most positives of a query, plus 1): lower --range-max or use --index torch")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), corpus.device.index or 0, index)
    index.add(corpus.float().cpu().numpy())

    def search(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = index.search(queries.float().cpu().numpy(), k)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(ids).to(queries.device)

    return search


# ----------------------------------------------------------------------------------------------- mining


def query_blocks(num_queries: int, block: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """This rank's query blocks (contiguous) and every rank's number of queries, without a collective."""
    blocks = shards(math.ceil(num_queries / block), world)
    sizes = [sum(min(block, num_queries - b * block) for b in part) for part in blocks]
    return list(blocks[rank]), sizes


def search_depth(range_max: int, positives: Sequence[Sequence[int]], corpus_size: int) -> int:
    """How many corpus texts the guide retrieves per query: `range_max` survivors can still be found after dropping
    up to P positives and the query's own text."""
    return min(range_max + max(len(p) for p in positives) + 1, corpus_size)


def margin_grid(chosen: float, each_side: int = 3) -> tuple[float, ...]:
    """The drop table's margins: the chosen one and up to `each_side` neighbours below and above it from
    `MARGIN_LADDER`, increasing."""
    below = [m for m in MARGIN_LADDER if m < chosen][-each_side:]
    above = [m for m in MARGIN_LADDER if m > chosen][:each_side]
    return (*below, chosen, *above)


def _margin_rule(scores: torch.Tensor, candidates: torch.Tensor, threshold: torch.Tensor,
                 cfg: MineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Along the last dimension (the searched candidates, best first): the candidates the margin rule drops (scored
    strictly above `threshold`), and the allowed ones, ranks `[range_min, range_max)` among those left."""
    above = (scores > threshold) & candidates
    keep = candidates & ~above
    rank = keep.cumsum(-1) - 1  # ranks after filtering
    return above, keep & (rank >= cfg.range_min) & (rank < cfg.range_max)


@dataclass
class MarginSweep:
    """What the margin rule would do at each of `margins`, counted by `mine_negatives` on the candidates it searched
    (the same candidates, positives and ranks; only the threshold changes). The counts stay on the device until the
    caller reduces them over the ranks."""

    margins: tuple[float, ...]
    _dropped: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _short: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def count(self, scores: torch.Tensor, candidates: torch.Tensor, positive_score: torch.Tensor,
              cfg: MineConfig) -> None:
        """One block: `scores` `[B, depth]` best first, `candidates` the searched ones that are neither padding nor
        excluded by identity, `positive_score` `[B, 1]` the score that sets each query's threshold."""
        thresholds = torch.stack([margin_threshold(positive_score, cfg.margin_strategy, m) for m in self.margins])
        above, allowed = _margin_rule(scores[None], candidates[None], thresholds, cfg)  # [G, B, depth]
        self._dropped.append(above.sum((1, 2)))
        self._short.append((allowed.sum(2) < cfg.num_negatives).T)

    def dropped(self, device: torch.device) -> torch.Tensor:
        """`[G]` int64: searched candidates each margin drops (zeros on a rank that mined no block)."""
        return sum(self._dropped, torch.zeros(len(self.margins), dtype=torch.int64, device=device))

    def short(self, device: torch.device) -> torch.Tensor:
        """`[n, G]` uint8, for the n queries mined in order: 1 where a margin leaves the query fewer than K allowed
        candidates (so no negatives)."""
        return torch.cat([torch.zeros(0, len(self.margins), dtype=torch.bool, device=device), *self._short]).byte()


def mine_negatives(queries: torch.Tensor, corpus: torch.Tensor, positives: Sequence[Sequence[int]], cfg: MineConfig,
                   blocks: Sequence[int] | None = None, search: Search | None = None, own: Sequence[int] | None = None,
                   sweep: MarginSweep | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mine K negatives for the queries of `blocks` (blocks of `cfg.query_block` queries; default: all).

    `queries` `[Q, D]` and `corpus` `[C, D]` are the guide's L2-normalized embeddings, `positives[i]` the corpus ids
    of query i's positives, `own[i]` the corpus id of query i's own text (-1 where it is not a corpus text; default:
    none is). Returns `(ids, scores, margin_dropped)`: `[n, K]` corpus ids best first (-1 throughout
    a row whose query has fewer than K allowed candidates) and their guide scores, for the n queries of `blocks` in
    order, and how many searched candidates the margin rule dropped. See the module docstring for the rule.
    `sweep`, when given, also counts what each of its margins would drop, on the same searched candidates.
    """
    k, device = cfg.num_negatives, queries.device
    # `[Q, P]` corpus ids of each query's positives, padded with -1 (never a corpus id).
    pos_table = pad_sequence([torch.tensor(ids) for ids in positives], batch_first=True, padding_value=-1).to(device)
    own_ids = torch.as_tensor([-1] * len(positives) if own is None else own, dtype=torch.int64, device=device)
    depth = search_depth(cfg.range_max, positives, corpus.shape[0])
    search = search or (lambda block_queries, depth: top_k(block_queries, corpus, depth))
    if blocks is None:
        blocks = range(math.ceil(queries.shape[0] / cfg.query_block))
    # Empty to begin with, so a rank given no block returns `[0, K]` results.
    out_ids = [torch.empty(0, k, dtype=torch.int64, device=device)]
    out_scores = [torch.empty(0, k, device=device)]
    dropped = torch.zeros((), dtype=torch.int64, device=device)
    for block in blocks:
        rows = slice(block * cfg.query_block, (block + 1) * cfg.query_block)
        q, pos = queries[rows], pos_table[rows]
        # The lowest positive score of each query sets its threshold, so no row of that query breaks the rule.
        pos_scores = torch.einsum("bd,bpd->bp", q, corpus[pos.clamp(min=0)]).masked_fill(pos < 0, math.inf)
        lowest_positive = pos_scores.min(1, keepdim=True).values
        threshold = margin_threshold(lowest_positive, cfg.margin_strategy, cfg.margin)
        scores, ids = search(q, depth)
        real = ids >= 0  # faiss pads a short result with -1
        # Excluded by identity, before the margin: the query's positives and the query's own text.
        excluded = (ids[:, :, None] == pos[:, None, :]).any(-1) | (ids == own_ids[rows, None])
        above, allowed = _margin_rule(scores, real & ~excluded, threshold, cfg)
        dropped += above.sum()
        if sweep is not None:
            sweep.count(scores, real & ~excluded, lowest_positive, cfg)
        if cfg.sampling == "top":
            keys = torch.arange(ids.shape[1], dtype=torch.float64, device=ids.device).expand(ids.shape)
        else:
            # Seeded by (seed, block): the same draw whichever rank holds the block.
            keys = torch.from_numpy(np.random.default_rng([cfg.seed, block]).random(ids.shape)).to(ids.device)
        keys = keys.masked_fill(~allowed, math.inf)
        # A search shallower than K (a corpus smaller than K) finds no query its K: the rest is padding.
        width = min(k, ids.shape[1])
        picked = keys.topk(width, dim=1, largest=False).indices.sort(1).values  # position order = score order
        found = allowed.sum(1, keepdim=True) >= k
        out_ids.append(F.pad(torch.where(found, ids.gather(1, picked), -1), (0, k - width), value=-1))
        out_scores.append(F.pad(torch.where(found, scores.gather(1, picked).float(), math.nan), (0, k - width),
                                value=math.nan))
    return torch.cat(out_ids), torch.cat(out_scores), dropped


# ---------------------------------------------------------------------------------------------- command


@dataclass
class MineStats:
    """What a mining run did, printed at the end and written by `--stats FILE`."""

    rows: int
    queries: int
    corpus: int
    ranks: int
    texts_embedded: int
    embed_seconds: float
    texts_per_s: float
    search_seconds: float
    queries_per_s: float
    searched_candidates: int
    margin_dropped: int
    queries_short: int
    rows_written: int
    mean_pos_score: float
    mean_neg_score: float
    drop_table: list[dict[str, float]]
    """The margin grid around the chosen margin (`margin_grid`), printed before anything is written; per margin,
    `margin`, `dropped` (the searched candidates the margin rule drops) and `rows_without_negatives` (the rows whose
    query it leaves fewer than K allowed candidates, so none are written)."""

    def lines(self) -> list[str]:
        return [
            f"mine: {self.rows} rows, {self.queries} distinct queries, corpus of {self.corpus} texts, "
            f"{self.ranks} rank(s)",
            f"  embedded {self.texts_embedded} texts in {self.embed_seconds:.1f} s ({self.texts_per_s:.1f} texts/s)",
            f"  searched {self.queries} queries in {self.search_seconds:.2f} s ({self.queries_per_s:.1f} queries/s); "
            f"the margin dropped {self.margin_dropped} of {self.searched_candidates} candidates "
            f"({self.margin_dropped / max(self.searched_candidates, 1):.1%})",
            f"  guide scores: positives {self.mean_pos_score:.4f}, negatives {self.mean_neg_score:.4f} (means)",
        ]


def drop_table_view(stats: MineStats, chosen: float, strategy: str) -> Table:
    """The drop table as printed: per margin, the share of searched candidates dropped and the rows left without
    negatives; the chosen margin marked."""
    table = Table(title=f"margin rule ({strategy}) on the {stats.searched_candidates:,} searched candidates",
                  title_justify="left")
    for column in ("margin", "dropped as false negatives", "rows without negatives"):
        table.add_column(column, justify="right")
    for row in stats.drop_table:
        mark = row["margin"] == chosen
        dropped, rows = row["dropped"], row["rows_without_negatives"]
        table.add_row(f"{'-> ' if mark else ''}{row['margin']:g}",
                      f"{dropped:,} ({dropped / max(stats.searched_candidates, 1):.1%})",
                      f"{rows:,} of {stats.rows:,} ({rows / max(stats.rows, 1):.1%})", style="bold" if mark else None)
    return table


def _embed(job, task, rows_q: np.ndarray, rows_p: np.ndarray, dataset, batch_size: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Normalized fp32 guide embeddings of the distinct queries and the corpus, and how many texts were embedded."""

    def guide_embeddings(texts: list[str]) -> torch.Tensor:  # the guide is freed on return, before the search
        tokenizer = load_tokenizer(job.guide.name, job.guide.revision, job.guide.trust_remote_code,
                                   "--guide.trust_remote_code true")
        return encode_texts(load_guide(job.guide, device), tokenizer, texts, job.guide.max_length, batch_size, device)

    if job.guide.cache is None:
        embeddings = guide_embeddings(task.texts)
        return (F.normalize(embeddings[task.query_ids], dim=-1), F.normalize(embeddings[task.corpus_ids], dim=-1),
                len(task.texts))
    cache = open_guide_cache(job.guide, dataset, 0)
    # Row embeddings of each query's and each positive's first row; the positives are corpus ids 0..P-1.
    first_q = np.unique(rows_q, return_index=True)[1]
    first_p = np.unique(rows_p, return_index=True)[1]
    queries = cache.lookup(first_q.tolist())["query"].to(device).float()
    corpus = [cache.lookup(first_p.tolist())["pos"].to(device).float()]
    extra = task.corpus[len(first_p):]  # rows' other positives and the --corpus files' texts: not in the cache
    if extra:
        corpus.append(guide_embeddings(extra))
    return F.normalize(queries, dim=-1), F.normalize(torch.cat(corpus), dim=-1), len(extra)


def _write(out: Path, dataset, task, rows_q: np.ndarray, pos_scores: np.ndarray, neg_ids: np.ndarray,
           neg_scores: np.ndarray) -> None:
    """Write the rows whose query has K negatives to a temporary file next to `out`, then rename it over `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for row, (query, pos, task_name) in enumerate(zip(dataset["query"], dataset["pos"], dataset["task_name"])):
                q = rows_q[row]
                if neg_ids[q, 0] >= 0:
                    record = {"query": query, "pos": pos, "neg": [task.corpus[i] for i in neg_ids[q]],
                              "task_name": task_name, "pos_score": round(float(pos_scores[row]), SCORE_DIGITS),
                              "neg_scores": [round(float(s), SCORE_DIGITS) for s in neg_scores[q]]}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _row_pairs(dataset, task) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Each row's distinct-query id and its positive's corpus id, and each distinct query's own corpus id (-1 where
    its text is not a corpus text)."""
    query_id = {text: i for i, text in enumerate(task.queries)}
    corpus_id = {text: i for i, text in enumerate(task.corpus)}
    return (np.asarray([query_id[text] for text in dataset["query"]], dtype=np.int64),
            np.asarray([corpus_id[text] for text in dataset["pos"]], dtype=np.int64),
            [corpus_id.get(text, -1) for text in task.queries])


def run(job, mine: MineConfig, out: str | Path, corpus_files: Sequence[str] = (), overwrite: bool = False,
        stats_file: str | Path | None = None) -> MineStats:
    """Mine and write `out` (main process). Every rank of the job must call it; every rank returns the stats."""
    if job.guide.name is None:
        raise ConfigError("mine needs a guide: set --guide.name")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists: pass --overwrite to replace it, or choose another path")
    state = distributed.launch_state(job.train.collective_timeout_s)
    device = state.device
    with state.main_process_first():
        # Rows are read as pairs: existing negatives are not candidates.
        dataset, report = load_triplets(replace(job.data, neg_columns=[]))
        task = retrieval_task(dataset, corpus_files, report.source)
    rows_q, rows_p, own = _row_pairs(dataset, task)
    if state.is_main_process:
        console.print(f"{task.describe()}; guide {job.guide.name} on {state.num_processes} rank(s)")

    start = time.perf_counter()
    queries, corpus, embedded = _embed(job, task, rows_q, rows_p, dataset, mine.batch_size, device)
    embed_seconds = time.perf_counter() - start

    start = time.perf_counter()
    positives = task.relevant
    depth = search_depth(mine.range_max, positives, corpus.shape[0])
    search = _faiss_search(corpus, depth) if mine.index == "faiss" else None  # None: `metrics.top_k`
    blocks, sizes = query_blocks(len(positives), mine.query_block, state.num_processes, state.process_index)
    sweep = MarginSweep(margin_grid(mine.margin))
    ids, scores, _ = mine_negatives(queries, corpus, positives, mine, blocks, search, own, sweep)
    ids = distributed.gather_no_grad(ids, sizes).cpu().numpy()
    scores = distributed.gather_no_grad(scores, sizes).cpu().numpy()
    swept = distributed.all_reduce_sum(sweep.dropped(device)).tolist()  # the chosen margin's count is the run's
    short = distributed.gather_no_grad(sweep.short(device), sizes).cpu().numpy()  # [queries, margins]
    search_seconds = time.perf_counter() - start

    pos_scores = (queries[rows_q] * corpus[rows_p]).sum(-1).cpu().numpy()
    found = ids[:, 0] >= 0
    kept_rows = found[rows_q]
    stats = MineStats(
        rows=len(rows_q), queries=len(positives), corpus=corpus.shape[0], ranks=state.num_processes,
        texts_embedded=embedded, embed_seconds=embed_seconds, texts_per_s=embedded / max(embed_seconds, 1e-9),
        search_seconds=search_seconds, queries_per_s=len(positives) / max(search_seconds, 1e-9),
        searched_candidates=len(positives) * depth, margin_dropped=int(swept[sweep.margins.index(mine.margin)]),
        queries_short=int((~found).sum()), rows_written=int(kept_rows.sum()),
        mean_pos_score=float(pos_scores[kept_rows].mean()) if kept_rows.any() else math.nan,
        mean_neg_score=float(scores[found].mean()) if found.any() else math.nan,
        drop_table=[{"margin": margin, "dropped": int(count), "rows_without_negatives": int(short[rows_q, g].sum())}
                    for g, (margin, count) in enumerate(zip(sweep.margins, swept))])
    if state.is_main_process:
        console.print(drop_table_view(stats, mine.margin, mine.margin_strategy))
        _write(out, dataset, task, rows_q, pos_scores, ids, scores)
        console.print(*stats.lines(), sep="\n")
        if stats.queries_short:
            console.print(f"[yellow]{stats.queries_short} queries ({stats.rows - stats.rows_written} rows) had fewer "
                          f"than {mine.num_negatives} allowed candidates and were left out: raise --range-max, lower "
                          "--range-min or --margin, or add --corpus texts")
        console.print(f"wrote {stats.rows_written} rows to {out}")
        if stats_file is not None:
            record = {**asdict(stats), "device": str(device), "guide": job.guide.name, "settings": asdict(mine)}
            Path(stats_file).write_text(json.dumps(record, indent=2) + "\n")
    state.wait_for_everyone()
    return stats


def build_parser() -> ArgumentParser:
    """`gist-scale mine`: its own options, and the training config's (its data and guide sections count)."""
    parser = job_parser("gist-scale mine", __doc__.split("\n\n")[0] + " Rows come from --data.* options as for "
                        "training (negative columns are ignored); the guide from --guide.* (also --guide.cache). Under "
                        "torchrun / accelerate launch every rank embeds and searches a share. Ranks are counted after "
                        "dropping positives and margin violators, as in sentence-transformers' mine_hard_negatives.")

    def setting(name: str, help_: str, **kwargs) -> None:
        """The `MineConfig` field `name` as the option `--name-with-dashes`, with the field's default (the class
        attribute of that name)."""
        parser.add_argument(f"--{name.replace('_', '-')}", default=getattr(MineConfig, name),
                            help=f"{help_} (default %(default)s)", **kwargs)

    parser.add_argument("--out", required=True, help="JSONL file to write (MEDI schema plus guide scores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--corpus", action="append", default=[], metavar="FILE", help="extra candidate texts "
                        "(JSONL/JSON/Parquet/CSV with a 'text' column, or plain lines); repeatable")
    setting("num_negatives", "K negatives per row", type=int)
    setting("range_min", "skip this many best surviving candidates", type=int)
    setting("range_max", "take negatives from surviving ranks below this", type=int)
    setting("margin", "GIST margin: drop candidates scored above the positive minus it", type=float)
    setting("margin_strategy", "absolute: minus margin; relative: minus |g(q,p)| x margin", choices=MARGIN_STRATEGIES)
    setting("sampling", "K drawn uniformly from the allowed ranks, or the K best", choices=("random", "top"))
    setting("seed", "seed of the random draw", type=int)
    setting("index", "exact search by blocked matrix products, or a faiss IndexFlatIP", choices=("torch", "faiss"))
    setting("batch_size", "texts per guide forward", type=int)
    setting("query_block", "queries searched at a time, also the unit of the seeded draw", type=int)
    parser.add_argument("--stats", metavar="FILE", help="also write the run's counts and throughput as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        job, args = parse_job(build_parser(), argv)
        mine = MineConfig(**{field.name: getattr(args, field.name) for field in fields(MineConfig)})
        run(job, mine, args.out, args.corpus, args.overwrite, args.stats)
    except (ConfigError, DataError, OSError) as error:  # GuideCacheError is a ConfigError
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0
