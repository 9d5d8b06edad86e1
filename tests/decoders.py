"""Tiny random decoder LLMs for tests, built from configs, with a byte-level BPE tokenizer trained on the shipped
sample's text: no downloads.

`build_tokenizer(style)`:
* `qwen`: no BOS, EOS `<|endoftext|>` which is also the pad token, no post-processor (Qwen2/Qwen3 base models);
* `qwen-eos`: the same, but the tokenizer already appends EOS (Qwen3-Embedding's hub tokenizer);
* `llama`: BOS `<s>` added by a template, EOS `</s>`, no pad token (Llama, Mistral, Gemma).

`build_decoder(family, out)` saves a 2-layer decoder of that family with its tokenizer style; `conftest.py` exposes it
as the session fixture `tiny_decoder_dir(family)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gist_scale.data import sample_data_path

SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>"]
FAMILIES = {
    # family: (model_type, tokenizer style, extra config)
    "qwen3": ("qwen3", "qwen", {"head_dim": 16}),
    "qwen3-eos": ("qwen3", "qwen-eos", {"head_dim": 16}),
    "llama": ("llama", "llama", {}),
    "mistral": ("mistral", "llama", {"sliding_window": None}),
    "gemma2": ("gemma2", "llama", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}),
    "gemma3": ("gemma3_text", "llama", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}),
}
VOCAB_SIZE = 384


def _sample_texts() -> list[str]:
    texts = []
    with sample_data_path("train").open() as f:
        for line in f:
            row = json.loads(line)
            texts += [row["query"], row["pos"], row["neg"]]
    return texts


def build_tokenizer(style: str):
    """A `transformers` fast tokenizer: byte-level BPE trained on the WordNet sample (a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_sample_texts(), trainer)
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    if style in ("qwen", "qwen-eos"):
        if style == "qwen-eos":
            backend.post_processor = processors.TemplateProcessing(
                single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
                special_tokens=[("<|endoftext|>", ids["<|endoftext|>"])])
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", ids["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    raise ValueError(f"unknown tokenizer style {style!r}")


def build_decoder(family: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random decoder of `family` (see `FAMILIES`) with its tokenizer into `out`."""
    from transformers import AutoConfig, AutoModel

    model_type, style, extra = FAMILIES[family]
    tokenizer = build_tokenizer(style)
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **extra)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
