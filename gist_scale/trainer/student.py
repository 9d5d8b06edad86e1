"""Student policies: what of the student is trained, what a checkpoint holds and what the export writes.

`FullFineTuning` trains every weight, checkpoints them all and exports the whole encoder. `LoRAFineTuning`
(`model.lora_r > 0`, `gist_scale.model.lora`) trains adapters on a frozen base: checkpoints hold the adapters and
their optimizer state (the base is reloaded from `model.name`), and the export writes the adapter alone
(`RUN/final-adapter/`) and the model with it merged (`RUN/final/`). `student_policy` picks one from the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gist_scale.config import ModelConfig
from gist_scale.model import Embedder, load_student, lora
from gist_scale.st_format import export_sentence_transformer

__all__ = ["FullFineTuning", "LoRAFineTuning", "StateKwargs", "StudentPolicy", "student_policy"]


class StateKwargs(NamedTuple):
    """Keyword arguments for `accelerator.save_state` and `accelerator.load_state`."""

    save: dict
    load: dict


class StudentPolicy(ABC):
    """How the student is built, checkpointed and exported; every method but `load` runs on every rank."""

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                 restore_zero3: Callable[[], None] | None) -> None:
        self.cfg, self.tokenizer, self.restore_zero3 = cfg, tokenizer, restore_zero3

    def load(self, instructions: Mapping[str, str]) -> Embedder:
        """The student, with `requires_grad` on what is trained (what `build_optimizer` takes)."""
        return load_student(self.cfg, instructions)

    def checkpoint_kwargs(self, accelerator: Accelerator) -> StateKwargs:
        """Keyword arguments of `accelerator.save_state` / `load_state` (call once, after `prepare`); none: every
        weight is saved and loaded."""
        return StateKwargs({}, {})

    @abstractmethod
    def export(self, accelerator: Accelerator, student: torch.nn.Module, destination: Path) -> None:
        """Write the trained student to `destination` as a sentence-transformers folder (every rank calls it: under
        ZeRO-3 the weights are gathered from every rank's shard; the main process writes)."""

    def _write(self, embedder: Embedder, encoder: PreTrainedModel, destination: Path,
               state_dict: dict[str, torch.Tensor] | None) -> None:
        export_sentence_transformer(encoder, self.tokenizer, self.cfg.pooling, self.cfg.normalize,
                                    self.cfg.max_length, destination, state_dict=state_dict, prompts=embedder.prompts,
                                    include_prompt=embedder.include_prompt)


class FullFineTuning(StudentPolicy):
    """Every weight trained, checkpointed and exported."""

    def export(self, accelerator: Accelerator, student: torch.nn.Module, destination: Path) -> None:
        state_dict = accelerator.get_state_dict(student)
        if not accelerator.is_main_process:
            return
        embedder = accelerator.unwrap_model(student)
        encoder_state = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        self._write(embedder, embedder.encoder, destination, encoder_state)


class LoRAFineTuning(StudentPolicy):
    """LoRA adapters on a frozen base (`load_student` adds them for `model.lora_r`)."""

    def checkpoint_kwargs(self, accelerator: Accelerator) -> StateKwargs:
        """Keep the frozen base out of `save_state`, and let `load_state` accept a checkpoint without it.

        DeepSpeed's `save_checkpoint` does this itself (`exclude_frozen_parameters`); the optimizer shards only ever
        hold the adapters. Otherwise Accelerate saves `get_state_dict(model)` whole, so a save hook keeps the
        trainable entries. Loading is then non-strict (the base comes from `model.name`, as at the start).
        """
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            return StateKwargs({"exclude_frozen_parameters": True}, {"load_module_strict": False})
        accelerator.register_save_state_pre_hook(_keep_trainable)
        return StateKwargs({}, {"strict": False})

    def export(self, accelerator: Accelerator, student: torch.nn.Module, destination: Path) -> None:
        adapters = lora.adapter_state_dict(accelerator, student)  # only the adapters: the frozen base is on disk
        if not accelerator.is_main_process:
            return
        merged = lora.merged_encoder(self.cfg, adapters, destination.with_name(destination.name + "-adapter"),
                                     self.restore_zero3)
        self._write(accelerator.unwrap_model(student), merged, destination, None)


def _keep_trainable(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
    for model, state in zip(models, weights, strict=True):
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        for name in [name for name in state if name not in trainable]:
            del state[name]


def student_policy(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                   restore_zero3: Callable[[], None] | None) -> StudentPolicy:
    return (LoRAFineTuning if cfg.lora_r else FullFineTuning)(cfg, tokenizer, restore_zero3)
