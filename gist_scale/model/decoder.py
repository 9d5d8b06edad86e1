"""Decoder LLMs as embedders (Qwen2/Qwen3, Llama, Mistral, Gemma 2/3, ...): detection, EOS, forward arguments.

A decoder embedder (Qwen3-Embedding, gte-Qwen2, e5-mistral) reads the text causally and takes the hidden state of
an end-of-sequence token appended to it (`last_token` pooling): only that position has seen the whole text. Three
rules make this exact under any padding:

* **The EOS is part of tokenization.** When the tokenizer does not append EOS itself (most base LLM tokenizers), an
  EOS step is added to its post-processor (`ensure_eos`), the way Qwen3-Embedding's own `tokenizer.json` does it.
  Every path that tokenizes (training data, guide cache, evaluation) and sentence-transformers loading the exported
  directory then appends it the same way, and truncation keeps room for it.
* **Pooling reads the attention mask, never token ids.** The common pad token is the EOS token itself; the last
  attended position is the EOS whether the batch is padded left or right (`gist_scale.model.embedder.pool`).
* **Positions come from the mask** (`forward_kwargs`): a left-padded text gets the positions it has alone, so its
  embedding does not depend on its batch neighbours (RoPE is shift-invariant in exact arithmetic, not in floats).

Nothing here is per family: a model is a decoder when `transformers` knows a causal-LM head for its type and no
masked-LM head (BERT-likes have both), or when its config names a `...ForCausalLM` architecture.
"""

from __future__ import annotations

import json

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from gist_scale.config import ConfigError

__all__ = ["check_pooling", "ensure_eos", "forward_kwargs", "is_decoder"]


def is_decoder(config: PretrainedConfig) -> bool:
    """True for a decoder-only LLM (causal attention), from its config alone (any object with its attributes)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    architectures = getattr(config, "architectures", None) or []
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or any(name.endswith("ForCausalLM") for name in architectures))


def check_pooling(config: PretrainedConfig, pooling: str, section: str) -> None:
    """Refuse `cls` pooling on a decoder: its first token has attended to nothing but itself."""
    if pooling == "cls" and is_decoder(config):
        raise ConfigError(f"{section}.pooling=cls: {config.model_type} is a decoder (causal attention), so its first "
                          f"token has seen only itself and carries nothing of the text; use --{section}.pooling "
                          "last_token (the appended EOS token, which has seen the whole text) or mean")


def forward_kwargs(attention_mask: torch.Tensor) -> dict:
    """Extra decoder forward arguments: positions counted over real tokens only, and no KV cache."""
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return {"position_ids": positions, "use_cache": False}


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def _special(eos: str, type_id: int) -> dict:
    return {"SpecialToken": {"id": eos, "type_id": type_id}}


def _with_eos(processor: dict | None, eos: str, eos_id: int) -> dict:
    """The post-processor JSON with an EOS appended: into the last template (keeping its BOS), else in a template
    of its own after the other steps."""
    if processor is None:  # nothing to keep: a template of the texts alone, which gets the EOS below
        a, b = ({"Sequence": {"id": name, "type_id": type_id}} for type_id, name in enumerate("AB"))
        processor = {"type": "TemplateProcessing", "single": [a], "pair": [a, b], "special_tokens": {}}
    if processor["type"] == "TemplateProcessing":
        pair = list(processor["pair"])
        last_a = max((i for i, piece in enumerate(pair) if piece.get("Sequence", {}).get("id") == "A"), default=0)
        pair.insert(last_a + 1, _special(eos, 0))
        return {**processor, "single": processor["single"] + [_special(eos, 0)], "pair": pair + [_special(eos, 1)],
                "special_tokens": {**processor["special_tokens"], eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}}
    steps = list(processor["processors"]) if processor["type"] == "Sequence" else [processor]
    templates = [i for i, step in enumerate(steps) if step["type"] == "TemplateProcessing"]
    if templates:
        steps[templates[-1]] = _with_eos(steps[templates[-1]], eos, eos_id)
    else:
        steps.append(_with_eos(None, eos, eos_id))
    return {"type": "Sequence", "processors": steps}


def ensure_eos(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """Make a decoder's tokenizer append its EOS token to every text, unless it already does.

    Done in the fast tokenizer's post-processor, so truncation keeps room for the EOS (a cut text still ends with
    it) and `save_pretrained` writes it into `tokenizer.json`, where sentence-transformers finds it.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{name}: the tokenizer of this decoder has no EOS token, which last_token pooling reads; "
                          "use a tokenizer with an eos_token")
    if appends_eos(tokenizer):
        return tokenizer
    if not tokenizer.is_fast:
        raise ConfigError(f"{name}: a decoder embedder needs a fast (tokenizers) tokenizer to append EOS")
    from tokenizers import Tokenizer

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend["post_processor"] = _with_eos(backend.get("post_processor"), tokenizer.eos_token, tokenizer.eos_token_id)
    tokenizer.backend_tokenizer.post_processor = Tokenizer.from_str(json.dumps(backend)).post_processor
    assert appends_eos(tokenizer), f"{name}: appending EOS to the tokenizer failed"
    return tokenizer
