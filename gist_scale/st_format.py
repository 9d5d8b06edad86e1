"""The sentence-transformers directory format: write it (export) and read it (evaluation), without
sentence-transformers, which stays a test-only dependency.

`export_sentence_transformer` writes a directory that `SentenceTransformer(path)` loads and that embeds exactly like
our `Embedder`; `load_sentence_transformer_dir` reads such a directory (or a hub name) back as an `Embedder`.
"""

from __future__ import annotations

import json
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from tokenizers import normalizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gist_scale.config import ModelConfig
from gist_scale.model import (Embedder, ModelNotFoundError, find_model, hub_model_not_found, load_student,
                              load_tokenizer, resolve_model_path)

__all__ = ["export_sentence_transformer", "load_sentence_transformer_dir"]

_POOLINGS = {"cls": "cls", "mean": "mean", "lasttoken": "last_token"}
"""sentence-transformers pooling mode -> our pooling."""

_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
"""The boolean keys of `1_Pooling/config.json` as the export writes them, which older sentence-transformers read
(newer ones write `"pooling_mode": "mean"`)."""


def export_sentence_transformer(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: str,
                                normalize: bool, max_length: int, out_dir: str | Path,
                                state_dict: dict[str, torch.Tensor] | None = None,
                                prompts: dict[str, str] | None = None, include_prompt: bool = True) -> Path:
    """Write a directory that `SentenceTransformer(out_dir)` loads and that embeds exactly like our `Embedder`.

    `state_dict` carries weights consolidated from ZeRO-3 shards; without it the encoder's own weights are saved.
    `prompts` (the `Embedder`'s named prompts: `query`, `document`, one per instructed task) go into
    `config_sentence_transformers.json`, so `encode(texts, prompt_name="query")` prepends what training did;
    `include_prompt=False` makes the Pooling module leave them out as training did. A decoder's tokenizer is saved
    with its EOS post-processor (`gist_scale.model.decoder`), so sentence-transformers appends the EOS too.
    """
    out = Path(out_dir)  # created by save_pretrained
    # Save the in-memory parameter names. Reverting load-time renames would, for a model loaded under ZeRO-3, also
    # revert transformers' legacy `LayerNorm.gamma -> weight` mapping and write names the original never had.
    encoder.save_pretrained(out, state_dict=state_dict, save_original_format=False)
    tokenizer.save_pretrained(out)
    paths = {"Transformer": "", "Pooling": "1_Pooling"} | ({"Normalize": "2_Normalize"} if normalize else {})
    modules = [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (kind, path) in enumerate(paths.items())]
    for path in list(paths.values())[1:]:  # the Transformer is the folder itself
        (out / path).mkdir(exist_ok=True)
    modes = {key: _POOLINGS.get(mode) == pooling for key, mode in _LEGACY_POOLING_KEYS.items()}
    versions = {"gist_scale": version("gist-scale"), "transformers": version("transformers"),
                "pytorch": torch.__version__}
    files = {"modules.json": modules,
             "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
             "1_Pooling/config.json": {"word_embedding_dimension": int(encoder.config.hidden_size), **modes,
                                       "include_prompt": include_prompt},
             "config_sentence_transformers.json": {"__version__": versions, "prompts": dict(prompts or {}),
                                                   "default_prompt_name": None, "similarity_fn_name": "cosine"}}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def _local_dir(name_or_path: str) -> Path:
    """A local directory for a path, the offline MiniLM copy, or a hub name (downloaded or read from the cache)."""
    path = Path(resolve_model_path(name_or_path)).expanduser()
    if path.is_dir():
        return path
    resolved = find_model(name_or_path)  # a file, or a path that does not exist: says so
    try:
        return Path(snapshot_download(resolved))
    except Exception as error:  # offline, unknown repository, authentication: all end the same way
        raise hub_model_not_found(name_or_path, None, error) from error

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None

def _pooling_mode(config: dict[str, Any], where: Path) -> str:
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _POOLINGS:
        raise ValueError(f"{where}: pooling {modes} is not supported; gist-scale pools with one of "
                         f"{', '.join(_POOLINGS)}")
    return _POOLINGS[modes[0]]

def _lowercase_inputs(tokenizer: PreTrainedTokenizerBase, where: Path) -> None:
    """Make a fast tokenizer lowercase its input, as sentence-transformers does for `do_lower_case: true`."""
    if not tokenizer.is_fast:
        raise ValueError(f"{where}: do_lower_case needs a fast tokenizer")
    current = tokenizer.backend_tokenizer.normalizer
    steps = [normalizers.Lowercase()] + ([current] if current is not None else [])
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(steps)

_EVAL_REMOTE_CODE_OPTION = "--trust-remote-code"
"""`gist-scale eval`'s switch for `trust_remote_code`, named when a custom-code model is refused without it."""


def load_sentence_transformer_dir(name_or_path: str, max_length: int | None = None, trust_remote_code: bool = False
                                  ) -> tuple[Embedder, PreTrainedTokenizerBase, int]:
    """Load a sentence-transformers model (a directory, or a hub name) as our `Embedder`, its tokenizer and length.

    Reads `modules.json` (Transformer, Pooling, optional Normalize; any other module, such as Dense, cannot be
    expressed by an `Embedder` and is refused), the pooling mode from the Pooling module's `config.json`, and the
    maximum sequence length from `sentence_bert_config.json`, else the tokenizer's `model_max_length` capped at
    the model's position embeddings, as sentence-transformers does. A plain `transformers` directory without
    `modules.json` gets sentence-transformers' fallback: mean pooling, no normalization. `max_length` overrides.
    The named prompts of `config_sentence_transformers.json` become the `Embedder`'s `prompts` (evaluation
    prepends `query` and `document`) and the Pooling module's `include_prompt` its own. `trust_remote_code` runs
    the model's own code (`auto_map`), as `SentenceTransformer(path, trust_remote_code=True)` does; without it such
    a model is refused with one line naming `gist-scale eval --trust-remote-code`.
    """
    root = _local_dir(name_or_path)
    modules = _read_json(root / "modules.json")
    transformer_dir, pooling, normalize, include_prompt = root, "mean", False, True
    if modules is None:
        if not (root / "config.json").is_file():
            raise ModelNotFoundError(f"{name_or_path}: not a model directory: it has neither modules.json "
                                     "(sentence-transformers) nor config.json (transformers); give a model directory "
                                     "such as RUN/final, or a hub name")
        warnings.warn(f"{root}: no modules.json, so not a sentence-transformers model; using mean pooling without "
                      "normalization", stacklevel=2)
    else:
        modules = sorted(modules, key=lambda m: m["idx"])
        names = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
            raise ValueError(f"{root}: modules {names} are not supported; gist-scale evaluates Transformer, Pooling "
                             "and an optional Normalize")
        transformer_dir, pooling_dir = (root / m.get("path", "") for m in modules[:2])
        pooling_config = _read_json(pooling_dir / "config.json") or {}
        pooling = _pooling_mode(pooling_config, pooling_dir / "config.json")
        include_prompt = bool(pooling_config.get("include_prompt", True))
        normalize = len(names) == 3
    st_config = _read_json(transformer_dir / "sentence_bert_config.json") or {}
    prompts = _read_json(root / "config_sentence_transformers.json") or {}
    if prompts.get("default_prompt_name"):
        warnings.warn(f"{root}: its default prompt {prompts['default_prompt_name']!r} is not prepended here",
                      stacklevel=2)

    tokenizer = load_tokenizer(str(transformer_dir), None, trust_remote_code, _EVAL_REMOTE_CODE_OPTION)
    if st_config.get("do_lower_case"):
        _lowercase_inputs(tokenizer, transformer_dir)
    positions = (_read_json(transformer_dir / "config.json") or {}).get("max_position_embeddings")
    positions = positions if isinstance(positions, int) and positions > 0 else tokenizer.model_max_length
    max_length = max_length or st_config.get("max_seq_length") or int(min(tokenizer.model_max_length, positions))
    # attn_implementation None: transformers' own choice, as in sentence-transformers: sdpa where the model class
    # has it, else eager (many custom-code models, Gemma 2), where training's explicit sdpa would be refused.
    cfg = ModelConfig(name=str(transformer_dir), pooling=pooling, normalize=normalize, max_length=int(max_length),
                      pool_prompt=include_prompt, trust_remote_code=trust_remote_code, attn_implementation=None)
    embedder = load_student(cfg, remote_code_option=_EVAL_REMOTE_CODE_OPTION)
    embedder.prompts = {name: text for name, text in (prompts.get("prompts") or {}).items() if text}
    return embedder, tokenizer, cfg.max_length

