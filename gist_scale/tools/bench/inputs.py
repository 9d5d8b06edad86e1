"""What every mode of a benchmark case shares, made locally so that nothing is downloaded: random models in the
sentence-transformers layout with their tokenizers, synthetic training rows, and the DeepSpeed configs.

Sizes are BERT configs with BERT's 30522-token vocabulary (`tiny` 2x32, `small` 12x384, `base` 12x768, `large`
24x1024) and Qwen3 decoders with last-token pooling (`qwen3-tiny` 2x32, the shapes of Qwen3-Embedding-0.6B and -8B).
The tokenizer maps the word `tok123` to one token, so a text of N words is N tokens plus the specials: [CLS] .. [SEP]
for BERT, the EOS (the [SEP] id, also the pad token: the common pad == EOS case) for a decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from gist_scale.st_format import export_sentence_transformer

__all__ = ["SIZES", "DECODER_SIZES", "LORA_TARGETS", "MAX_LENGTH", "ZERO_SETTINGS", "CLS", "SEP", "PAD",
           "bench_tokenizer", "build_model_dir", "deepspeed_config", "lora_targets", "pooling_of",
           "write_mining_inputs", "write_rows"]

SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
DECODER_SIZES = {
    "qwen3-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       intermediate_size=64),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288),
}
"""Qwen3 decoders (last-token pooling on the EOS, which is also the pad token), with the 30522-token vocabulary."""
BF16_SIZES = {"qwen3-8b"}
"""Sizes written (hence loaded, by us and sentence-transformers alike) in bf16: 7B parameters in fp32 would take
28 GB of disk and of accelerator memory; with LoRA the frozen base in bf16 is how such a model is trained."""
LORA_TARGETS = {"bert": ["query", "key", "value", "dense"],
                "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
"""`--lora-r` targets: every linear layer of attention and MLP (the trainer's default `all-linear` on the student)."""
MAX_LENGTH = 512
"""Position embeddings of every size, and the trainer's `max_length` for student and guide: no text is cut."""
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
VOCAB = 30522
ZERO_SETTINGS = {
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    3: {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
        "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": "auto"},
}


def deepspeed_config(stage: int) -> dict:
    """`ds_configs/zero{stage}.json`, carried in code so that a pip-installed package has it (a test keeps them
    equal). Its `"auto"` entries are the trainer's to fill, as for the shipped files."""
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": dict(ZERO_SETTINGS[stage]), "steps_per_print": 1_000_000,
            "wall_clock_breakdown": False}


def pooling_of(size: str) -> str:
    return "last_token" if size in DECODER_SIZES else "mean"


def lora_targets(size: str) -> list[str]:
    return LORA_TARGETS["qwen3" if size in DECODER_SIZES else "bert"]


def bench_tokenizer(decoder: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a generated vocabulary of BERT's size and special-token ids ([PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102): BERT's [CLS] .. [SEP], or for a decoder the text then [SEP] as its EOS and pad token."""
    tokens = (["[PAD]"] + [f"[unused{i}]" for i in range(UNK - 1)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
              + [f"tok{i}" for i in range(VOCAB - MASK - 1)])
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [("[CLS]", CLS), ("[SEP]", SEP)]
    if decoder:
        backend.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=specials[1:])
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[SEP]",
                                       pad_token="[SEP]")
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")


def build_model_dir(size: str, root: Path, dropout: float, seed: int, device: torch.device | None = None) -> Path:
    """A random BERT (mean pooling) or Qwen3 (last-token pooling) of `size` in sentence-transformers layout, with
    `bench_tokenizer`. Initialised on `device` (on a GPU, seconds instead of minutes for a 7B model)."""
    out = root / size
    if out.exists():
        return out
    torch.manual_seed(seed)
    if size in DECODER_SIZES:
        config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=MAX_LENGTH, attention_dropout=dropout,
                             eos_token_id=SEP, pad_token_id=SEP, bos_token_id=None, **DECODER_SIZES[size])
        with torch.device(device or "cpu"):
            encoder = Qwen3Model(config)
        if size in BF16_SIZES:
            encoder = encoder.to(torch.bfloat16)
    else:
        config = BertConfig(vocab_size=VOCAB, max_position_embeddings=MAX_LENGTH, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, **SIZES[size])
        # With its (unused) pooler, as real checkpoints have: sentence-transformers keeps it, `Embedder` drops it.
        encoder = BertModel(config)
    export_sentence_transformer(encoder, bench_tokenizer(size in DECODER_SIZES), pooling_of(size), False, MAX_LENGTH,
                                out)
    return out


def _text(rng: np.random.Generator, span: tuple[int, int], specials: int) -> str:
    """Random vocabulary words (`tok123` is one token): the length uniform in `span`, less `specials` (the special
    tokens that tokenization adds)."""
    length = int(rng.integers(span[0], span[1] + 1)) - specials
    return " ".join(f"tok{i}" for i in rng.integers(0, VOCAB - MASK - 1, length))


def _write_texts(path: Path, rows: int, spans: dict[str, tuple[int, int]], seed: int, specials: int = 0) -> Path:
    """`rows` JSON lines, each a random text per column of `spans` (`_text`)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({column: _text(rng, span, specials) for column, span in spans.items()}) + "\n")
    return path


def write_rows(path: Path, rows: int, query_len: tuple[int, int], doc_len: tuple[int, int], decoder: bool,
               seed: int) -> Path:
    """`rows` training triplets (`query`, `pos`, `neg`, one task) as JSONL, each text's token length, specials
    included, uniform in `query_len` or `doc_len`: what the trainer reads, tokenizes, samples and collates."""
    return _write_texts(path, rows, {"query": query_len, "pos": doc_len, "neg": doc_len}, seed, 1 if decoder else 2)


def write_mining_inputs(root: str | Path, size: str, rows: int) -> None:
    """Inputs for timing `gist-scale mine` (`launch/bench_gpu.sh`): a random BERT guide `ROOT/SIZE`
    (`build_model_dir`, seed 0) and `ROOT/pairs.jsonl`, `rows` (query, pos) pairs of random vocabulary words, lengths
    in words uniform in 8-32 (query) and 32-120 (pos)."""
    build_model_dir(size, Path(root), 0.0, 0)
    _write_texts(Path(root) / "pairs.jsonl", rows, {"query": (8, 32), "pos": (32, 120)}, 0)
