"""Dual tokenization: every text tokenized once for the student and once for the guide, each with its own tokenizer,
max length and prompts, in one cached `datasets.map` (`tokenize_triplets`) or batch by batch for a stream
(`tokenize_batch`), recording which texts were truncated. The training step then only pads ids; it never decodes
and re-encodes text."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from gist_scale.model.prompts import Prompts, prompt_length

__all__ = ["Side", "count_tokens", "encoder_sides", "measure_tokenization_rate", "token_ids", "tokenize_batch",
           "tokenize_triplets"]


class Side(NamedTuple):
    """One encoder to tokenize for: `student` or `guide`, with its tokenizer, max length and prompts."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    prompts: Prompts


def encoder_sides(student_tokenizer: PreTrainedTokenizerBase, student_max_length: int,
                  guide_tokenizer: PreTrainedTokenizerBase | None, guide_max_length: int | None,
                  student_prompts: Prompts | None = None, guide_prompts: Prompts | None = None) -> list[Side]:
    """The student's side, and the guide's when there is a guide tokenizer."""
    sides = [Side("student", student_tokenizer, student_max_length, student_prompts or Prompts())]
    if guide_tokenizer is not None:
        if guide_max_length is None:
            raise ValueError("guide_max_length is required with a guide tokenizer")
        sides.append(Side("guide", guide_tokenizer, guide_max_length, guide_prompts or Prompts()))
    return sides


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str],
              max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids with the tokenizer's special tokens, cut at `max_length`, and which texts were cut."""
    if not texts:
        return [], []
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=False)
    if encoded.encodings is not None:  # a fast tokenizer keeps what truncation cut off
        truncated = [len(e.overflowing) > 0 for e in encoded.encodings]
    else:
        full = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        truncated = [len(ids) > max_length for ids in full["input_ids"]]
    return encoded["input_ids"], truncated


def _prompted(texts: list[str], prompts: list[str] | str) -> list[str]:
    """`prompt + text`, as sentence-transformers prepends its prompts."""
    if isinstance(prompts, str):
        return texts if not prompts else [prompts + t for t in texts]
    return [p + t for p, t in zip(prompts, texts)]


def _slots(batch: Mapping[str, list]) -> tuple[list[list[str]], list[list[int]] | None]:
    """Each row's candidate slots: its extra positives (`extra_pos`; the first positive's text in an empty slot, so
    encoders always see real text) in front of its negatives; and the positive slots' roles (1: a positive, -1:
    empty), or None for rows without `extra_pos`."""
    if "extra_pos" not in batch:
        return batch["negs"], None
    slots = [[p if e is None else e for e in extra] + negs
             for p, extra, negs in zip(batch["pos"], batch["extra_pos"], batch["negs"])]
    return slots, [[-1 if e is None else 1 for e in extra] for extra in batch["extra_pos"]]


def tokenize_batch(batch: Mapping[str, list], sides: Sequence[Side]) -> dict[str, list]:
    """Batched map: texts -> unpadded ids for each side (student, guide), plus per-row truncation flags
    (`_truncated_<side>_<column>`) and, when a side leaves prompts out of pooling, each text's prompt length
    (`<side>_query_prompt`, ...). Rows may have different numbers of negatives (mixture sources differ).

    With `extra_pos` (several positives per row), `<side>_negs` holds each row's candidate slots, its extra positives
    first (see `_slots`), and `positive_slots` their roles."""
    out: dict[str, list] = {}
    slots, positive_slots = _slots(batch)
    if positive_slots is not None:
        out["positive_slots"] = positive_slots
    ends = np.cumsum([len(texts) for texts in slots]).tolist()
    starts = [0] + ends[:-1]
    for name, tokenizer, max_length, prompts in sides:
        query_prompts = [prompts.for_query(task) for task in batch["task_name"]]
        texts = {"query": _prompted(batch["query"], query_prompts), "pos": _prompted(batch["pos"], prompts.document)}
        for column in ("query", "pos"):
            out[f"{name}_{column}"], out[f"_truncated_{name}_{column}"] = token_ids(tokenizer, texts[column],
                                                                                    max_length)
        negs = _prompted([t for row in slots for t in row], prompts.document)
        ids, truncated = token_ids(tokenizer, negs, max_length)
        out[f"{name}_negs"] = [ids[a:b] for a, b in zip(starts, ends)]
        out[f"_truncated_{name}_negs"] = [sum(truncated[a:b]) for a, b in zip(starts, ends)]
        if not prompts.include_prompt:
            lengths = {p: prompt_length(tokenizer, p) for p in {*query_prompts, prompts.document}}
            document = lengths[prompts.document]
            out[f"{name}_query_prompt"] = [lengths[p] for p in query_prompts]
            out[f"{name}_pos_prompt"] = [document] * len(batch["pos"])
            out[f"{name}_negs_prompt"] = [[document] * (b - a) for a, b in zip(starts, ends)]
    return out


def tokenize_triplets(ds: datasets.Dataset, student_tokenizer: PreTrainedTokenizerBase, student_max_length: int,
                      guide_tokenizer: PreTrainedTokenizerBase | None = None, guide_max_length: int | None = None,
                      num_proc: int | None = None, *, student_prompts: Prompts | None = None,
                      guide_prompts: Prompts | None = None) -> tuple[datasets.Dataset, dict[str, float]]:
    """Tokenize every text for the student and the guide in one cached `datasets.map`.

    Returns the dataset with `student_query`, `student_pos`, `student_negs` (K id lists per row) and, with a guide,
    the same `guide_*` columns, all unpadded token ids with the tokenizer's special tokens (a decoder's EOS
    included, see `gist_scale.model.load_tokenizer`), plus `task_name` (and `source` for a mixture); and the
    fraction of texts truncated per column (`student_query`, ..., `guide_negs`; negatives over all negatives).
    Rows with `extra_pos` (`data.num_positives` > 1) get P-1+K candidate slots in `<side>_negs`, their P-1 extra
    positives first, and `positive_slots` (int8, P-1 per row: 1 a positive, -1 an empty slot).
    Each side's `Prompts` are prepended to its texts; a side whose prompts are left out of pooling also gets
    `<side>_query_prompt`, `<side>_pos_prompt` (ints) and `<side>_negs_prompt` (K ints): each text's prompt
    length in tokens. The raw text columns are dropped. A second call with the same data, tokenizers, lengths and
    prompts reads the cache.
    """
    sides = encoder_sides(student_tokenizer, student_max_length, guide_tokenizer, guide_max_length, student_prompts,
                          guide_prompts)
    kept = [c for c in ("task_name", "source") if c in ds.column_names]
    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({c: ds.features[c] for c in kept})
    for side in sides:
        features.update({f"{side.name}_query": ids, f"{side.name}_pos": ids, f"{side.name}_negs": datasets.List(ids)})
        features.update({f"_truncated_{side.name}_{c}": datasets.Value("int32") for c in ("query", "pos", "negs")})
        if not side.prompts.include_prompt:
            features.update({f"{side.name}_query_prompt": datasets.Value("int32"),
                             f"{side.name}_pos_prompt": datasets.Value("int32"), f"{side.name}_negs_prompt": ids})
    if "extra_pos" in ds.column_names:
        features["positive_slots"] = datasets.List(datasets.Value("int8"))
    tokenized = ds.map(tokenize_batch, batched=True, remove_columns=[c for c in ds.column_names if c not in kept],
                       features=features, num_proc=num_proc, fn_kwargs={"sides": sides},
                       desc="tokenizing " + " and ".join(side.name for side in sides))
    negatives = pc.sum(pc.list_value_length(tokenized.data.column("student_negs"))).as_py() or 0
    truncation: dict[str, float] = {}
    flags = [c for c in tokenized.column_names if c.startswith("_truncated_")]
    for flag in flags:
        texts = negatives if flag.endswith("_negs") else len(tokenized)
        truncated = pc.sum(tokenized.data.column(flag)).as_py() or 0
        truncation[flag.removeprefix("_truncated_")] = truncated / max(texts, 1)  # no texts: none truncated
    return tokenized.remove_columns(flags), truncation


def count_tokens(tok_ds: datasets.Dataset, side: str = "student") -> int:
    """Real (unpadded) tokens of one side's texts over the whole dataset, counted in Arrow without a Python loop."""
    data = tok_ds.data
    texts = (data.column(f"{side}_query"), data.column(f"{side}_pos"), pc.list_flatten(data.column(f"{side}_negs")))
    return sum(pc.sum(pc.list_value_length(ids)).as_py() or 0 for ids in texts)


def measure_tokenization_rate(ds: datasets.Dataset, student_tokenizer: PreTrainedTokenizerBase,
                              student_max_length: int, guide_tokenizer: PreTrainedTokenizerBase | None = None,
                              guide_max_length: int | None = None, rows: int = 2048) -> float:
    """Rows per second that `tokenize_triplets` tokenizes (student and guide) on one process, bypassing its cache.

    Compare with the rows per second that training consumes: the map runs once and is cached, so this only
    matters for the first run on a new dataset (raise `num_proc` if it is slow).
    """
    sample = ds[: min(rows, len(ds))]
    sides = encoder_sides(student_tokenizer, student_max_length, guide_tokenizer, guide_max_length)
    start = time.perf_counter()
    for begin in range(0, len(sample["query"]), 1000):
        tokenize_batch({k: v[begin:begin + 1000] for k, v in sample.items()}, sides)
    return len(sample["query"]) / max(time.perf_counter() - start, 1e-9)
