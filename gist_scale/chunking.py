"""Host-side planning of a step's encoder calls: pack a side's columns, sort by length, cut padded chunks.

Batch composition defines the in-batch negatives, so rows are never moved between batches. Inside a step,
:func:`chunk_texts` pools the texts of all columns (queries, positives, negatives), sorts them by real length,
cuts them into length-homogeneous chunks and trims each chunk's padding to its own longest text. The plan is made
in the DataLoader's collator (`TripletCollator(chunks=...)`), on the host, where reading lengths costs nothing:
the chunks reach the device already cut, and :mod:`gist_scale.encode` runs them without reading anything back.

Every rank must make the same number of forward calls (ZeRO-3 gathers parameters and DDP broadcasts buffers in
each one). A rank's chunk count therefore comes from the per-device batch size, which all ranks share
(:func:`num_chunks`), not from its own row count; a rank with fewer texts (an uneven tail) gets smaller chunks,
and if it has fewer texts than chunks, the missing chunks encode one token whose output is multiplied by zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COLUMNS", "ChunkedTexts", "Features", "chunk_texts", "num_chunks", "pack_columns"]

COLUMNS = ("query", "pos", "neg")
"""Column order of a collated side (`TripletCollator`): `neg` holds [B*K] texts and may be absent."""

Features = Mapping[str, Tensor]
"""`{"input_ids": [N, L], "attention_mask": [N, L]}` as the collator returns them, plus `prompt_length` `[N]` when
prompts are left out of pooling; every feature is passed to the embedder by name."""

def num_chunks(texts: int, chunk_size: int | None) -> int:
    """Forward calls needed for `texts` texts at most `chunk_size` per call (1 when `chunk_size` is None).

    Pass the *largest* per-rank text count (per-device batch size x (2 + K)), the same on every rank.
    """
    if chunk_size is None:
        return 1
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return max(1, math.ceil(texts / chunk_size))

def _left_padded(mask: Tensor) -> bool:
    """True when some row starts with padding (the tokenizer pads on the left)."""
    return bool((mask[:, 0] == 0).any()) if mask.numel() else False

def _pad_width(t: Tensor, width: int, value: int, left: bool) -> Tensor:
    missing = width - t.shape[1]  # >= 0: `width` is the widest column's
    return F.pad(t, (missing, 0) if left else (0, missing), value=value)

def pack_columns(columns: Mapping[str, Features], pad_token_id: int = 0) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Concatenate the columns' texts into one `[sum N, max L]` batch; returns it and each column's row count.

    Narrower columns are padded with `pad_token_id` (masked out) on the tokenizer's padding side.
    """
    present = [c for c in COLUMNS if c in columns] + [c for c in columns if c not in COLUMNS]
    width = max(columns[c]["input_ids"].shape[1] for c in present)
    left = any(_left_padded(columns[c]["attention_mask"]) for c in present)
    ids = torch.cat([_pad_width(columns[c]["input_ids"], width, pad_token_id, left) for c in present])
    mask = torch.cat([_pad_width(columns[c]["attention_mask"], width, 0, left) for c in present])
    packed = {"input_ids": ids, "attention_mask": mask}
    # Per-text features (`prompt_length`) are concatenated as they are.
    for name in columns[present[0]].keys() - packed.keys():
        packed[name] = torch.cat([columns[c][name] for c in present])
    return packed, {c: columns[c]["input_ids"].shape[0] for c in present}


@dataclass
class ChunkedTexts:
    """A side's texts (all columns pooled) cut into length-sorted chunks, each padded to its own longest text.

    Made on the host by :func:`chunk_texts`; `to(device)` moves it (Accelerate's `send_to_device` and the
    DataLoader's `pin_memory` use `to` / `pin_memory`). Everything the encoder loop needs besides the tensors is a
    Python number, so encoding reads nothing back from the device.
    """

    chunks: list[dict[str, Tensor]]
    """Per forward call: `input_ids` / `attention_mask` `[rows, width]`, longest texts first; the trailing
    `len(chunks) - real_chunks` are one-token placeholders (see the module docstring)."""
    real_chunks: int
    """Chunks that hold texts."""
    inverse: Tensor
    """`[N]` int64: where text i (in column order) is among the concatenated real chunks' rows."""
    counts: dict[str, int]
    """Texts per column, in column order (`query`, `pos`, `neg`)."""

    def to(self, device, non_blocking: bool = False) -> ChunkedTexts:
        return ChunkedTexts([{k: t.to(device, non_blocking=non_blocking) for k, t in c.items()} for c in self.chunks],
                            self.real_chunks, self.inverse.to(device, non_blocking=non_blocking), self.counts)

    def pin_memory(self) -> ChunkedTexts:
        return ChunkedTexts([{k: t.pin_memory() for k, t in c.items()} for c in self.chunks], self.real_chunks,
                            self.inverse.pin_memory(), self.counts)

    @property
    def chunk_rows(self) -> list[int]:
        """Texts in each real chunk (host numbers, from the shapes)."""
        return [c["input_ids"].shape[0] for c in self.chunks[:self.real_chunks]]

    @property
    def processed_tokens(self) -> int:
        """Token positions the encoder calls process, padding included (placeholders too)."""
        return sum(c["input_ids"].numel() for c in self.chunks)


def chunk_texts(columns: Mapping[str, Features], chunks: int, pad_token_id: int = 0,
                pad_to_multiple_of: int | None = None) -> ChunkedTexts:
    """Pool the columns' texts, sort them by real length (longest first) and cut `chunks` near-equal chunks.

    Call it on host tensors (the collator does): it reads the lengths. Chunk sizes differ by at most one; with fewer
    texts than chunks the trailing chunks are placeholders. `pad_to_multiple_of` rounds each chunk's width up (tensor
    cores), never past the batch's width.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    packed, counts = pack_columns(columns, pad_token_id)
    ids, mask = packed["input_ids"], packed["attention_mask"]
    per_text = {name: t for name, t in packed.items() if name not in ("input_ids", "attention_mask")}
    total_width = ids.shape[1]
    left = _left_padded(mask)
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = []
    for rows in order.tensor_split(chunks):
        if not len(rows):
            break
        width = max(int(lengths[rows[0]]), 1)
        if pad_to_multiple_of:
            width = min(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of, total_width)
        cols = slice(total_width - width, None) if left else slice(0, width)
        out.append({"input_ids": ids[rows, cols], "attention_mask": mask[rows, cols],
                    **{name: t[rows] for name, t in per_text.items()}})
    real = len(out)
    # A placeholder is the longest text's last (left padding) or first (right padding) token: real, not padding.
    cols = slice(total_width - 1, None) if left else slice(0, 1)
    for _ in range(chunks - real):
        out.append({"input_ids": ids[order[:1], cols], "attention_mask": mask[order[:1], cols],
                    **{name: torch.zeros_like(t[order[:1]]) for name, t in per_text.items()}})
    return ChunkedTexts(out, real, torch.argsort(order), counts)
