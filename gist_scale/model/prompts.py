"""Prompts and instructions: what is prepended to queries and documents, and which tokens pooling skips.

An encoder's prompts (`model.query_prompt`, `model.document_prompt`, the guide's own) are prepended to the text
before tokenization, as sentence-transformers does (`prompt + text`). Per-task query instructions
(`data.task_instructions`, a YAML/JSON map task -> instruction) go through `query_prompt_template`
(`"Instruct: {instruction}\\nQuery: "`, the Qwen3-Embedding / e5-mistral form) and replace the query prompt for that
task's rows.

With `pool_prompt: false` the prompt's tokens are still attended to but left out of pooling, exactly as
sentence-transformers' `Pooling(include_prompt=False)`: the prompt length is the prompt tokenized alone, less a
trailing special token (`prompt_length`), and pooling skips that many tokens after each text's first attended one,
under left padding too (`exclude_prompt`; sentence-transformers PR 2951 fixed the left-padded case there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from gist_scale.config import ConfigError, EncoderConfig

__all__ = ["Prompts", "exclude_prompt", "load_task_instructions", "prompt_length"]


@dataclass(frozen=True)
class Prompts:
    """One encoder's prompts (hashable: part of the `datasets.map` cache fingerprint)."""

    query: str = ""
    document: str = ""
    template: str | None = None
    """Formats a task's instruction into its query prompt; None: task instructions are not used."""
    instructions: tuple[tuple[str, str], ...] = ()
    """(task, instruction) pairs from `data.task_instructions`."""
    include_prompt: bool = True
    """Pool over the prompt tokens too (`pool_prompt`); False: the data carries each text's prompt length."""

    @classmethod
    def from_config(cls, cfg: EncoderConfig, instructions: Mapping[str, str] | None = None) -> Prompts:
        return cls(cfg.query_prompt or "", cfg.document_prompt or "", cfg.query_prompt_template,
                   tuple(sorted((instructions or {}).items())), cfg.pool_prompt)

    def for_query(self, task: str) -> str:
        """The prompt of a query of `task`: its instruction through the template, else the query prompt."""
        instruction = dict(self.instructions).get(task)
        if self.template is not None and instruction is not None:
            return self.template.format(instruction=instruction)
        return self.query

    def named(self) -> dict[str, str]:
        """sentence-transformers' named prompts: `query`, `document`, and one per instructed task."""
        named = {"query": self.query, "document": self.document}
        if self.template is not None:
            named.update({task: self.template.format(instruction=text) for task, text in self.instructions})
        return {name: prompt for name, prompt in named.items() if prompt}


def prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Tokens of `prompt` at the start of `prompt + text`, counted as sentence-transformers counts them: the prompt
    tokenized alone with special tokens (a leading BOS/CLS counts), less a trailing special token (EOS/SEP)."""
    if not prompt:
        return 0
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


def exclude_prompt(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """The attention mask with each text's first `prompt_lengths[i]` attended tokens zeroed, for pooling.

    Per text (sentence-transformers takes one length per batch, its prompts being per call; ours vary by task).
    Padding on either side: the prompt starts at the first attended position.
    """
    first = attention_mask.to(torch.int32).argmax(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    keep = positions[None, :] >= (first + prompt_lengths.to(first.device))[:, None]
    return attention_mask * keep.to(attention_mask.dtype)


def load_task_instructions(path: str | None) -> dict[str, str]:
    """`data.task_instructions`: a YAML or JSON file mapping task names to instruction texts."""
    if path is None:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"data.task_instructions={path}: no such file (a YAML/JSON map task_name: instruction)")
    try:
        loaded = yaml.safe_load(file.read_text())  # JSON is YAML
    except yaml.YAMLError as error:
        raise ConfigError(f"data.task_instructions={path}: not YAML/JSON ({error})") from error
    if not isinstance(loaded, dict) or not loaded:
        raise ConfigError(f"data.task_instructions={path}: expected a non-empty map task_name: instruction")
    if empty := [task for task, text in loaded.items() if not isinstance(text, str) or not text.strip()]:
        raise ConfigError(f"data.task_instructions={path}: task {empty[0]!r}: the instruction must be a non-empty text")
    return {str(task): instruction.strip() for task, instruction in loaded.items()}
