"""Retrieval and STS evaluation of an embedder on held-out data: in the training loop and as `gist-scale eval`.

Retrieval: every query is scored against one corpus made of all eval positives and negatives (deduplicated), plus
optional extra corpus files. A query's own positive(s) are its relevant documents; its negatives, and everybody
else's positives, are not. Reported: nDCG@10 (binary relevance), MRR@10, Recall@1 and Recall@10 (the fraction of
a query's relevant documents found in the top k; with one relevant document per query this is the hit rate).
With scored sentence pairs, `spearman` is Spearman's rank correlation of cosine similarity with the gold scores.

Encoding is batched and distributed: each rank embeds a contiguous shard of the texts (length-sorted within the
shard to cut padding), every rank then receives all embeddings, and the metrics (a cheap matrix product and a
top-k) are computed identically on every rank, so any rank may log them. Every rank must call `evaluate_embedder`.

The metrics themselves are in `gist_scale.metrics`; the `gist-scale eval` command reads sentence-transformers
directories with `gist_scale.st_format.load_sentence_transformer_dir`, which builds the same `Embedder` as training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from gist_scale import distributed
from gist_scale.chunking import num_chunks
from gist_scale.config import ConfigError, DataConfig, load_config
from gist_scale.data import FORMATS, DataError, load_triplets
from gist_scale.metrics import retrieval_metrics, spearman
from gist_scale.model import Embedder
from gist_scale.st_format import load_sentence_transformer_dir

__all__ = ["EvalData", "StsPairs", "encode_texts", "evaluate_embedder", "load_eval_data", "main"]


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
    num_batches = num_chunks(max(sizes), batch_size)  # the same on every rank, without a collective
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


def evaluate_embedder(embedder: Embedder, tokenizer: PreTrainedTokenizerBase, max_length: int, eval_data: EvalData,
                      batch_size: int, device: torch.device | str,
                      autocast: Callable[[], AbstractContextManager] | None = None,
                      dims: Sequence[int] = ()) -> dict[str, float]:
    """Encode `eval_data` across all ranks and return its metrics (`METRICS`, plus `spearman` with STS pairs).

    Every rank must call it (see `encode_texts`) and every rank gets the same values. Pass the training
    tokenizer and `max_length`, so texts are embedded exactly as in training; the `Embedder` applies its own
    pooling and normalization. `dims` (Matryoshka sizes) adds every metric at each size, as `ndcg@10@256`: the
    embeddings truncated to their first 256 features and re-normalized, as sentence-transformers' `truncate_dim`.
    """
    embeddings = encode_texts(embedder, tokenizer, eval_data.texts, max_length, batch_size, device, autocast)
    metrics = _embedding_metrics(embeddings, eval_data)
    for dim in dims:
        if dim > embeddings.shape[1]:
            raise ValueError(f"Matryoshka size {dim} is larger than the embedding dimension {embeddings.shape[1]}")
        truncated = F.normalize(embeddings[:, :dim], dim=-1)
        metrics.update({f"{name}@{dim}": value for name, value in _embedding_metrics(truncated, eval_data).items()})
    return metrics


def _embedding_metrics(embeddings: torch.Tensor, eval_data: EvalData) -> dict[str, float]:
    metrics = retrieval_metrics(embeddings[eval_data.query_ids], embeddings[eval_data.corpus_ids],
                                eval_data.relevant)
    if eval_data.sts is not None:
        first, second = eval_data.sts_ids
        cosine = F.cosine_similarity(embeddings[first], embeddings[second], dim=-1)
        metrics["spearman"] = spearman(cosine, eval_data.sts.scores)
    return metrics


# ---------------------------------------------------------------------------------- model directories


# ------------------------------------------------------------------------------------------------ CLI


def _evaluate_model(name: str, data: EvalData, batch_size: int, max_length: int | None,
                    device: torch.device, dims: Sequence[int] = ()) -> tuple[dict[str, float], float]:
    embedder, tokenizer, length = load_sentence_transformer_dir(name, max_length)
    embedder.to(device)
    start = time.perf_counter()
    metrics = evaluate_embedder(embedder, tokenizer, length, data, batch_size, device, dims=dims)
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


def _dims(text: str) -> list[int]:
    """`--dims 256,128,64`: positive sizes, largest first."""
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive embedding sizes separated by commas, e.g. 256,128")
    return sorted(set(dims), reverse=True)


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
    parser.add_argument("--dims", type=_dims, default=[],
                        metavar="D[,D...]", help="Matryoshka sizes: also report every metric on the embeddings "
                                                 "truncated to each (e.g. 256,128,64), as ndcg@10@256 ...")
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
            results[key], seconds = _evaluate_model(name, data, args.batch_size, args.max_length, device,
                                                    args.dims)
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
