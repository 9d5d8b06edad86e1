"""Retrieval and STS evaluation of an embedder on held-out data: in the training loop and as `gist-scale eval`.

Retrieval: every query is scored against one corpus made of all eval positives and negatives (deduplicated), plus
optional extra corpus files. A query's own positive(s) are its relevant documents; its negatives, and everybody
else's positives, are not. Reported: nDCG@10 (binary relevance), MRR@10, Recall@1 and Recall@10 (the fraction of
a query's relevant documents found in the top k; with one relevant document per query this is the hit rate).
With scored sentence pairs, `spearman` is Spearman's rank correlation of cosine similarity with the gold scores.

Encoding is batched and distributed: each rank embeds a contiguous shard of the texts (length-sorted within the
shard to cut padding), every rank then receives all embeddings, and the metrics (a cheap matrix product and a
top-k) are computed identically on every rank, so any rank may log them. Every rank must call `evaluate_embedder`.

The `gist-scale eval` command loads sentence-transformers-format directories (or hub names) without
sentence-transformers, which stays a test-only dependency: `load_sentence_transformer_dir` reads the module list,
pooling and length settings and builds the same `Embedder` that training uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from gist_scale import distributed, encode
from gist_scale.config import ConfigError, DataConfig, ModelConfig, load_config
from gist_scale.data import FORMATS, DataError, load_triplets
from gist_scale.model import Embedder, load_student, load_tokenizer, resolve_model_path

__all__ = [
    "METRICS", "EvalData", "StsPairs", "load_eval_data", "encode_texts", "evaluate_embedder", "retrieval_metrics",
    "spearman", "load_sentence_transformer_dir", "main",
]

K = 10
"""Ranking depth of nDCG, MRR and the larger recall."""
METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")
"""Retrieval metrics, always reported; `spearman` is added when the eval data has STS pairs."""
QUERY_CHUNK = 1024
"""Queries scored at a time."""
CORPUS_CHUNK = 65536
"""Documents scored at a time: a block of QUERY_CHUNK x CORPUS_CHUNK fp32 scores is 256 MiB; the top 10 of each
block are merged into a running top 10, so memory does not grow with the corpus."""


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores (any scale: only their ranks matter)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def __post_init__(self) -> None:
        if not (len(self.sentence1) == len(self.sentence2) == len(self.scores)):
            raise ValueError("sentence1, sentence2 and scores must have the same length")


@dataclass
class EvalData:
    """Queries, a deduplicated corpus and the relevant corpus ids of every query; built once, reused every eval.

    `texts` holds every distinct text once (queries, corpus, STS sentences), which is what gets encoded: a text
    that is both a query and a document, or repeats across STS pairs, is embedded only once.
    """

    queries: list[str]
    """Distinct query texts."""
    corpus: list[str]
    """Distinct documents: eval positives and negatives, then texts from extra corpus files."""
    relevant: list[list[int]]
    """Per query, the sorted corpus ids of its positives (a query repeated across rows has several)."""
    sts: StsPairs | None = None
    """Scored pairs for the `spearman` metric, if any."""
    source: str = ""
    """Where the data came from, for printing."""
    texts: list[str] = field(init=False, repr=False)
    """Every distinct text to encode."""
    query_ids: list[int] = field(init=False, repr=False)
    """Index into `texts` of each query."""
    corpus_ids: list[int] = field(init=False, repr=False)
    """Index into `texts` of each document."""
    sts_ids: tuple[list[int], list[int]] = field(init=False, repr=False)
    """Indices into `texts` of each pair's two sentences."""

    def __post_init__(self) -> None:
        if not self.queries or not self.corpus:
            raise DataError(f"{self.source or 'eval data'}: no queries or no corpus to evaluate")
        if len(self.relevant) != len(self.queries):
            raise ValueError(f"{len(self.relevant)} relevance lists for {len(self.queries)} queries")
        for i, ids in enumerate(self.relevant):
            if not ids or min(ids) < 0 or max(ids) >= len(self.corpus):
                raise ValueError(f"query {i} has no relevant document, or an id outside the corpus: {ids}")
        index: dict[str, int] = {}

        def lookup(items: list[str]) -> list[int]:
            return [index.setdefault(text, len(index)) for text in items]

        self.query_ids = lookup(self.queries)
        self.corpus_ids = lookup(self.corpus)
        self.sts_ids = (lookup(self.sts.sentence1), lookup(self.sts.sentence2)) if self.sts else ([], [])
        self.texts = list(index)

    def describe(self) -> str:
        sts = f", {len(self.sts.scores)} STS pairs" if self.sts else ""
        return (f"{self.source}: {len(self.queries)} queries, {len(self.corpus)} corpus texts{sts}, "
                f"{len(self.texts)} distinct texts to encode")


def _read_table(path: str | Path, what: str) -> datasets.Dataset:
    """Read a local JSON/JSONL/Parquet/CSV file (any other suffix: plain text, one row per line) with `datasets`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{what} {file}: no such file")
    builder = FORMATS.get(file.suffix.lower(), "text")
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as error:  # the loaders raise many types (ArrowInvalid, JSON errors, UnicodeDecodeError...)
        raise DataError(f"{what} {file}: cannot read as {builder}: {error}") from error


def _read_corpus(path: str | Path) -> list[str]:
    """Texts of an extra corpus file: a `text` column (JSONL/JSON/Parquet/CSV) or plain lines; blanks skipped."""
    table = _read_table(path, "--corpus")
    if "text" not in table.column_names:
        raise DataError(f"--corpus {path}: no 'text' column (columns: {', '.join(table.column_names)}); "
                        "give JSON lines like {\"text\": ...} or a plain text file with one document per line")
    texts = [t.strip() for t in table["text"] if isinstance(t, str)]
    return [t for t in texts if t]


def _read_sts(path: str | Path) -> StsPairs:
    """Scored pairs from rows with `sentence1`, `sentence2` and a numeric `score`."""
    table = _read_table(path, "--sts")
    absent = [c for c in ("sentence1", "sentence2", "score") if c not in table.column_names]
    if absent:
        raise DataError(f"--sts {path}: missing column(s) {', '.join(absent)}; rows need sentence1, sentence2, "
                        "score")
    s1, s2, scores = table["sentence1"], table["sentence2"], table["score"]
    for row, (a, b, score) in enumerate(zip(s1, s2, scores), start=1):
        if not (isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip()):
            raise DataError(f"--sts {path}:{row}: sentence1 and sentence2 must be non-empty texts")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"--sts {path}:{row}: score must be a finite number, got {score!r}")
    if len(scores) < 2:
        raise DataError(f"--sts {path}: a rank correlation needs at least 2 pairs")
    return StsPairs([a.strip() for a in s1], [b.strip() for b in s2], [float(s) for s in scores])


def load_eval_data(path: str | None, data_cfg: DataConfig | None = None, extra_corpus: Sequence[str] = (), *,
                   sts: str | None = None, split: str = "eval") -> EvalData:
    """Build the retrieval task from eval triplets (`path=None`: the shipped WordNet sample's held-out split).

    Rows are read with `load_triplets`, so the eval file is validated like training data and, given the training
    `data_cfg`, uses its column mapping and instruction settings (its `max_rows` is ignored: all rows are
    evaluated). The shipped sample is always read with the default mapping, which is its schema. `split` picks the
    files of a folder or a hub dataset's split; a single file needs none. `extra_corpus` files (a `text` column or
    plain lines) add distractor documents; `sts` is a file of `sentence1`, `sentence2`, `score` rows.

    On several ranks, call this on the main process first (the others then read the `datasets` cache).
    """
    if path is None:
        cfg, split = DataConfig(), "eval"
    elif data_cfg is None:
        cfg = DataConfig(path=path, split=split)
    else:
        # The training data's revision pins the training dataset, not necessarily this one.
        cfg = replace(data_cfg, path=path, split=split, max_rows=None,
                      revision=data_cfg.revision if path == data_cfg.path else None)
    ds, report = load_triplets(cfg, split=split)

    queries: dict[str, int] = {}
    corpus: dict[str, int] = {}
    relevant: list[set[int]] = []
    for batch in ds.iter(batch_size=4096):
        for query, pos, negs in zip(batch["query"], batch["pos"], batch["negs"]):
            q = queries.setdefault(query, len(queries))
            if q == len(relevant):
                relevant.append(set())
            # The same query text in several rows is one query with several relevant documents: scoring it twice
            # would count its other positive as a miss.
            relevant[q].add(corpus.setdefault(pos, len(corpus)))
            for neg in negs:
                corpus.setdefault(neg, len(corpus))
    for file in extra_corpus:
        for text in _read_corpus(file):
            corpus.setdefault(text, len(corpus))
    extra = f" + {len(extra_corpus)} extra corpus file(s)" if extra_corpus else ""
    return EvalData(list(queries), list(corpus), [sorted(ids) for ids in relevant],
                    _read_sts(sts) if sts else None, source=report.source + extra)


# --------------------------------------------------------------------------------------------- encoding


def _is_zero3(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the parameters (it tags each one with a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def encode_texts(embedder: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                 batch_size: int, device: torch.device | str,
                 autocast: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """Embed `texts` across all ranks; every rank returns all `len(texts)` embeddings, fp32, in input order.

    Each rank tokenizes and embeds its contiguous shard in batches of `batch_size`, longest texts first (batches of
    similar lengths waste little padding, and the peak memory shows up in the first batch), then the shards are
    all-gathered. Every rank must call this with the same texts.

    Under DeepSpeed ZeRO-3 every forward all-gathers the parameters of each layer from all ranks, so a rank that
    ran fewer forwards than its peers would leave them waiting in that collective forever. Shards differ by at
    most one text, which can mean one batch more on some ranks: the others then run a dummy batch (one real text,
    output discarded) so that every rank runs exactly the same number of forwards.

    Runs with the model in eval mode (no dropout) and restores each submodule's mode afterwards. Gradients are
    off: `torch.inference_mode`, except under ZeRO-3, where parameters gathered in inference mode become inference
    tensors that the next training step cannot use ("Inference tensors cannot be saved for backward"), so
    `torch.no_grad` is used. `autocast` (e.g. `accelerator.autocast`) wraps the forwards.
    """
    world, rank = distributed.world_size(), distributed.rank()
    counts = distributed.gather_sizes(len(texts))
    if len(set(counts)) != 1:
        # Every rank sees the same counts and raises together, before any forward.
        raise ValueError(f"ranks were given different numbers of texts to encode: {counts}; build the eval data "
                         "identically on every rank")
    if not texts:
        return torch.empty(0, 0, device=device)
    # Contiguous shards whose sizes differ by at most one, larger shards first.
    parts = np.array_split(np.arange(len(texts)), world)
    sizes = [len(part) for part in parts]
    shard = [texts[i] for i in parts[rank]]
    ids: list[list[int]] = (tokenizer(shard, truncation=True, max_length=max_length, return_attention_mask=False,
                                      return_token_type_ids=False)["input_ids"] if shard else [])
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    num_batches = encode.num_chunks(max(sizes), batch_size)  # the same on every rank, without a collective
    dummy = tokenizer([texts[0]], truncation=True, max_length=max_length, return_attention_mask=False,
                      return_token_type_ids=False)["input_ids"]

    modes = {module: module.training for module in embedder.modules()}
    no_grad = torch.no_grad if _is_zero3(embedder) else torch.inference_mode
    positions: list[list[int]] = []
    outputs: list[torch.Tensor] = []
    embedder.eval()
    try:
        with no_grad(), (autocast or contextlib.nullcontext)():
            for b in range(num_batches):
                rows = batches[b] if b < len(batches) else None
                sequences = [ids[i] for i in rows] if rows is not None else dummy
                padded = tokenizer.pad({"input_ids": sequences}, padding="longest", return_attention_mask=True,
                                       return_tensors="pt")
                embeddings = embedder(padded["input_ids"].to(device), padded["attention_mask"].to(device))
                if rows is not None:
                    positions.append(rows)
                    outputs.append(embeddings.float())
                dim = embeddings.shape[-1]
    finally:
        for module, training in modes.items():
            module.train(training)
    # Outside inference mode: these ops turn inference tensors into normal ones that any later code may use.
    local = torch.empty(len(shard), dim, device=device)
    if outputs:
        local[torch.tensor([i for rows in positions for i in rows], device=device)] = torch.cat(outputs)
    return distributed.gather_no_grad(local, sizes)


# ---------------------------------------------------------------------------------------------- metrics


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
        top = _top_k(queries[start:end], corpus, depth)  # [chunk, depth] corpus ids, best first
        hits = (top[:, :, None] == table[start:end, None, :]).any(-1).double()
        n_rel = num_relevant[start:end]
        ndcg = (hits * discounts).sum(1) / ideal_dcg[n_rel.clamp(max=depth).long() - 1]
        first = hits.argmax(1)  # position of the first hit; only used where there is one
        mrr = torch.where(hits.any(1), 1.0 / (first + 1).double(), torch.zeros_like(n_rel))
        recall_1, recall_k = hits[:, :1].sum(1) / n_rel, hits.sum(1) / n_rel
        totals += torch.stack([ndcg.sum(), mrr.sum(), recall_1.sum(), recall_k.sum()])
    values = (totals / queries.shape[0]).tolist()
    return dict(zip(METRICS, values))


def _top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each query's k most similar documents, best first, scoring the corpus block by block."""
    best_scores = best_ids = None
    for start in range(0, corpus.shape[0], CORPUS_CHUNK):
        block = corpus[start:start + CORPUS_CHUNK]
        scores, ids = (queries @ block.T).topk(min(k, block.shape[0]), dim=1)
        ids = ids + start
        if best_scores is not None:
            scores, pick = torch.cat([best_scores, scores], 1).topk(k, dim=1)
            ids = torch.cat([best_ids, ids], 1).gather(1, pick)
        best_scores, best_ids = scores, ids
    return best_ids


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


def evaluate_embedder(embedder: Embedder, tokenizer: PreTrainedTokenizerBase, max_length: int, eval_data: EvalData,
                      batch_size: int, device: torch.device | str,
                      autocast: Callable[[], AbstractContextManager] | None = None) -> dict[str, float]:
    """Encode `eval_data` across all ranks and return its metrics (`METRICS`, plus `spearman` with STS pairs).

    Every rank must call it (see `encode_texts`) and every rank gets the same values. Pass the training
    tokenizer and `max_length`, so texts are embedded exactly as in training; the `Embedder` applies its own
    pooling and normalization.
    """
    embeddings = encode_texts(embedder, tokenizer, eval_data.texts, max_length, batch_size, device, autocast)
    metrics = retrieval_metrics(embeddings[eval_data.query_ids], embeddings[eval_data.corpus_ids],
                                eval_data.relevant)
    if eval_data.sts is not None:
        first, second = eval_data.sts_ids
        cosine = F.cosine_similarity(embeddings[first], embeddings[second], dim=-1)
        metrics["spearman"] = spearman(cosine, eval_data.sts.scores)
    return metrics


# ---------------------------------------------------------------------------------- model directories


_POOLINGS = {"cls": "cls", "mean": "mean", "lasttoken": "last_token"}
"""sentence-transformers pooling mode -> our pooling."""
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
"""The boolean keys of older `1_Pooling/config.json` files (newer ones write `"pooling_mode": "mean"`)."""


def _local_dir(name_or_path: str) -> Path:
    """A local directory for a path, the offline MiniLM copy, or a hub name (downloaded or read from the cache)."""
    resolved = resolve_model_path(name_or_path)
    path = Path(resolved).expanduser()
    if path.is_dir():
        return path
    if resolved.startswith((".", "/", "~")) or path.exists():
        raise FileNotFoundError(f"{name_or_path}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved))
    except Exception as error:  # offline, unknown repository, authentication: all end the same way
        raise FileNotFoundError(f"{name_or_path}: not a local directory and not loadable from the hub "
                                f"({type(error).__name__}: {error})") from error


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _pooling_mode(config: dict[str, Any], where: Path) -> str:
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _POOLINGS:
        raise ValueError(f"{where}: pooling {modes} is not supported; gist-scale pools with one of "
                         f"{', '.join(_POOLINGS)}")
    return _POOLINGS[modes[0]]


def _lowercase_inputs(tokenizer: PreTrainedTokenizerBase, where: Path) -> None:
    """Make a fast tokenizer lowercase its input, as sentence-transformers does for `do_lower_case: true`."""
    from tokenizers import normalizers

    if not tokenizer.is_fast:
        raise ValueError(f"{where}: do_lower_case needs a fast tokenizer")
    current = tokenizer.backend_tokenizer.normalizer
    steps = [normalizers.Lowercase()] + ([current] if current is not None else [])
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(steps)


def load_sentence_transformer_dir(name_or_path: str,
                                  max_length: int | None = None) -> tuple[Embedder, PreTrainedTokenizerBase, int]:
    """Load a sentence-transformers model (a directory, or a hub name) as our `Embedder`, its tokenizer and length.

    Reads `modules.json` (Transformer, Pooling, optional Normalize; any other module, such as Dense, cannot be
    expressed by an `Embedder` and is refused), the pooling mode from the Pooling module's `config.json`, and the
    maximum sequence length from `sentence_bert_config.json`, else the tokenizer's `model_max_length` capped at
    the model's position embeddings, as sentence-transformers does. A plain `transformers` directory without
    `modules.json` gets sentence-transformers' fallback: mean pooling, no normalization. `max_length` overrides.
    """
    root = _local_dir(name_or_path)
    modules = _read_json(root / "modules.json")
    transformer_dir, pooling, normalize = root, "mean", False
    if modules is None:
        warnings.warn(f"{root}: no modules.json, so not a sentence-transformers model; using mean pooling without "
                      "normalization", stacklevel=2)
    else:
        ordered = sorted(modules, key=lambda m: m["idx"])
        kinds = [(m["type"].rsplit(".", 1)[-1], root / m.get("path", "")) for m in ordered]
        names = [kind for kind, _ in kinds]
        if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
            raise ValueError(f"{root}: modules {names} are not supported; gist-scale evaluates Transformer, Pooling "
                             "and an optional Normalize")
        transformer_dir = kinds[0][1]
        pooling = _pooling_mode(_read_json(kinds[1][1] / "config.json") or {}, kinds[1][1] / "config.json")
        normalize = len(kinds) == 3
    st_config = _read_json(transformer_dir / "sentence_bert_config.json") or {}
    prompts = _read_json(root / "config_sentence_transformers.json") or {}
    if prompts.get("default_prompt_name"):
        warnings.warn(f"{root}: its default prompt {prompts['default_prompt_name']!r} is not prepended here",
                      stacklevel=2)

    tokenizer = load_tokenizer(str(transformer_dir))
    if st_config.get("do_lower_case"):
        _lowercase_inputs(tokenizer, transformer_dir)
    if max_length is None:
        max_length = st_config.get("max_seq_length")
    if max_length is None:
        max_length = int(tokenizer.model_max_length)
        positions = (_read_json(transformer_dir / "config.json") or {}).get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            max_length = min(max_length, positions)
    cfg = ModelConfig(name=str(transformer_dir), pooling=pooling, normalize=normalize, max_length=int(max_length))
    return load_student(cfg), tokenizer, cfg.max_length


# ------------------------------------------------------------------------------------------------ CLI


def _evaluate_model(name: str, data: EvalData, batch_size: int, max_length: int | None,
                    device: torch.device) -> tuple[dict[str, float], float]:
    embedder, tokenizer, length = load_sentence_transformer_dir(name, max_length)
    embedder.to(device)
    start = time.perf_counter()
    metrics = evaluate_embedder(embedder, tokenizer, length, data, batch_size, device)
    return metrics, time.perf_counter() - start


def _table(model: str, metrics: dict[str, float], baseline: str | None, base: dict[str, float] | None):
    from rich.table import Table

    # Names go in the caption, where they may wrap, rather than in headers, where long ones would be cut.
    caption = f"model: {model}" + (f"\nbaseline: {baseline}" if base is not None else "")
    table = Table(title="retrieval" + (" and STS" if "spearman" in metrics else ""), caption=caption)
    table.add_column("metric")
    table.add_column("model", justify="right")
    if base is not None:
        table.add_column("baseline", justify="right")
        table.add_column("delta (model - baseline)", justify="right")
    for key, value in metrics.items():
        cells = [key, f"{value:.4f}"]
        if base is not None:
            delta = value - base[key]
            color = "green" if delta > 0 else "red" if delta < 0 else "white"
            cells += [f"{base[key]:.4f}", f"[{color}]{delta:+.4f}[/{color}]"]
        table.add_row(*cells)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gist-scale eval",
        description="Retrieval (nDCG@10, MRR@10, Recall@1/@10) and optional STS evaluation of a "
                    "sentence-transformers-format model on eval triplets. Under torchrun every rank encodes a shard.")
    parser.add_argument("model", help="sentence-transformers directory (e.g. RUN/final) or hub name")
    parser.add_argument("--data", help="eval triplets: file, folder or hub dataset (default: the shipped WordNet "
                                        "sample's held-out eval split)")
    parser.add_argument("--split", default="eval", help="split of a --data folder or hub dataset (default: eval)")
    parser.add_argument("--config", help="training config (e.g. RUN/config.yaml) whose data column mapping and "
                                         "instruction options apply to --data")
    parser.add_argument("--corpus", action="append", default=[], metavar="FILE",
                        help="extra corpus texts (JSONL with 'text', or plain lines); repeatable")
    parser.add_argument("--sts", metavar="FILE", help="scored pairs (JSONL: sentence1, sentence2, score): adds "
                                                      "Spearman correlation")
    parser.add_argument("--baseline", metavar="MODEL", help="second model, shown side by side with deltas")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward (default: 64)")
    parser.add_argument("--max-length", type=int, help="token limit (default: each model's own max_seq_length)")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--out", metavar="FILE", help='write {"model": {...}, "baseline": {...} or null} as JSON')
    args = parser.parse_args(argv)

    from rich.console import Console

    # soft_wrap: paths and messages stay on one line (copyable) instead of being folded at the terminal width.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        console.print("[red]error:[/red] --batch-size and --max-length must be positive")
        return 2
    state = distributed.launch_state()
    device = torch.device(args.device) if args.device else state.device
    try:
        data_cfg = load_config([], args.config).data if args.config else None
        with state.main_process_first():  # the main process fills the datasets cache, the others read it
            data = load_eval_data(args.data, data_cfg, args.corpus, sts=args.sts, split=args.split)
        if state.is_main_process:
            console.print(data.describe())
        results: dict[str, dict[str, float] | None] = {"model": None, "baseline": None}
        for key, name in (("model", args.model), ("baseline", args.baseline)):
            if name is None:
                continue
            results[key], seconds = _evaluate_model(name, data, args.batch_size, args.max_length, device)
            if state.is_main_process:
                console.print(f"{key} {name}: encoded {len(data.texts)} texts in {seconds:.1f} s")
    except (ConfigError, DataError, OSError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    if state.is_main_process:
        Console(highlight=False).print(_table(args.model, results["model"], args.baseline, results["baseline"]))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            console.print(f"metrics written to {out}")
    if state.use_distributed:
        # Leave together: a rank that tears gloo down while a peer is still in a collective aborts it.
        state.wait_for_everyone()
        state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
