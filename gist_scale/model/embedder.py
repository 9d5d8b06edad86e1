"""`Embedder`: a `transformers` model followed by pooling and optional L2 normalization.

The student and the guide are the same class; only how they are loaded differs (`gist_scale.model.loading`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from gist_scale.model.decoder import forward_kwargs, is_decoder
from gist_scale.model.prompts import exclude_prompt

__all__ = ["Embedder", "SDPA_MASK_MODEL_TYPES", "pool"]

SDPA_MASK_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
"""Encoders to which `Embedder` hands a ready 4D boolean mask (`[B, 1, 1, L]`, True = attend) under sdpa attention.
Given the 2D mask, transformers reads it back from the device in every forward call (`padding_mask.all()`, to drop
the mask when nothing is padded): a host sync per encoder call, which stalls the launch queue on an accelerator. A
4D mask is passed to sdpa as is; the embeddings are the same (tested)."""

def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
         prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce token states [B, L, H] to one vector per text [B, H].

    Reads only the attention mask, never token ids: a decoder's pad token is often its EOS token. `prompt_lengths`
    ([B], given when prompts are left out of pooling) drops each text's prompt tokens from the pooled positions, as
    sentence-transformers' `Pooling(include_prompt=False)` does (`cls` then takes the first token after the prompt).
    """
    if prompt_lengths is not None:
        attention_mask = exclude_prompt(attention_mask, prompt_lengths)
    if pooling == "cls":
        if prompt_lengths is None:
            return hidden[:, 0]
        first = attention_mask.to(torch.int32).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling != "last_token":  # the config and the sentence-transformers reader refuse it before; a Python caller
        raise ValueError(f"unknown pooling {pooling!r}: use cls, mean or last_token")
    # The last attended position of each row, for right and left padding alike.
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.to(torch.long) * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Embedder(nn.Module):
    """A `transformers` encoder (or decoder LLM) followed by pooling and optional L2 normalization.

    `include_prompt=False` leaves prompt tokens out of pooling when the caller passes each text's `prompt_length`;
    `prompts` are the named prompts (`query`, `document`, ...) that belong to the model, as in sentence-transformers:
    evaluation prepends them and the export writes them.
    """

    def __init__(self, encoder: PreTrainedModel, pooling: str, normalize: bool, include_prompt: bool = True,
                 prompts: dict[str, str] | None = None) -> None:
        super().__init__()
        # `pooling` is checked by the config (`EncoderConfig`) or the sentence-transformers reader (`st_format`).
        self.encoder, self.pooling, self.normalize, self.include_prompt = encoder, pooling, normalize, include_prompt
        self.prompts = dict(prompts or {})
        self.decoder = is_decoder(encoder.config)

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_length: torch.Tensor | None = None) -> torch.Tensor:
        config = self.encoder.config
        extra = forward_kwargs(attention_mask) if self.decoder else {}
        sdpa_mask = config._attn_implementation == "sdpa" and config.model_type in SDPA_MASK_MODEL_TYPES
        encoder_mask = attention_mask.bool()[:, None, None, :] if sdpa_mask else attention_mask
        hidden = self.encoder(input_ids=input_ids, attention_mask=encoder_mask, **extra).last_hidden_state
        embeddings = pool(hidden, attention_mask, self.pooling, None if self.include_prompt else prompt_length)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings
