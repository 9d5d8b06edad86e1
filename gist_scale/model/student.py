"""The trainable student as training builds it: the pretrained encoder (`gist_scale.model.loading`), LoRA adapters
on it when `model.lora_r > 0` (`gist_scale.model.lora`), and the `Embedder` around it (pooling, normalization,
prompts).

Composed here rather than in `loading.py` because LoRA's export builds a fresh base encoder through `loading`
(`lora.merged_encoder`): loading then needs nothing from `lora`, and the arrows all point one way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from accelerate import init_empty_weights
from transformers import PreTrainedModel

from gist_scale.config import ModelConfig
from gist_scale.model.embedder import Embedder
from gist_scale.model.loading import base_encoder
from gist_scale.model.lora import add_lora
from gist_scale.model.prompts import Prompts

__all__ = ["load_student", "student_encoder"]


def student_encoder(cfg: ModelConfig, *, weights: bool = True, remote_code_option: str | None = None
                    ) -> PreTrainedModel:
    """The student's `transformers` encoder as training builds it: `base_encoder` (config with `model.dropout`,
    pooler dropped, gradient checkpointing), then LoRA adapters. `weights=False` builds it on the meta device,
    adapters included, reading no weight file: what `gist_scale.memory` counts for a dry run.

    `remote_code_option` names the switch that sets `cfg.trust_remote_code` when a custom-code model is refused
    without it (default `--model.trust_remote_code true`).
    """
    encoder = base_encoder(cfg, weights=weights, remote_code_option=remote_code_option)
    if not cfg.lora_r:
        return encoder
    with contextlib.nullcontext() if weights else init_empty_weights():
        return add_lora(encoder, cfg)


def load_student(cfg: ModelConfig, instructions: Mapping[str, str] | None = None, *,
                 remote_code_option: str | None = None) -> Embedder:
    """Load the trainable student (`student_encoder`) with its pooling and prompts.

    `instructions` (task -> instruction, `data.task_instructions`) become named prompts next to `query`/`document`.
    """
    return Embedder(student_encoder(cfg, remote_code_option=remote_code_option), cfg.pooling, cfg.normalize,
                    cfg.pool_prompt, Prompts.from_config(cfg, instructions).named())
