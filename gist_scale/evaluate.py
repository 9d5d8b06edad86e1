"""Retrieval and STS evaluation of an embedder on held-out data: in the training loop and as `gist-scale eval`.

Retrieval: every query is scored against one corpus made of all eval positives and negatives (deduplicated), plus
optional extra corpus files. A query's own positive(s) are its relevant documents; its negatives, and everybody
else's positives, are not. A BEIR folder (`gist_scale.beir`) gives its own queries, corpus and graded judgments
instead. Reported (`gist_scale.metrics.METRICS`): nDCG@10, MRR@10, Recall@1/@10/@100 (the fraction of a query's
relevant documents found in the top k; with one relevant document per query this is the hit rate) and MAP@100.
With scored sentence pairs, `spearman` is Spearman's rank correlation of cosine similarity with the gold scores.

Encoding is batched and distributed: each rank embeds a contiguous shard of the texts (length-sorted within the
shard to cut padding), every rank then receives all embeddings, and the metrics (a cheap matrix product and a
top-k) are computed identically on every rank, so any rank may log them. Every rank must call `evaluate_embedder`.

The metrics themselves are in `gist_scale.metrics`; the `gist-scale eval` command reads sentence-transformers
directories with `gist_scale.st_format.load_sentence_transformer_dir` and training checkpoints with
`gist_scale.checkpoint.load_checkpoint_embedder`, both of which build the same `Embedder` as training, and hands
`--mteb` tasks to the mteb package through `gist_scale.mteb_eval`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from gist_scale import distributed
from gist_scale.checkpoint import COMPLETE_MARKER, CheckpointError, load_checkpoint_embedder
from gist_scale.config import ConfigError, DataConfig
from gist_scale.data import FORMATS, DataError, load_triplets, read_local_file
from gist_scale.inference import encode_texts
from gist_scale.metrics import Relevance, retrieval_metrics, spearman
from gist_scale.model import Embedder
from gist_scale.options import load_config
from gist_scale.places import require_writable_file, text_file_problem
from gist_scale.st_format import load_sentence_transformer_dir, model_prompts

__all__ = ["EvalData", "StsPairs", "evaluate_embedder", "load_eval_data", "load_model", "main",
           "read_corpus", "read_sts", "retrieval_task"]


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
    relevant: list[Relevance]
    """Per query, the sorted corpus ids of its positives (a query repeated across rows has several), or, with
    graded judgments (BEIR), a mapping corpus id -> grade."""
    sts: StsPairs | None = None
    """Scored pairs for the `spearman` metric, if any."""
    source: str = ""
    """Where the data came from, for printing."""
    exclude: list[int] | None = None
    """Per query, a corpus id it must not retrieve (-1: none): BEIR's document with the query's own id."""
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
        if self.exclude is not None and len(self.exclude) != len(self.queries):
            raise ValueError(f"{len(self.exclude)} excluded ids for {len(self.queries)} queries")
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


def _read_table(path: str | Path, what: str) -> dict[str, list]:
    """The columns of a local JSON/JSONL/Parquet/CSV file (any other suffix: plain text, one row per line)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{what} {file}: no such file")
    builder = FORMATS.get(file.suffix.lower(), "text")
    table = read_local_file(file, builder, f"{what} {file}", builder)
    try:
        return table.to_dict()
    except UnicodeDecodeError:  # Arrow's JSON reader keeps such bytes; they surface only when the strings are read
        problem = text_file_problem(file)
        raise DataError(f"{what} {file}: cannot read as {builder}: {problem}; save it as UTF-8") from None


def read_corpus(path: str | Path) -> list[str]:
    """Texts of an extra corpus file: a `text` column (JSONL/JSON/Parquet/CSV) or plain lines; blanks skipped."""
    table = _read_table(path, "--corpus")
    if "text" not in table:
        raise DataError(f"--corpus {path}: no 'text' column (columns: {', '.join(table)}); "
                        "give JSON lines like {\"text\": ...} or a plain text file with one document per line")
    texts = [t.strip() for t in table["text"] if isinstance(t, str)]
    return [t for t in texts if t]


def read_sts(path: str | Path) -> StsPairs:
    """Scored pairs from rows with `sentence1`, `sentence2` and a numeric `score`."""
    table = _read_table(path, "--sts")
    absent = [c for c in ("sentence1", "sentence2", "score") if c not in table]
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
    return retrieval_task(ds, extra_corpus, report.source, read_sts(sts) if sts else None)


def retrieval_task(ds: datasets.Dataset, extra_corpus: Sequence[str] = (), source: str = "",
                   sts: StsPairs | None = None) -> EvalData:
    """Distinct queries, the distinct documents (positives, negatives, then `extra_corpus` files' texts) and each
    query's relevant (positive) documents, from `load_triplets` rows. `gist-scale mine` searches the same task."""
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
        for text in read_corpus(file):
            corpus.setdefault(text, len(corpus))
    extra = f" + {len(extra_corpus)} extra corpus file(s)" if extra_corpus else ""
    return EvalData(list(queries), list(corpus), [sorted(ids) for ids in relevant], sts, source=source + extra)


# ---------------------------------------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------------------------- model directories


def load_model(name: str, max_length: int | None = None, trust_remote_code: bool = False
               ) -> tuple[Embedder, PreTrainedTokenizerBase, int]:
    """A sentence-transformers directory or hub name, or a training checkpoint (RUN/checkpoints/step_N), as our
    `Embedder`, its tokenizer and its token limit (`max_length` overrides the model's).

    `trust_remote_code` lets a model directory or hub name run its own code (`auto_map`, as
    `SentenceTransformer(path, trust_remote_code=True)`); a checkpoint follows its run's `model.trust_remote_code`
    instead, recorded in the run's config.yaml."""
    path = Path(name).expanduser()
    if (path / COMPLETE_MARKER).is_file():
        return load_checkpoint_embedder(path, max_length)
    return load_sentence_transformer_dir(name, max_length, trust_remote_code)


# ------------------------------------------------------------------------------------------------ CLI


def _evaluate_model(name: str, data: EvalData, batch_size: int, max_length: int | None,
                    device: torch.device, dims: Sequence[int] = (), trust_remote_code: bool = False
                    ) -> tuple[dict[str, float], float]:
    embedder, tokenizer, length = load_model(name, max_length, trust_remote_code)
    embedder.to(device)
    start = time.perf_counter()
    metrics = evaluate_embedder(embedder, tokenizer, length, data, batch_size, device, dims=dims)
    return metrics, time.perf_counter() - start


def _run_mteb(name: str, tasks: str, out_dir: Path, batch_size: int, max_length: int | None,
              device: torch.device, trust_remote_code: bool = False) -> dict[str, float]:
    """Run `--mteb` tasks on one model; mteb's result JSON and `summary.json` go to `out_dir`."""
    # mteb is an optional dependency: imported only when asked for.
    from gist_scale.mteb_eval import EmbedderEncoder, resolve_tasks, run_mteb

    resolved = resolve_tasks([task.strip() for task in tasks.split(",") if task.strip()])
    embedder, tokenizer, length = load_model(name, max_length, trust_remote_code)
    embedder.to(device)
    path = Path(name).expanduser()
    prompts = {} if (path / COMPLETE_MARKER).is_file() else model_prompts(name)
    encoder = EmbedderEncoder(embedder, tokenizer, length, device, _mteb_model_name(name), prompts, batch_size)
    summary = run_mteb(encoder, resolved, out_dir, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({"model": name, "tasks": summary}, indent=2) + "\n")
    return {f"{task} ({result['main_score']})": result["value"] for task, result in summary.items()}


def _mteb_model_name(name: str) -> str:
    """mteb files results under `results/<org>__<name>/`: a local path becomes `local__<its last two parts>`."""
    path = Path(name).expanduser()
    if path.exists():
        return "local/" + "_".join(path.resolve().parts[-2:])
    return name if "/" in name else f"local/{name}"


def _table(model: str, metrics: dict[str, float], baseline: str | None, base: dict[str, float] | None):
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


def _device(name: str) -> torch.device:
    """`--device NAME` as a torch device that exists here (torch's own errors only surface at the first tensor)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ConfigError(f"--device {name}: no such device on this machine; use --device cpu (or leave it out)")
    return device


def _dims(text: str) -> list[int]:
    """`--dims 256,128,64`: positive sizes, largest first."""
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive embedding sizes separated by commas, e.g. 256,128")
    return sorted(set(dims), reverse=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gist-scale eval",
        description="Retrieval (nDCG@10, MRR@10, Recall@1/@10/@100, MAP@100) and optional STS evaluation of a "
                    "sentence-transformers model or a training checkpoint, on eval triplets or a BEIR folder, or "
                    "MTEB tasks through the mteb package. Under torchrun every rank encodes a shard (not with --mteb).")
    parser.add_argument("model", help="sentence-transformers directory (e.g. RUN/final), hub name, or checkpoint "
                                      "(RUN/checkpoints/step_N)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="eval triplets: file, folder or hub dataset (default: the shipped WordNet "
                                       "sample's held-out eval split)")
    source.add_argument("--beir", metavar="DIR", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    source.add_argument("--mteb", metavar="TASK[,TASK...]", help="MTEB tasks or benchmarks, e.g. NanoBEIR,SciFact "
                                                                  "(needs pip install 'gist-scale[mteb]')")
    parser.add_argument("--split", help="split of a --data folder or hub dataset (default: eval), or qrels file of "
                                        "--beir (default: test)")
    parser.add_argument("--config", help="training config (e.g. RUN/config.yaml) whose data column mapping and "
                                         "instruction options apply to --data")
    parser.add_argument("--corpus", action="append", default=[], metavar="FILE",
                        help="extra corpus texts for --data (JSONL with 'text', or plain lines); repeatable")
    parser.add_argument("--sts", metavar="FILE", help="scored pairs (JSONL: sentence1, sentence2, score): adds "
                                                      "Spearman correlation")
    parser.add_argument("--baseline", metavar="MODEL", help="second model, shown side by side with deltas")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward (default: 64)")
    parser.add_argument("--max-length", type=int, help="token limit (default: each model's own max_seq_length)")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model and the baseline run their repository's own Python code (auto_map), as "
                             "SentenceTransformer(path, trust_remote_code=True); only for code you trust (a "
                             "checkpoint follows its run's model.trust_remote_code)")
    parser.add_argument("--dims", type=_dims, default=[],
                        metavar="D[,D...]", help="Matryoshka sizes: also report every metric on the embeddings "
                                                 "truncated to each (e.g. 256,128,64), as ndcg@10@256 ...")
    parser.add_argument("--out", metavar="PATH", help='write {"model": {...}, "baseline": {...} or null} as JSON to '
                                                      "this file; with --mteb, the folder for mteb's result files "
                                                      "and summary.json (default: mteb_results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # soft_wrap: paths and messages stay on one line (copyable) instead of being folded at the terminal width.
    console = Console(stderr=True, highlight=False, soft_wrap=True)

    def fail(message: str) -> int:
        console.print(f"[red]error:[/red] {message}")
        return 2

    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        return fail("--batch-size and --max-length must be positive")
    if args.corpus and args.data is None and (args.beir or args.mteb):
        return fail("--corpus adds distractors to eval triplets (--data); a BEIR folder or MTEB task has its own")
    if args.mteb and (args.sts or args.config or args.split):
        return fail("--sts, --config and --split do not apply to --mteb (each task brings its data and splits)")
    try:
        state = distributed.launch_state()
    except ConfigError as error:  # a launch that would not shard the encoding (`distributed.launch_plan`)
        return fail(str(error))
    if args.mteb and state.use_distributed:
        return fail("--mteb runs in one process: start gist-scale eval without torchrun/accelerate launch")
    results: dict[str, dict[str, float] | None] = {"model": None, "baseline": None}
    try:
        device = _device(args.device) if args.device else state.device
        if args.out and not args.mteb:  # before minutes of encoding, not after
            require_writable_file(args.out, "--out")
        if args.mteb:
            out_dir = Path(args.out or "mteb_results")
            for key, name in (("model", args.model), ("baseline", args.baseline)):
                if name is not None:
                    results[key] = _run_mteb(name, args.mteb, out_dir / key, args.batch_size, args.max_length,
                                             device, args.trust_remote_code)
                    console.print(f"{key} {name}: mteb results in {out_dir / key}")
        else:
            with state.main_process_first():  # the main process fills the datasets cache, the others read it
                data = _cli_eval_data(args)
            if state.is_main_process:
                console.print(data.describe())
            for key, name in (("model", args.model), ("baseline", args.baseline)):
                if name is None:
                    continue
                results[key], seconds = _evaluate_model(name, data, args.batch_size, args.max_length, device,
                                                        args.dims, args.trust_remote_code)
                if state.is_main_process:
                    console.print(f"{key} {name}: encoded {len(data.texts)} texts in {seconds:.1f} s")
    except (ConfigError, DataError, CheckpointError, OSError, ValueError) as error:
        return fail(str(error))
    except ImportError as error:  # only --mteb imports anything here: mteb itself
        return fail(f"{error}; --mteb needs the mteb package: pip install 'gist-scale[mteb]'")
    if state.is_main_process:
        Console(highlight=False).print(_table(args.model, results["model"], args.baseline, results["baseline"]))
        if args.out and not args.mteb:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            console.print(f"metrics written to {out}")
    if state.use_distributed:
        # Leave together: a rank that tears gloo down while a peer is still in a collective aborts it.
        state.wait_for_everyone()
        state.destroy_process_group()
    return 0


def _cli_eval_data(args: argparse.Namespace) -> EvalData:
    """The eval data `gist-scale eval` was given: a BEIR folder, or eval triplets (the shipped sample by default)."""
    if args.beir:
        # gist_scale.beir builds EvalData, defined here, so it is imported on use.
        from gist_scale.beir import load_beir

        return load_beir(args.beir, args.split or "test", read_sts(args.sts) if args.sts else None)
    data_cfg = load_config([], args.config).data if args.config else None
    return load_eval_data(args.data, data_cfg, args.corpus, sts=args.sts, split=args.split or "eval")


if __name__ == "__main__":
    sys.exit(main())
