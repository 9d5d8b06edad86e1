"""LoRA adapters on the student, with peft: adding them, checkpointing only them, and exporting them.

With `model.lora_r > 0` the student's encoder becomes a `peft.PeftModel`: its base weights are frozen, so only the
adapters reach the optimizer (`build_optimizer` takes trainable parameters) and, under ZeRO-3, the base weights stay
partitioned like any others (DeepSpeed converts the adapters peft adds after `zero.Init` when it initializes).

Gradient checkpointing needs no `enable_input_require_grads` here: that hook exists for reentrant checkpointing,
whose recomputed block gets no gradient when its input (the frozen embeddings' output) does not require one; the
student uses non-reentrant checkpointing, which back-propagates to the adapters either way (tested).

Checkpoints hold the adapters and their optimizer state, not the frozen base, which `--resume` reloads from
`model.name` like at the start (`gist_scale.trainer.student.LoRAFineTuning.checkpoint_kwargs`). Export gathers the
adapters alone (`adapter_state_dict`) and writes them, and the merged model, from a fresh copy of the base
(`merged_encoder`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import PreTrainedModel

from gist_scale.config import ConfigError, ModelConfig
from gist_scale.model.loading import base_encoder, outside_zero3

__all__ = ["ALL_LINEAR", "adapter_state_dict", "add_lora", "merged_encoder"]

ALL_LINEAR = "all-linear"
"""peft's shorthand for every linear layer except an output head (an `AutoModel` encoder has none)."""
_LAYER_PREFIX = re.compile(r"^.*?\.\d+\.")


def add_lora(encoder: PreTrainedModel, cfg: ModelConfig) -> PeftModel:
    """Freeze `encoder` and wrap it with LoRA adapters; a target list matching no linear layer is a ConfigError."""
    targets = ALL_LINEAR if cfg.lora_target_modules == (ALL_LINEAR,) else list(cfg.lora_target_modules)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    linear = [name for name, module in encoder.named_modules() if isinstance(module, torch.nn.Linear)]
    if config.target_modules != ALL_LINEAR and not any(check_target_module_exists(config, n) for n in linear):
        # Names inside a repeated block, without the block's path: what a user can put in the list.
        inside = sorted({_LAYER_PREFIX.sub("", name) for name in linear})
        raise ConfigError(f"model.lora_target_modules={list(cfg.lora_target_modules)}: matches no linear layer of "
                          f"{cfg.name}; its linear layers are {', '.join(inside)} (name them by last part or "
                          f"suffix), or use [{ALL_LINEAR}]")
    try:
        model = get_peft_model(encoder, config)
    except ValueError as error:  # e.g. a target that names a non-linear module
        raise ConfigError(f"model.lora_target_modules={list(cfg.lora_target_modules)}: {error}") from error
    # The name the user gave (a hub name stays one), not the local path it was resolved to.
    model.peft_config["default"].base_model_name_or_path = cfg.name
    return model


def adapter_state_dict(accelerator: Accelerator, student: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained adapter weights of the student's encoder (names as in the encoder), whole, on the main process
    (None elsewhere); every rank must call this.

    Only the adapters are gathered from ZeRO-3 partitions (megabytes, not the 16 GB of an 8B base): the frozen base
    is what `model.name` holds on disk. The gather is read-only (`modifier_rank=None`): nothing is broadcast back.
    (`accelerator.get_state_dict`'s gather broadcasts every layer back from rank 0; on CPU/gloo here, any such
    gather left both ranks spinning in the interpreter's final garbage collection, full fine-tuning included.)
    """
    import deepspeed  # its context is a no-op for parameters that ZeRO-3 did not partition

    encoder = accelerator.unwrap_model(student).encoder
    trainable = {name: param for name, param in encoder.named_parameters() if param.requires_grad}
    with deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=None):
        if not accelerator.is_main_process:
            return None
        return {name: param.detach().cpu().clone() for name, param in trainable.items()}


def merged_encoder(cfg: ModelConfig, adapter_state: dict[str, torch.Tensor], adapter_dir: Path,
                   restore_zero3: Callable[[], None] | None) -> PreTrainedModel:
    """The base model from `cfg.name` with the trained adapter merged in; also writes the adapter to `adapter_dir`.

    Main process only, on a fresh copy (`adapter_state` as `adapter_state_dict` returns it):
    merging the live student in place and unmerging afterwards would not restore its base weights bit for bit,
    and training (or a later export) goes on. `restore_zero3` is as for `outside_zero3`: the copy lives on this
    process alone and must not be partitioned.
    """
    with outside_zero3(restore_zero3):
        encoder = add_lora(base_encoder(cfg), cfg)
    loaded = encoder.load_state_dict(adapter_state, strict=False)
    trained = {name for name, param in encoder.named_parameters() if param.requires_grad}
    if loaded.unexpected_keys or trained & set(loaded.missing_keys):
        raise RuntimeError(f"adapter export: the trained state does not fit a fresh LoRA model of {cfg.name} "
                           f"(unexpected {loaded.unexpected_keys[:3]}, missing "
                           f"{sorted(trained & set(loaded.missing_keys))[:3]})")
    encoder.save_pretrained(adapter_dir)
    return encoder.merge_and_unload()
