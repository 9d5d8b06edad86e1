"""Device side of a step's encoding: run the planned chunks, restore text order, and GradCache.

Chunked encoding
----------------
:func:`encode_chunked` encodes each chunk that :func:`gist_scale.chunking.chunk_texts` planned (on the host, in the
collator) in one forward call and puts the embeddings back in their original order. The embeddings are those of
one padded call (padded positions are masked out of attention and pooling; tests check this), while the FLOPs spent
on padding shrink, and the number of forward calls per step is ``ceil(texts / chunk_size)`` instead of one per
column. That matters under ZeRO-3, where every forward call re-gathers the partitioned parameters.

GradCache
---------
:class:`GradCache` makes the batch size independent of activation memory (Gao et al. 2021, "Scaling deep
contrastive learning batch size under memory limited setup"): embed every chunk without autograd, compute the loss
over the whole (global) batch on those embeddings as leaves, back-propagate the loss to the embeddings only, then
re-encode chunk by chunk with autograd, replaying each chunk's dropout RNG, and back-propagate the cached
embedding gradient through each chunk (``backward(sum(embedding * cached_grad))``). The parameter gradients are
those of the plain step; only one chunk's activations are alive at a time.

How each chunk's backward reaches the parameters is the job of a :class:`ChunkBackward`:

* :class:`ChunkBackward` itself: ``surrogate.backward()`` (one process, the benchmark).
* :class:`AcceleratorBackward`: the training loop under Accelerate. DDP: all chunks but the last run under
  ``accelerator.no_sync(model)``, so gradients are all-reduced once per step. DeepSpeed: Accelerate's own
  ``accelerator.backward`` would call ``engine.step()`` after *every* call, so the engine is driven directly:
  inside ``engine.coalesce_grad_reduction()`` (deepspeedai/DeepSpeed#7992, since 0.19.1, our floor; ZeRO-1/2/3
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
from collections.abc import Callable, Iterator, Mapping

import torch
from accelerate.utils import DistributedType
from packaging.version import Version
from torch import Tensor, nn

from gist_scale.chunking import COLUMNS, ChunkedTexts, Features
from gist_scale.config import ConfigError

__all__ = ["AcceleratorBackward", "ChunkBackward", "GradCache", "embed_frozen", "encode_chunked", "encode_columns",
           "require_deepspeed_for_grad_cache", "split_columns"]


def encode_chunked(model: nn.Module, chunked: ChunkedTexts) -> Tensor:
    """Embed chunked texts, one forward call per chunk: `[N, D]` in text order (column order, as packed).

    Every feature of a chunk goes to the model by name (`input_ids`, `attention_mask`, and `prompt_length` when
    prompts are left out of pooling), here and in every other forward of this module. The placeholders' outputs are
    added at weight 0: that keeps them in the graph, so every rank runs the same forward and backward calls."""
    outputs = [model(**c) for c in chunked.chunks]
    embeddings = torch.cat(outputs[:chunked.real_chunks])[chunked.inverse]
    for placeholder in outputs[chunked.real_chunks:]:
        embeddings = embeddings + placeholder.sum().to(embeddings.dtype) * 0
    return embeddings


def split_columns(embeddings: Tensor, counts: Mapping[str, int], k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """`[N, D]` text-order embeddings to `(query [B, D], positive [B, D], negatives [B, K, D] or None)`."""
    parts = dict(zip(counts, embeddings.split(list(counts.values()))))
    query, pos, neg = (parts.get(column) for column in COLUMNS)
    return query, pos, None if neg is None else neg.view(query.shape[0], k, -1)


def encode_columns(model: nn.Module, columns: Mapping[str, Features] | ChunkedTexts,
                   k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Embed a collated side: `(query [B, D], positive [B, D], negatives [B, K, D] or None)`.

    `columns` chunked (:class:`ChunkedTexts`, from the collator or :func:`chunk_texts`): one forward call per chunk,
    no device reads. Column features: one forward call per column, each padded to its own longest text.
    """
    if isinstance(columns, ChunkedTexts):
        return split_columns(encode_chunked(model, columns), columns.counts, k)
    query, pos, neg = (model(**columns[column]) if column in columns else None for column in COLUMNS)
    return query, pos, None if neg is None else neg.view(query.shape[0], k, -1)


def embed_frozen(model: nn.Module, columns: Mapping[str, Features] | ChunkedTexts,
                 k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`encode_columns` for a frozen model (the guide): under inference mode, returned as ordinary tensors.

    Inference tensors cannot enter the autograd graph that the loss builds around them, hence the clones.
    """
    with torch.inference_mode():
        embeddings = encode_columns(model, columns, k)
    return tuple(None if e is None else e.clone() for e in embeddings)


# ------------------------------------------------------------------------------------------------ GradCache


class ChunkBackward:
    """How GradCache back-propagates one chunk's surrogate loss; one instance per step. This base class is the
    plain single-process case: `surrogate.backward()`.

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


class AcceleratorBackward(ChunkBackward):
    """GradCache chunk backward under Accelerate (DDP, single device, or DeepSpeed ZeRO-1/2/3).

    `coalesce`: under DeepSpeed, reduce the chunks' gradients once per step with `engine.coalesce_grad_reduction`
    where the installed DeepSpeed and the configuration allow it (see the module docstring); ZeRO-2/3 then hold
    unpartitioned gradients until the step's end. False: every chunk is a gradient-accumulation micro-step.
    """

    def __init__(self, accelerator, model: nn.Module, coalesce: bool = True) -> None:
        self.accelerator, self.model, self.sync = accelerator, model, accelerator.sync_gradients
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.engine = accelerator.deepspeed_engine_wrapped.engine if deepspeed else None
        self.coalesce = deepspeed and coalesce and self.sync and _can_coalesce(self.engine)

    def steps(self) -> contextlib.AbstractContextManager:
        return self.engine.coalesce_grad_reduction() if self.coalesce else contextlib.nullcontext()

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
    if int(engine.zero_optimization_stage()) not in (1, 2, 3) or engine.gradient_accumulation_steps() != 1:
        return False
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        return False
    # BF16_Optimizer / FP16_Optimizer wrappers bypass the ZeRO hooks this relies on.
    return hasattr(engine.optimizer, "_coalesce_grad_reduction")


DEEPSPEED_FOR_GRAD_CACHE = "0.19.1"
"""The first DeepSpeed release with `engine.coalesce_grad_reduction` (deepspeedai/DeepSpeed#7992, which came after
#7981's fix of the chunk gradients that the micro-step path dropped); the `deepspeed` floor in pyproject.toml."""


def require_deepspeed_for_grad_cache(version: str) -> None:
    """Refuse GradCache under DeepSpeed ZeRO with a release that silently loses chunk gradients."""
    if Version(version) < Version(DEEPSPEED_FOR_GRAD_CACHE):
        raise ConfigError(f"train.grad_cache=true under DeepSpeed ZeRO needs deepspeed>={DEEPSPEED_FOR_GRAD_CACHE} "
                          f"(installed: {version}; older releases drop all but the last chunk's gradients): pip "
                          "install -U deepspeed, or train without GradCache")


@contextlib.contextmanager
def _replay_rng(state: tuple[Tensor, list[Tensor]], devices: list[int]) -> Iterator[None]:
    """Run the block from a saved (CPU, CUDA) RNG state, leaving the global RNG where it was."""
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(devices, state[1]):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


class GradCache:
    """One step of GradCache over a side's chunked texts.

    Usage::

        cache = GradCache(model, chunked, k, autocast)   # chunked: ChunkedTexts from the collator
        query, pos, neg = cache.embeddings                # views of a detached leaf that requires grad
        loss, stats = loss_fn(query, pos, neg, ...)
        cache.backward(loss, AcceleratorBackward(accelerator, model))

    `autocast` is a context-manager factory applied to every chunk forward (e.g. `accelerator.autocast`).
    """

    def __init__(self, model: nn.Module, chunked: ChunkedTexts, k: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.model, self.chunked, self.autocast = model, chunked, autocast or contextlib.nullcontext
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.devices = [torch.cuda.current_device()] if cuda else []
        self.rng_states: list[tuple[Tensor, list[Tensor]]] = []
        outputs = []
        with torch.no_grad(), self.autocast():
            for chunk in chunked.chunks[:chunked.real_chunks]:
                self.rng_states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]))
                outputs.append(model(**chunk))
            # Placeholder chunks contribute nothing to the embeddings; their forward runs in `backward`.
        # One leaf, in chunk order, for all texts: the loss's gradient w.r.t. every embedding lands in its `.grad`.
        self.leaf = torch.cat(outputs).detach().requires_grad_()
        self.embeddings = split_columns(self.leaf[chunked.inverse], chunked.counts, k)

    def backward(self, loss: Tensor, chunk_backward: ChunkBackward | None = None) -> None:
        """Back-propagate `loss` to the embeddings, then through the encoder chunk by chunk."""
        chunk_backward = chunk_backward or ChunkBackward()
        # Only the embedding leaf (and, across ranks, the all-gather's reduce-scatter) is in this graph.
        loss.backward()
        grad = self.leaf.grad if self.leaf.grad is not None else torch.zeros_like(self.leaf)
        grads = grad.float().split(self.chunked.chunk_rows)
        with chunk_backward.steps():
            for i, chunk in enumerate(self.chunked.chunks):
                real = i < self.chunked.real_chunks
                # Placeholders draw no dropout mask worth replaying: their output is multiplied by zero.
                replay = _replay_rng(self.rng_states[i], self.devices) if real else contextlib.nullcontext()
                with chunk_backward.chunk(i == len(self.chunked.chunks) - 1), replay:
                    with self.autocast():
                        out = self.model(**chunk)
                    surrogate = (out.float() * grads[i]).sum() if real else out.float().sum() * 0
                    chunk_backward.backward(surrogate)
        chunk_backward.finish()
        self.leaf.grad = None
