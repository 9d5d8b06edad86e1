"""Encoding a step's texts: length-sorted chunks with per-chunk padding, and GradCache.

Less padding without changing the batch
---------------------------------------
Batch composition defines the in-batch negatives, so rows are never moved between batches. Inside a step,
:func:`encode_columns` pools the texts of all columns (queries, positives, negatives), sorts them by real length,
cuts them into length-homogeneous chunks, trims each chunk's padding to its own longest text, encodes each chunk in
one forward call and puts the embeddings back in their original order. The embeddings are those of one padded call
(padded positions are masked out of attention and pooling; tests check this), while the FLOPs spent on padding
shrink, and the number of forward calls per step is ``ceil(texts / chunk_size)`` instead of one per column. That
matters under ZeRO-3, where every forward call re-gathers the partitioned parameters.

Every rank must make the same number of forward calls (ZeRO-3 gathers parameters and DDP broadcasts buffers in
each one). A rank's chunk count therefore comes from the per-device batch size, which all ranks share
(:func:`num_chunks`), not from its own row count; a rank with fewer texts (an uneven tail) gets smaller chunks,
and if it has fewer texts than chunks, the missing chunks encode one text whose output is multiplied by zero.

GradCache
---------
:class:`GradCache` makes the batch size independent of activation memory (Gao et al. 2021, "Scaling deep
contrastive learning batch size under memory limited setup"): embed every chunk without autograd, compute the loss
over the whole (global) batch on those embeddings as leaves, back-propagate the loss to the embeddings only, then
re-encode chunk by chunk with autograd, replaying each chunk's dropout RNG, and back-propagate the cached
embedding gradient through each chunk (``backward(sum(embedding * cached_grad))``). The parameter gradients are
those of the plain step; only one chunk's activations are alive at a time.

How each chunk's backward reaches the parameters is the job of a :class:`ChunkBackward`:

* :class:`PlainBackward`: ``surrogate.backward()`` (one process, the benchmark).
* :class:`AcceleratorBackward`: the training loop under Accelerate. DDP: all chunks but the last run under
  ``accelerator.no_sync(model)``, so gradients are all-reduced once per step. DeepSpeed: Accelerate's own
  ``accelerator.backward`` would call ``engine.step()`` after *every* call, so the engine is driven directly:
  inside ``engine.coalesce_grad_reduction()`` (deepspeedai/DeepSpeed#7992, present in the 0.19.8 we test; ZeRO-1/2/3
  with a ZeRO optimizer, no gradient accumulation) every chunk's ``engine.backward`` leaves its gradients on the
  parameters and the block's exit reduces them once; otherwise each chunk is a DeepSpeed gradient-accumulation
  micro-step (``engine.set_gradient_accumulation_boundary(False)`` on all chunks but the step's last, then
  ``engine.step()``): ZeRO-1 reduces once at the boundary, ZeRO-2/3 reduce-scatter each chunk's gradients into
  the partition (more communication, but gradient memory stays partitioned). DeepSpeed releases before
  deepspeedai/DeepSpeed#7981 drop all but the last chunk's gradients on that path with ZeRO-1/2 and CPU offload
  (`zero_optimization.offload_optimizer`); use a DeepSpeed that has it. Each chunk is a complete
  ``engine.backward`` with its own epilogue, which is what the failing integrations miss (sentence-transformers
  #3173 "Gradient computed twice for this partition", Tevatron #206): they run the chunk backwards inside one
  outer backward, so ZeRO sees every parameter's gradient hook fire several times between two epilogues.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COLUMNS", "AcceleratorBackward", "ChunkBackward", "GradCache", "PlainBackward", "encode", "encode_columns",
    "num_chunks", "pack_columns", "plan_chunks", "real_tokens",
]

COLUMNS = ("query", "pos", "neg")
"""Column order of a collated side (`TripletCollator`): `neg` holds [B*K] texts and may be absent."""

Features = Mapping[str, Tensor]
"""`{"input_ids": [N, L], "attention_mask": [N, L]}` as the collator returns them."""


def num_chunks(texts: int, chunk_size: int | None) -> int:
    """Forward calls needed for `texts` texts at most `chunk_size` per call (1 when `chunk_size` is None).

    Pass the *largest* per-rank text count (per-device batch size x (2 + K)), the same on every rank.
    """
    if chunk_size is None:
        return 1
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return max(1, math.ceil(texts / chunk_size))


def real_tokens(features: Features) -> Tensor:
    """Number of non-padding tokens (0-dim int64 tensor, no host sync)."""
    return features["attention_mask"].sum()


def _left_padded(mask: Tensor) -> bool:
    """True when some row starts with padding (the tokenizer pads on the left)."""
    return bool((mask[:, 0] == 0).any()) if mask.numel() else False


def _pad_width(t: Tensor, width: int, value: int, left: bool) -> Tensor:
    missing = width - t.shape[1]
    if missing <= 0:
        return t
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
    return {"input_ids": ids, "attention_mask": mask}, {c: columns[c]["input_ids"].shape[0] for c in present}


@dataclass(frozen=True)
class Chunk:
    """Rows of a packed batch encoded together, and the width they are trimmed to."""

    rows: Tensor
    """Row indices into the packed batch (on its device); empty for a placeholder chunk."""
    width: int
    """Longest real length among the rows: the chunk's padded length."""


def plan_chunks(attention_mask: Tensor, chunks: int) -> list[Chunk]:
    """Split the rows into `chunks` length-sorted groups of near-equal size (longest texts first).

    One host sync (the lengths). Sizes differ by at most one; with fewer rows than chunks the trailing chunks are
    empty (the caller still runs a placeholder forward for them, see the module docstring).
    """
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    sizes = [len(part) for part in torch.arange(len(order)).tensor_split(chunks)]
    starts = [sum(sizes[:i]) for i in range(chunks)]
    sorted_lengths = lengths[order].tolist()
    plan = []
    for start, size in zip(starts, sizes):
        width = int(sorted_lengths[start]) if size else 0
        plan.append(Chunk(order[start:start + size], max(width, 1)))
    return plan


def _chunk_features(features: Features, chunk: Chunk, left: bool) -> tuple[Tensor, Tensor]:
    rows = chunk.rows if chunk.rows.numel() else torch.zeros(1, dtype=torch.long, device=chunk.rows.device)
    cols = slice(features["input_ids"].shape[1] - chunk.width, None) if left else slice(0, chunk.width)
    return features["input_ids"][rows, cols], features["attention_mask"][rows, cols]


def _encode_chunks(model: nn.Module, features: Features, plan: list[Chunk]) -> Tensor:
    """Encode each chunk of the plan and return the embeddings in the packed batch's row order."""
    left = _left_padded(features["attention_mask"])
    outputs, rows = [], []
    placeholder = None
    for chunk in plan:
        out = model(*_chunk_features(features, chunk, left))
        if chunk.rows.numel():
            outputs.append(out)
            rows.append(chunk.rows)
        else:
            # Kept in the graph with weight 0, so every rank runs the same forward and backward calls.
            placeholder = out.sum() * 0 if placeholder is None else placeholder + out.sum() * 0
    embeddings = torch.cat(outputs)
    order = torch.cat(rows)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    embeddings = embeddings[inverse]
    if placeholder is not None:
        embeddings = embeddings + placeholder.to(embeddings.dtype)
    return embeddings


def encode(model: nn.Module, features: Features, chunk_size: int | None = None, *,
           chunks: int | None = None) -> Tensor:
    """Embed `features` ([N, L] ids and mask) as `model(input_ids, attention_mask)` would in one call: `[N, D]`.

    With `chunk_size` (or an explicit `chunks` count) the texts are sorted by length and encoded in
    length-homogeneous chunks, each padded only to its own longest text; the result is in the input order.
    """
    if chunks is None:
        chunks = num_chunks(features["input_ids"].shape[0], chunk_size)
    if chunks == 1 and chunk_size is None:
        return model(features["input_ids"], features["attention_mask"])
    return _encode_chunks(model, features, plan_chunks(features["attention_mask"], chunks))


def _split_columns(embeddings: Tensor, counts: Mapping[str, int], k: int):
    parts = dict(zip(counts, embeddings.split(list(counts.values()))))
    query, pos = parts["query"], parts["pos"]
    neg = parts.get("neg")
    return query, pos, None if neg is None else neg.view(query.shape[0], k, -1)


def encode_columns(model: nn.Module, columns: Mapping[str, Features], k: int, chunk_size: int | None = None, *,
                   chunks: int | None = None, pad_token_id: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Embed a collated side's columns: `(query [B, D], positive [B, D], negatives [B, K, D] or None)`.

    `chunk_size` None: one forward call per column, each padded to its own longest text. Otherwise all the
    columns' texts are pooled and encoded in length-sorted chunks (:func:`encode`); pass `chunks` (from
    :func:`num_chunks` over the largest per-rank text count) when the call count must agree across ranks.
    """
    if chunk_size is None and chunks is None:
        query = model(columns["query"]["input_ids"], columns["query"]["attention_mask"])
        pos = model(columns["pos"]["input_ids"], columns["pos"]["attention_mask"])
        if "neg" not in columns:
            return query, pos, None
        neg = model(columns["neg"]["input_ids"], columns["neg"]["attention_mask"])
        return query, pos, neg.view(query.shape[0], k, -1)
    packed, counts = pack_columns(columns, pad_token_id)
    if chunks is None:
        chunks = num_chunks(packed["input_ids"].shape[0], chunk_size)
    embeddings = _encode_chunks(model, packed, plan_chunks(packed["attention_mask"], chunks))
    return _split_columns(embeddings, counts, k)


# ------------------------------------------------------------------------------------------------ GradCache


class ChunkBackward:
    """How GradCache back-propagates one chunk's surrogate loss; one instance per step.

    `chunk(last)` wraps each chunk's forward and backward (e.g. DDP's `no_sync`), `backward(surrogate)` runs the
    backward, `finish()` ends the step's backward work (e.g. DeepSpeed's `engine.step()`).
    """

    def steps(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def chunk(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, surrogate: Tensor) -> None:
        surrogate.backward()

    def finish(self) -> None:
        pass


class PlainBackward(ChunkBackward):
    """One process, no wrapper: `surrogate.backward()`."""


class AcceleratorBackward(ChunkBackward):
    """GradCache chunk backward under Accelerate (DDP, single device, or DeepSpeed ZeRO-1/2/3).

    `coalesce`: under DeepSpeed, reduce the chunks' gradients once per step with `engine.coalesce_grad_reduction`
    where the installed DeepSpeed and the configuration allow it (see the module docstring); ZeRO-2/3 then hold
    unpartitioned gradients until the step's end. False: every chunk is a gradient-accumulation micro-step.
    """

    def __init__(self, accelerator, model: nn.Module, coalesce: bool = True) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.model = model
        self.sync = accelerator.sync_gradients
        self.engine = None
        self.coalesce = False
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.engine = accelerator.deepspeed_engine_wrapped.engine
            self.coalesce = coalesce and self.sync and _can_coalesce(self.engine)

    def steps(self) -> contextlib.AbstractContextManager:
        if self.coalesce:
            return self.engine.coalesce_grad_reduction()
        return contextlib.nullcontext()

    def chunk(self, last: bool) -> contextlib.AbstractContextManager:
        if self.engine is not None:
            if not self.coalesce:
                # Set before the chunk's forward, as DeepSpeed asks; the step's last chunk closes the micro-step.
                self.engine.set_gradient_accumulation_boundary(self.sync and last)
            return contextlib.nullcontext()
        # DDP: all-reduce once, in the last chunk's backward (at an accumulation boundary; `accumulate` already
        # disables syncing in between).
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, surrogate: Tensor) -> None:
        if self.engine is not None:
            # Scales by 1/grad_accum_steps and applies the fp16 loss scale, as for a plain loss.
            self.engine.backward(surrogate)
        else:
            self.accelerator.backward(surrogate)

    def finish(self) -> None:
        if self.engine is not None and self.sync:
            # What Accelerate's DeepSpeedEngineWrapper.backward does after the boundary micro-step.
            self.engine.step()


def _can_coalesce(engine) -> bool:
    if not hasattr(engine, "coalesce_grad_reduction"):
        return False
    if int(engine.zero_optimization_stage()) not in (1, 2, 3) or engine.gradient_accumulation_steps() != 1:
        return False
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        return False
    # BF16_Optimizer / FP16_Optimizer wrappers bypass the ZeRO hooks this relies on.
    return hasattr(engine.optimizer, "_coalesce_grad_reduction")


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextlib.contextmanager
def _replay_rng(state: tuple[Tensor, list[Tensor]], devices: list[int]) -> Iterator[None]:
    """Run the block from a saved (CPU, CUDA) RNG state, leaving the global RNG where it was."""
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(devices, state[1]):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


class GradCache:
    """One step of GradCache over a collated side's columns.

    Usage::

        cache = GradCache(model, columns, k, chunks, pad_token_id, autocast)
        query, pos, neg = cache.embeddings          # detached leaves that require grad
        loss = loss_fn(query, pos, neg, ...)
        cache.backward(loss, AcceleratorBackward(accelerator, model))

    `autocast` is a context-manager factory applied to every chunk forward (e.g. `accelerator.autocast`).
    """

    def __init__(self, model: nn.Module, columns: Mapping[str, Features], k: int, chunks: int,
                 pad_token_id: int = 0, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model = model
        self.autocast = autocast or contextlib.nullcontext
        self.features, self.counts = pack_columns(columns, pad_token_id)
        self.plan = plan_chunks(self.features["attention_mask"], chunks)
        self.left = _left_padded(self.features["attention_mask"])
        self.devices = _rng_devices()
        self.rng_states: list[tuple[Tensor, list[Tensor]]] = []
        outputs = []
        with torch.no_grad():
            for chunk in self.plan:
                self.rng_states.append((torch.get_rng_state(),
                                        [torch.cuda.get_rng_state(d) for d in self.devices]))
                with self.autocast():
                    out = model(*_chunk_features(self.features, chunk, self.left))
                if chunk.rows.numel():
                    outputs.append(out)
        order = torch.cat([c.rows for c in self.plan if c.rows.numel()])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        # One leaf for all texts: the loss's gradient w.r.t. every embedding lands in `self.leaf.grad`.
        self.leaf = torch.cat(outputs)[inverse].detach().requires_grad_()
        self.embeddings = _split_columns(self.leaf, self.counts, k)

    def backward(self, loss: Tensor, chunk_backward: ChunkBackward | None = None) -> None:
        """Back-propagate `loss` to the embeddings, then through the encoder chunk by chunk."""
        chunk_backward = chunk_backward or PlainBackward()
        # Only the embedding leaf (and, across ranks, the all-gather's reduce-scatter) is in this graph.
        loss.backward()
        grad = self.leaf.grad
        if grad is None:
            grad = torch.zeros_like(self.leaf)
        last = len(self.plan) - 1
        with chunk_backward.steps():
            for i, (chunk, state) in enumerate(zip(self.plan, self.rng_states)):
                with chunk_backward.chunk(i == last), _replay_rng(state, self.devices):
                    with self.autocast():
                        out = self.model(*_chunk_features(self.features, chunk, self.left))
                    if chunk.rows.numel():
                        surrogate = (out.float() * grad[chunk.rows].float()).sum()
                    else:
                        surrogate = out.float().sum() * 0
                    chunk_backward.backward(surrogate)
        chunk_backward.finish()
        self.leaf.grad = None
