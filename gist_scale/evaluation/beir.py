"""BEIR-format retrieval folders as eval data: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.

The layout is BEIR's (and MTEB's local one): `corpus.jsonl` rows `{"_id", "title", "text"}`, `queries.jsonl` rows
`{"_id", "text"}`, and `qrels/<split>.tsv` with the header `query-id corpus-id score` and one graded judgment per
line (integer grades; 0 or less means judged non-relevant). A document is embedded as its title and text joined
by one space and stripped, as BEIR's SentenceBERT wrapper, sentence-transformers' documentation and MTEB do; an
empty title leaves the text alone.

Evaluated queries are those with judgments in the split: `queries.jsonl` usually holds the queries of every split,
and the others are skipped and counted. A query judged only non-relevant (every grade 0 or less) scores 0 and
counts in the averages, as in BEIR's and MTEB's numbers (trec_eval scores it 0); it is counted too. A document
whose `_id` equals a query's is never retrieved for that query (BEIR's and MTEB's `ignore_identical_ids`; it
matters for folders where queries are also documents, such as Quora or ArguAna).

Judgments naming a query or document that the folder does not have are dropped with a warning (count and first
example), not an error: some published BEIR/MTEB folders have such lines, and MTEB counts them too
(`num_missing_query_ids`, `num_missing_corpus_ids`); if nothing is left to evaluate it is an error.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from gist_scale.data import DataError
from gist_scale.evaluation.data import EvalData, StsPairs

__all__ = ["load_beir"]

LAYOUT = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line of a UTF-8 file."""
    with path.open(encoding="utf-8") as handle:
        yield from ((line_number, line) for line_number, line in enumerate(handle, start=1) if line.strip())


def _read_jsonl(path: Path) -> dict[str, dict[str, str]]:
    """`_id` -> row, for a JSONL file whose rows need `_id` and a `text` (empty only beside a title); errors name
    file:line and field."""
    if not path.is_file():
        raise DataError(f"{path}: no such file ({LAYOUT})")
    rows: dict[str, dict[str, str]] = {}
    for line_number, line in _lines(path):
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "_id" not in row:
            raise DataError(f"{where}: field '_id' missing")
        key, text = str(row["_id"]), row.get("text")
        if not isinstance(text, str) or not (text.strip() or row.get("title")):
            raise DataError(f"{where}: field 'text' must be a text (not empty)")
        if key in rows:
            raise DataError(f"{where}: duplicate _id {key!r}")
        rows[key] = row
    if not rows:
        raise DataError(f"{path}: empty")
    return rows


def _read_qrels(path: Path) -> list[tuple[str, str, int, int]]:
    """(query id, corpus id, grade, line) per judgment of a `query-id corpus-id score` TSV (the header optional)."""
    if not path.is_file():
        splits = sorted(p.stem for p in path.parent.glob("*.tsv"))
        found = f"; splits here: {', '.join(splits)} (pick one with --split)" if splits else f" ({LAYOUT})"
        raise DataError(f"{path}: no such file{found}")
    judgments = []
    for line_number, line in _lines(path):
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 3:
            raise DataError(f"{path}:{line_number}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                            f"got {len(fields)}")
        try:
            grade = int(fields[2])
        except ValueError:
            if line_number == 1:  # the header
                continue
            raise DataError(f"{path}:{line_number}: field 'score' must be an integer grade, got "
                            f"{fields[2]!r}") from None
        judgments.append((fields[0], fields[1], grade, line_number))
    return judgments


def load_beir(folder: str | Path, split: str = "test", sts: StsPairs | None = None) -> EvalData:
    """The retrieval task of a BEIR folder's `split`, with graded relevance (see the module docstring)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such directory ({LAYOUT})")
    qrels_path = root / "qrels" / f"{split}.tsv"
    judgments = _read_qrels(qrels_path)
    corpus_rows = _read_jsonl(root / "corpus.jsonl")
    query_rows = _read_jsonl(root / "queries.jsonl")

    corpus_index = {doc_id: i for i, doc_id in enumerate(corpus_rows)}
    grades: dict[str, dict[int, int]] = {}
    unknown: dict[str, list[tuple[str, int]]] = {"query": [], "corpus": []}  # (id, line) of dropped judgments
    for query_id, doc_id, grade, line in judgments:
        if query_id not in query_rows:
            unknown["query"].append((query_id, line))
        elif doc_id not in corpus_index:
            unknown["corpus"].append((doc_id, line))
        else:
            grades.setdefault(query_id, {})[corpus_index[doc_id]] = grade
    for kind, dropped in unknown.items():
        if dropped:
            first, line = dropped[0]
            warnings.warn(f"{qrels_path}: {len(dropped)} judgment(s) name a {kind} id that is not in the folder, "
                          f"dropped (first: {first!r} at line {line})", stacklevel=2)

    evaluated = [q for q in query_rows if q in grades]
    if not any(g > 0 for q in evaluated for g in grades[q].values()):
        raise DataError(f"{qrels_path}: no query of queries.jsonl has a relevant document (a score above 0) here")
    skipped = len(query_rows) - len(evaluated)
    nothing_relevant = sum(not any(g > 0 for g in grades[q].values()) for q in evaluated)
    corpus = [" ".join((row.get("title") or "", row["text"])).strip() for row in corpus_rows.values()]
    note = f"; {skipped} of {len(query_rows)} queries have no judgments in this split, skipped" if skipped else ""
    if nothing_relevant:
        note += f"; {nothing_relevant} judged without a relevant document, scored 0 as BEIR and MTEB do"
    return EvalData([query_rows[q]["text"].strip() for q in evaluated], corpus, [grades[q] for q in evaluated], sts,
                    source=f"BEIR folder {root} (split {split}{note})",
                    exclude=[corpus_index.get(q, -1) for q in evaluated])
