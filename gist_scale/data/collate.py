"""Collation: a list of tokenized rows -> one typed micro-batch (`TripletBatch`), padded per column to this batch's
longest text (or already cut into the encoder's chunks), with the token counts and text identities the step needs.
Runs on the host, in the DataLoader's workers or the stream's reader, so the step reads nothing back from the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import recursively_apply
from transformers import PreTrainedTokenizerBase

from gist_scale.chunking import ChunkedTexts, chunk_texts
from gist_scale.data.errors import DataError

__all__ = ["Columns", "TokenCounts", "TripletBatch", "TripletCollator", "text_identities"]

Columns = dict[str, dict[str, torch.Tensor]]
"""One side's texts per column (`query`, `pos`, `neg`) -> `{"input_ids", "attention_mask"}` (int64 `[N, L]`), plus
`prompt_length` `[N]` when prompts are left out of pooling."""


@dataclass(frozen=True)
class TokenCounts:
    """Real (non-padding) tokens of one side's texts in a batch, counted by the collator on the host."""

    texts: int
    tokens: int
    tokens_squared: int
    """Sum of squared text lengths: what attention's FLOPs grow with."""


def text_identities(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """A 64-bit identity per token-id sequence (int64 `[n]`): equal sequences, equal ids; different ones collide
    with probability 2^-64 per pair. Hashed on the host (blake2b of the ids), so every rank and process agrees and
    the device never compares texts. The loss masks a candidate whose identity is its row's positive's or query's."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8)
                                        .digest(), "little", signed=True) for ids in sequences], dtype=torch.int64)


def _movable(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, ChunkedTexts))


@dataclass(frozen=True)
class TripletBatch:
    """One micro-batch of B rows with K candidate slots each, as the training step receives it.

    A row's slots are its hard negatives, or, with several positives per row (`data.num_positives` P > 1), its P-1
    extra positives followed by its hard negatives: encoding, chunk plans and the guide see ordinary slots, and
    `slot_roles` says which slot is what.

    `to(device)` returns it moved (Accelerate's `send_to_device` calls it) and `pin_memory()` pinned (the
    DataLoader calls it); the Python numbers stay on the host, so the step reads nothing back from the device.
    """

    student: Columns | ChunkedTexts
    """The student's texts: `query` `[B, L]`, `pos` `[B, L]` (each row's first positive), `neg` `[B*K, L]` with row
    i's slots at `i*K .. i*K+K-1` (absent when K is 0); or, with `chunks`, the side's texts pooled and cut into
    chunks."""
    guide: Columns | ChunkedTexts | None
    """The guide's texts, as `student`; None without a guide tokenizer (no guide, or a guide cache)."""
    num_negatives: int
    """K, the candidate slots per row: the source's hard negatives, and with P > 1 its P-1 positive slots."""
    text_ids: dict[str, torch.Tensor]
    """`query` `[B]`, `pos` `[B]`, `neg` `[B*K]` (absent when K is 0): `text_identities` of the student's ids."""
    token_counts: dict[str, TokenCounts]
    """`student` and, with a guide tokenizer, `guide`."""
    source: int | None = None
    """The rows' mixture source (`data.sources` index); None for a single source."""
    guide_embeddings: dict[str, torch.Tensor] | None = None
    """The guide's embeddings from the guide cache (`query`, `pos`, `neg` `[B, K, Dg]` in the slots' layout),
    instead of `guide`."""
    slot_roles: torch.Tensor | None = None
    """int8 `[B, K]`: 1 a positive of the row (slots `0 .. P-2`), 0 a hard negative, -1 an empty slot (the row had
    fewer than P positives; its text is the row's first positive, and no row may count it as a candidate). None when
    the rows' source has one positive per row: every slot is a hard negative."""

    def _moved(self, move: Callable[[Any], Any]) -> TripletBatch:
        """`move` applied to every tensor (or `ChunkedTexts`, which moves itself) in the fields that hold them."""
        tensors = ("student", "guide", "text_ids", "guide_embeddings", "slot_roles")
        return dataclasses.replace(self, **{name: recursively_apply(move, getattr(self, name), test_type=_movable)
                                            for name in tensors})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TripletBatch:
        return self._moved(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TripletBatch:
        return self._moved(lambda tensor: tensor.pin_memory())


class TripletCollator:
    """Pads a list of tokenized rows into a `TripletBatch`, each column to the longest text in this batch.

    All tensors are int64. Rows tokenized with prompts left out of pooling add `prompt_length` `[N]` to each
    column's features. `text_ids` are :func:`text_identities` of the student's token ids, which hold the prompt and
    the truncation: identical as the student's encoder sees them.

    With `chunks`, each side is instead a :class:`gist_scale.chunking.ChunkedTexts`: the side's texts pooled,
    length-sorted and cut into `chunks` chunks padded to their own longest text, planned here on the host so that the
    training step never reads lengths back from the accelerator. `chunks` may be a function of the batch's K (a
    mixture's sources differ in K, and every batch holds one source). Rows of a mixture give the batch its `source`,
    rows with several positives (`positive_slots`, see `tokenize_triplets`) its `slot_roles`.
    """

    def __init__(self, student_tokenizer: PreTrainedTokenizerBase,
                 guide_tokenizer: PreTrainedTokenizerBase | None = None, pad_to_multiple_of: int | None = None,
                 chunks: int | Callable[[int], int | None] | None = None) -> None:
        sides = (("student", student_tokenizer), ("guide", guide_tokenizer))
        self.sides = [(name, tokenizer) for name, tokenizer in sides if tokenizer is not None]
        for name, tokenizer in self.sides:
            if tokenizer.pad_token_id is None:
                raise DataError(f"the {name} tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                                "tokenizer.eos_token: padded positions are masked out)")
        self.pad_to_multiple_of, self.chunks = pad_to_multiple_of, chunks

    def _pad(self, tokenizer: PreTrainedTokenizerBase, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad({"input_ids": sequences}, padding="longest", return_attention_mask=True,
                               pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        return {"input_ids": padded["input_ids"].long(), "attention_mask": padded["attention_mask"].long()}

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> TripletBatch:
        num_negatives = len(rows[0]["student_negs"])
        chunks = self.chunks(num_negatives) if callable(self.chunks) else self.chunks
        encoded_sides: dict[str, Columns | ChunkedTexts] = {}
        token_counts: dict[str, TokenCounts] = {}
        text_ids: dict[str, torch.Tensor] = {}
        for side, tokenizer in self.sides:
            if f"{side}_query" not in rows[0]:
                raise DataError(f"rows have no '{side}_query': pass the {side} tokenizer to tokenize_triplets")
            texts = {column: [row[f"{side}_{column}"] for row in rows] for column in ("query", "pos")}
            if num_negatives:
                texts["neg"] = [ids for row in rows for ids in row[f"{side}_negs"]]
            lengths = [len(ids) for column in texts.values() for ids in column]
            token_counts[side] = TokenCounts(len(lengths), sum(lengths), sum(n * n for n in lengths))
            if side == "student":
                text_ids = {column: text_identities(sequences) for column, sequences in texts.items()}
            encoded = {column: self._pad(tokenizer, sequences) for column, sequences in texts.items()}
            if f"{side}_query_prompt" in rows[0]:  # prompts left out of pooling: each text's prompt length
                prompt = {"query": [row[f"{side}_query_prompt"] for row in rows],
                          "pos": [row[f"{side}_pos_prompt"] for row in rows],
                          "neg": [n for row in rows for n in row[f"{side}_negs_prompt"]]}
                for column, features in encoded.items():
                    features["prompt_length"] = torch.tensor(prompt[column], dtype=torch.long)
            encoded_sides[side] = (encoded if chunks is None else
                                   chunk_texts(encoded, chunks, tokenizer.pad_token_id, self.pad_to_multiple_of))
        return TripletBatch(student=encoded_sides["student"], guide=encoded_sides.get("guide"),
                            num_negatives=num_negatives, text_ids=text_ids, token_counts=token_counts,
                            source=rows[0].get("source"), slot_roles=_slot_roles(rows, num_negatives))


def _slot_roles(rows: Sequence[Mapping[str, Any]], slots: int) -> torch.Tensor | None:
    """`TripletBatch.slot_roles` from the rows' `positive_slots` (the roles of the P-1 slots in front of the hard
    negatives); None when the rows have no positive slot."""
    if not rows[0].get("positive_slots"):
        return None
    roles = torch.tensor([row["positive_slots"] for row in rows], dtype=torch.int8)
    return F.pad(roles, (0, slots - roles.shape[1]))  # the hard negatives' slots: 0
