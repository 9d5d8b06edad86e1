"""Sharded inference: embedding a list of texts across all ranks, every rank receiving every embedding.

The one place where the work of running an embedder without gradients is split over ranks. `encode_texts` serves
evaluation (`gist_scale.evaluation`, in training and in `gist-scale eval`), mteb's encoder and `gist-scale mine`;
`gist-scale cache-guide` (`gist_scale.guide_cache`) splits its rows with the same `shards`, but embeds them as
training's guide does and writes a file per rank instead of gathering (see there why).

The collectives themselves are in `gist_scale.distributed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gist_scale import distributed
from gist_scale.chunking import num_chunks
from gist_scale.model.prompts import prompt_length

__all__ = ["encode_texts", "inference_mode", "shards"]


def shards(count: int, world: int) -> list[range]:
    """Every rank's contiguous share of `count` items, in rank order: sizes differ by at most one, larger shards
    first (as `numpy.array_split`), so gathering the shards in rank order restores the input order."""
    size, larger = divmod(count, world)
    bounds = [rank * size + min(rank, larger) for rank in range(world + 1)]
    return [range(begin, end) for begin, end in zip(bounds, bounds[1:])]


@contextlib.contextmanager
def inference_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` without gradients and in eval mode (no dropout); each submodule's mode is restored afterwards.

    `torch.inference_mode`, except under ZeRO-3, where parameters gathered in inference mode become inference
    tensors that the next training step cannot use ("Inference tensors cannot be saved for backward"), so
    `torch.no_grad` is used.
    """
    modes = {submodule: submodule.training for submodule in module.modules()}
    # DeepSpeed ZeRO-3 tags each parameter it partitioned with a `ds_id`.
    no_grad = torch.no_grad if any(hasattr(p, "ds_id") for p in module.parameters()) else torch.inference_mode
    module.eval()
    try:
        with no_grad():
            yield
    finally:
        for submodule, training in modes.items():
            submodule.train(training)


def encode_texts(embedder: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                 batch_size: int, device: torch.device | str,
                 autocast: Callable[[], AbstractContextManager] | None = None, prompt: str = "") -> torch.Tensor:
    """Embed `texts` across all ranks; every rank returns all `len(texts)` embeddings, fp32, in input order.

    `prompt` is prepended to every text (as in training); an embedder that leaves prompts out of pooling
    (`include_prompt=False`) is given its length.

    Each rank tokenizes and embeds its contiguous shard (`shards`) in batches of `batch_size`, longest texts first
    (batches of similar lengths waste little padding, and the peak memory shows up in the first batch), then the
    shards are all-gathered. Every rank must call this with the same texts.

    Under DeepSpeed ZeRO-3 every forward all-gathers the parameters of each layer from all ranks, so a rank that
    ran fewer forwards than its peers would leave them waiting in that collective forever. Shards differ by at
    most one text, which can mean one batch more on some ranks: the others then run a dummy batch (one real text,
    output discarded) so that every rank runs exactly the same number of forwards.

    Runs under `inference_mode` (eval mode, no gradients, ZeRO-3 aware). `autocast` (e.g. `accelerator.autocast`)
    wraps the forwards.
    """
    counts = distributed.gather_sizes(len(texts))
    if len(set(counts)) != 1:
        # Every rank sees the same counts and raises together, before any forward.
        raise ValueError(f"ranks were given different numbers of texts to encode: {counts}; build the eval data "
                         "identically on every rank")
    if not texts:
        return torch.empty(0, 0, device=device)
    parts = shards(len(texts), distributed.world_size())
    sizes = [len(part) for part in parts]
    shard = [prompt + texts[i] for i in parts[distributed.rank()]]
    # The shard's texts and, last, the dummy batch's one text (texts[0], which every rank has).
    *ids, dummy = tokenizer(shard + [prompt + texts[0]], truncation=True, max_length=max_length,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    num_batches = num_chunks(max(sizes), batch_size)  # the same on every rank, without a collective
    excluded = prompt_length(tokenizer, prompt) if not getattr(embedder, "include_prompt", True) else None

    outputs: list[torch.Tensor] = []
    with inference_mode(embedder), (autocast or contextlib.nullcontext)():
        for begin in range(0, num_batches * batch_size, batch_size):
            rows = order[begin:begin + batch_size]  # empty past this rank's texts: the dummy batch
            sequences = [ids[i] for i in rows] or [dummy]
            features = tokenizer.pad({"input_ids": sequences}, padding="longest", return_attention_mask=True,
                                     return_tensors="pt").to(device)
            if excluded is not None:
                features["prompt_length"] = torch.full((len(sequences),), excluded, device=device)
            embeddings = embedder(**features)
            if rows:
                outputs.append(embeddings.float())
            dim = embeddings.shape[-1]
    # Outside inference mode: these ops turn inference tensors into normal ones that any later code may use.
    local = torch.empty(len(shard), dim, device=device)
    if outputs:
        local[torch.tensor(order, device=device)] = torch.cat(outputs)  # the batches in order are `order`
    return distributed.gather_no_grad(local, sizes)
