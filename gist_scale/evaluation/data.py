"""Evaluation data: the retrieval task (queries, a deduplicated corpus, each query's relevant documents) and STS pairs.

Retrieval: every query is scored against one corpus made of all eval positives and negatives (deduplicated), plus
optional extra corpus files. A query's own positive(s) are its relevant documents; its negatives, and everybody
else's positives, are not. A BEIR folder (`gist_scale.evaluation.beir`) gives its own queries, corpus and graded
judgments instead, as the same `EvalData`. Scored sentence pairs (`StsPairs`) add Spearman's correlation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets

from gist_scale.config import DataConfig
from gist_scale.data import FORMATS, DataError, load_triplets, read_local_file
from gist_scale.metrics import Relevance
from gist_scale.places import text_file_problem

__all__ = ["EvalData", "StsPairs", "load_eval_data", "read_corpus", "read_sts", "retrieval_task"]


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores (any scale: only their ranks matter)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]


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
        for i, ids in enumerate(self.relevant):  # both builders give one per query, ids from the corpus they built
            if not ids:
                raise ValueError(f"query {i} has no relevant document")
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
    else:
        cfg = data_cfg or DataConfig()
        # The training data's revision pins the training dataset, not necessarily this one.
        cfg = replace(cfg, path=path, split=split, max_rows=None, revision=cfg.revision if path == cfg.path else None)
    ds, report = load_triplets(cfg, split=split)
    return retrieval_task(ds, extra_corpus, report.source, read_sts(sts) if sts else None)


def retrieval_task(ds: datasets.Dataset, extra_corpus: Sequence[str] = (), source: str = "",
                   sts: StsPairs | None = None) -> EvalData:
    """Distinct queries, the distinct documents (positives, negatives, then `extra_corpus` files' texts) and each
    query's relevant (positive) documents, from `load_triplets` rows. `gist-scale mine` searches the same task.

    Rows read with `num_positives` P > 1 carry their other positives (`extra_pos`): each is relevant too, and they
    join the corpus after every row's first positive and negatives, so the first positives keep the first corpus ids
    (`gist-scale mine` reads their guide embeddings from the cache by that order)."""
    queries: dict[str, int] = {}
    corpus: dict[str, int] = {}
    relevant: defaultdict[int, set[int]] = defaultdict(set)
    others: list[tuple[int, list[str | None]]] = []
    for batch in ds.iter(batch_size=4096):
        more_positives = batch.get("extra_pos", [[]] * len(batch["query"]))
        for query, pos, negs, more in zip(batch["query"], batch["pos"], batch["negs"], more_positives):
            q = queries.setdefault(query, len(queries))
            # The same query text in several rows is one query with several relevant documents: scoring it twice
            # would count its other positive as a miss.
            relevant[q].add(corpus.setdefault(pos, len(corpus)))
            for neg in negs:
                corpus.setdefault(neg, len(corpus))
            if more:  # rows read with one positive have no others
                others.append((q, more))
    for q, texts in others:
        relevant[q].update(corpus.setdefault(text, len(corpus)) for text in texts if text is not None)
    for file in extra_corpus:
        for text in read_corpus(file):
            corpus.setdefault(text, len(corpus))
    extra = f" + {len(extra_corpus)} extra corpus file(s)" if extra_corpus else ""
    return EvalData(list(queries), list(corpus), [sorted(ids) for ids in relevant.values()], sts, source=source + extra)
