"""The benchmark's modes. Each of ours is a training configuration of `gist_scale.trainer.Trainer`, stepped by the
Trainer itself on the batches its own sampler and collator make; the reference is sentence-transformers' training
step on the same batches, taken from such a Trainer.

A mode, once built, hands out its optimizer steps' micro-batches (`next(mode.groups)`, untimed) and takes one
optimizer step on them (`step`, timed).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gist_scale.chunking import ChunkedTexts
from gist_scale.config import JobConfig
from gist_scale.data import TripletBatch
from gist_scale.guide_cache import META_FILE, build_guide_cache
from gist_scale.options import load_config
from gist_scale.tools.bench.inputs import MAX_LENGTH, lora_targets, pooling_of
from gist_scale.trainer import Trainer

__all__ = ["ALL_MODES", "DEEPSPEED_MODES", "MATRYOSHKA_MODES", "MODES", "REFERENCE_MODES", "BenchConfig", "CaseSetup",
           "ReferenceMode", "TrainerMode", "mode_environment", "processed_tokens"]

MODES = ("st", "plain", "chunked", "guide_cache", "grad_cache")
DEEPSPEED_MODES = ("zero2", "zero3", "zero2_chunked", "zero3_chunked")
MATRYOSHKA_MODES = ("matryoshka", "st_matryoshka")
ALL_MODES = MODES + DEEPSPEED_MODES + MATRYOSHKA_MODES
REFERENCE_MODES = ("st", "st_matryoshka")
CHUNKED_MODES = ("chunked", "guide_cache", "grad_cache", "zero2_chunked", "zero3_chunked")
CACHED_MODES = ("guide_cache", "grad_cache")
"""The modes whose guide embeddings come from `guide.cache`: the guide never runs in their steps."""


@dataclass
class BenchConfig:
    """`gist-scale bench`'s command line, parsed."""

    cases: list[tuple[str, str]]
    batches: list[int]
    modes: list[str]
    steps: int
    """Timed optimizer steps per mode."""
    warmup: int
    """Untimed optimizer steps first (the first one's loss is `first_loss`)."""
    chunk_size: int
    query_len: tuple[int, int]
    doc_len: tuple[int, int]
    device: torch.device
    dropout: float
    lr: float
    seed: int
    peak_tflops: float | None
    out: Path | None
    threads: int | None
    matryoshka_dims: list[int] | None
    """Sizes of the Matryoshka modes; None: the student's width, 1/2, 1/4 and 1/8 of it."""
    lora_r: int
    """LoRA rank of the student's adapters in every mode (0: full fine-tuning)."""
    isolate: bool
    """Each mode in a fresh process, for a per-mode peak resident memory on a CPU."""


@dataclass(frozen=True)
class CaseSetup:
    """What every mode of one (case, batch) shares: the bench's settings, the models and the training file."""

    cfg: BenchConfig
    student: str
    guide: str
    batch: int
    student_dir: Path
    guide_dir: Path
    rows: Path
    """The synthetic triplets, a JSONL training file."""
    work_dir: Path
    """Run directories, the guide cache and the DeepSpeed configs."""
    matryoshka_dims: tuple[int, ...]

    @property
    def case(self) -> str:
        return f"{self.student}/{self.guide}"

    @property
    def cuda(self) -> bool:
        return self.cfg.device.type == "cuda"


def processed_tokens(batch: TripletBatch) -> int:
    """Token positions the student's encoder calls process, padding included."""
    if isinstance(batch.student, ChunkedTexts):
        return batch.student.processed_tokens
    return sum(features["input_ids"].numel() for features in batch.student.values())


def trainer_args(name: str, setup: CaseSetup) -> list[str]:
    """Mode `name` as `gist-scale train` options: the trainer's defaults, with this case's models, data and steps,
    the learning rate constant from the first step, bf16 on CUDA (the guide too, as the default); fp32 on a CPU."""
    cfg, cuda = setup.cfg, setup.cuda
    args = ["--model.name", str(setup.student_dir), "--model.pooling", pooling_of(setup.student),
            "--model.max_length", str(MAX_LENGTH), "--guide.name", str(setup.guide_dir),
            "--guide.pooling", pooling_of(setup.guide), "--guide.max_length", str(MAX_LENGTH),
            "--guide.dtype", "bf16" if cuda else "fp32", "--data.path", str(setup.rows), "--data.task_column", "null",
            "--train.batch_size", str(setup.batch), "--train.max_steps", str(cfg.warmup + cfg.steps),
            "--train.seed", str(cfg.seed), "--train.mixed_precision", "bf16" if cuda else "no",
            "--train.output_dir", str(setup.work_dir / "runs" / name), "--optim.lr", str(cfg.lr),
            "--optim.schedule", "constant", "--optim.warmup_ratio", "0"]
    if cfg.lora_r:
        args += ["--model.lora_r", str(cfg.lora_r), "--model.lora_alpha", str(2 * cfg.lora_r),
                 "--model.lora_target_modules", json.dumps(lora_targets(setup.student))]
    if name in CHUNKED_MODES:
        args += ["--train.chunk_size", str(cfg.chunk_size)]
    if name in CACHED_MODES:
        args += ["--guide.cache", str(setup.work_dir / "guide_cache")]
    if name == "grad_cache":
        args += ["--train.grad_cache", "true"]
    if name == "matryoshka":
        args += ["--loss.matryoshka_dims", json.dumps(list(setup.matryoshka_dims))]
    return args


def mode_environment(name: str, setup: CaseSetup) -> dict[str, str]:
    """The environment the mode's process needs, as a launcher would set it: for the ZeRO modes, DeepSpeed through
    Accelerate's variables (the case's `zero2.json` or `zero3.json`) and torchrun's for one process; `--device cpu`
    on a machine with CUDA, Accelerate's CPU switch."""
    if name in DEEPSPEED_MODES:
        config = setup.work_dir / f"{name.removesuffix('_chunked')}.json"
        # Port 0: the lone process's rendezvous store takes a free port itself.
        return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0", "RANK": "0",
                "LOCAL_RANK": str(setup.cfg.device.index or 0), "WORLD_SIZE": "1"}
    if not setup.cuda and torch.cuda.is_available():
        return {"ACCELERATE_USE_CPU": "true"}
    return {}


def _trainer(cfg: JobConfig) -> Trainer:
    trainer = Trainer(cfg)
    # Its SIGUSR1/SIGTERM handlers set a preemption flag that only its `train()` loop answers; the bench never runs
    # that loop, so it keeps its own handlers (a SIGTERM must still end it).
    trainer.preemption.uninstall()
    return trainer


def _trainable(model: torch.nn.Module) -> int:
    # Under ZeRO-3 a parameter is a shard; `ds_numel` is the whole parameter.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


class TrainerMode:
    """One of our modes: the Trainer of its configuration, stepping through its own micro-batches."""

    def __init__(self, name: str, setup: CaseSetup) -> None:
        cfg = load_config(trainer_args(name, setup))
        if name in CACHED_MODES and not (Path(cfg.guide.cache) / META_FILE).is_file():
            build_guide_cache(cfg, cfg.guide.cache)  # `gist-scale cache-guide`, once for the case's cached modes
        self.trainer = _trainer(cfg)
        self.groups = self.trainer.optimizer_steps()
        self.guide_runs = name not in CACHED_MODES
        self.chunk_size = cfg.train.chunk_size
        self.precision = ("fp32" if not setup.cuda else "bf16" if name in DEEPSPEED_MODES else "bf16-autocast")
        self.trainable_params = _trainable(self.trainer.student)

    def step(self, group: list) -> torch.Tensor:
        # The loss of its one micro-batch (the bench never accumulates), on the device; the trainer skipped the
        # step's update if it is not finite.
        return self.trainer.train_step(group).metrics[0].loss


class ReferenceMode:
    """sentence-transformers: `GISTEmbedLoss` (`MatryoshkaLoss` over it for `st_matryoshka`) with `torch.optim.AdamW`
    (fused on CUDA), bf16 autocast on CUDA and the gradient clipped as the trainer does (the default of both
    trainers), on the micro-batches of the `plain` mode: the student's features of the same rows, padded per column.
    Its guide reads the student's features (sentence-transformers re-tokenizes only for another vocabulary)."""

    def __init__(self, name: str, setup: CaseSetup) -> None:
        # Needed by this mode alone: sentence-transformers is the reference, not a dependency of gist-scale.
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MatryoshkaLoss

        # The batches depend on the data, the student's tokenizer and the sampler's seed alone: the Trainer that
        # collates them loads neither a guide nor adapters.
        cfg = load_config([*trainer_args("plain", setup), "--guide.name", "null", "--model.lora_r", "0"])
        groups = _trainer(cfg).optimizer_steps()  # the generator holds the Trainer
        self.groups = iter([next(groups) for _ in range(setup.cfg.warmup + setup.cfg.steps)])
        del groups
        gc.collect()  # a Trainer holds reference cycles: released before the reference's models load
        device, lora_r = str(setup.cfg.device), setup.cfg.lora_r
        model = SentenceTransformer(str(setup.student_dir), device=device)
        if lora_r:
            from peft import LoraConfig, inject_adapter_in_model

            # What sentence-transformers' `add_adapter` does (through transformers, which asks for peft >= 0.22, not
            # released at the time of writing): peft's adapters injected into its transformers model, the base frozen.
            inject_adapter_in_model(LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                               target_modules=lora_targets(setup.student)), model.transformers_model)
        model.train()
        loss = GISTEmbedLoss(model, SentenceTransformer(str(setup.guide_dir), device=device))
        self.loss = MatryoshkaLoss(model, loss, list(setup.matryoshka_dims)) if name == "st_matryoshka" else loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, fused=setup.cuda)
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.cuda = setup.cuda
        self.guide_runs, self.chunk_size = True, None
        self.precision = "bf16-autocast" if setup.cuda else "fp32"
        self.trainable_params = _trainable(model)

    def step(self, group: list) -> torch.Tensor:
        batch, = group
        # Fresh dicts: sentence-transformers writes its outputs into the features it is given.
        features = [dict(batch.student[column]) for column in ("query", "pos", "neg")]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)  # the bench keeps the default, 1.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
