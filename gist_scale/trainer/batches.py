"""Batch sources: this rank's micro-batches, from the resumed position, whatever the data comes from.

`PreparedBatches` loads, validates and tokenizes the data into `datasets`' cache and plans its global batches
(`gist_scale.data`); `StreamedBatches` reads, validates and tokenizes rows as training consumes them
(`gist_scale.data.streaming`). The trainer sees only `BatchSource`; `build_batch_source` picks the variant from the config,
after the resumed checkpoint's data has been checked against it (`ResumePlan.check_data`) and before any model loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from gist_scale import chunking
from gist_scale.config import JobConfig
from gist_scale.data import (DataReport, GlobalBatchSampler, TripletBatch, TripletCollator, build_dataloader,
                             build_sampler, count_tokens, load_triplets, mixture_lines, tokenize_triplets,
                             write_mixture)
from gist_scale.data.streaming import StreamingBatches, stream_fingerprint
from gist_scale.guide_cache import open_guide_cache
from gist_scale.model import load_tokenizer
from gist_scale.model.prompts import Prompts
from gist_scale.plan import RunPlan
from gist_scale.resume import ResumePlan
from gist_scale.trainer.console import console

__all__ = ["BatchSource", "ChunkPlan", "PreparedBatches", "StreamedBatches", "build_batch_source"]


class BatchSource(ABC):
    """This rank's collated micro-batches (`TripletBatch`es of host tensors), epoch after epoch or forever; checkpointed at
    optimizer-step boundaries.

    The position is kept as `gist_scale.checkpoint.TrainerState` fields (so a checkpoint's `trainer_state.json` reads
    the same for every source): `state_dict()` returns the fields this source owns, `load_state_dict` takes them
    back from all of a loaded state's fields.
    """

    steps_per_epoch: int | None
    """Optimizer steps per epoch; None for a source without epochs (the run then needs `train.max_steps`)."""
    source_names: list[str]
    """The mixture's sources, as `MixtureMeter` counts them."""
    epoch: int
    """The current epoch (0 for a source without epochs), for the log records."""
    epochs: str
    """How the run's steps divide into epochs, for the summary."""

    @abstractmethod
    def __iter__(self) -> Iterator[TripletBatch]:
        """Micro-batches from the current position; the position advances as they are consumed."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The `TrainerState` fields that say where this source stands."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's `TrainerState` fields (as `dataclasses.asdict` gives them)."""

    @abstractmethod
    def lines(self) -> list[str]:
        """The startup summary's data lines (the dry run's too)."""

    @abstractmethod
    def report(self) -> DataReport:
        """What was read, for the model card."""

    @abstractmethod
    def write_mixture(self, run_dir: Path) -> None:
        """RUN/mixture.json for `gist-scale report`, when there are several sources."""


@dataclass(frozen=True)
class ChunkPlan:
    """Encoder calls per side and step for a batch with K negatives: from the per-device batch size, so every rank
    makes the same calls even when its own micro-batch is smaller. A plain value for the collator (a mixture's sources
    differ in K), picklable into DataLoader workers."""

    per_device_batch: int
    chunk_size: int

    def __call__(self, num_negatives: int) -> int:
        return chunking.num_chunks(self.per_device_batch * (2 + num_negatives), self.chunk_size)


class PreparedBatches(BatchSource):
    """Prepared data: a tokenized dataset in `datasets`' cache, its global-batch plan and a DataLoader over it."""

    def __init__(self, loader: DataLoader, sampler: GlobalBatchSampler, data_report: DataReport,
                 truncation: dict[str, float], tokens_per_epoch: int) -> None:
        self.loader, self.sampler, self.data_report = loader, sampler, data_report
        self.truncation, self.tokens_per_epoch = truncation, tokens_per_epoch
        self.steps_per_epoch = sampler.summary.steps_per_epoch
        self.epochs = f"{self.steps_per_epoch} per epoch"
        self.source_names = [s.name for s in sampler.sources]
        self.epoch, self.position = 0, 0
        """Micro-batches of the epoch consumed: the sampler resumes right after them."""

    @classmethod
    def build(cls, cfg: JobConfig, plan: RunPlan, resume: ResumePlan, accelerator: Accelerator,
              collator: TripletCollator, tokenizer: PreTrainedTokenizerBase,
              guide_tokenizer: PreTrainedTokenizerBase | None, instructions: dict[str, str]) -> PreparedBatches:
        with accelerator.main_process_first():
            # The main process fills the datasets cache; the others then read it instead of tokenizing again.
            dataset, report = load_triplets(cfg.data)
            fingerprint = dataset._fingerprint
            # Refuses a cache built for another guide, guide setting or data, before anything else is loaded.
            guide_cache = (open_guide_cache(cfg.guide, dataset, report.num_negatives, instructions)
                           if cfg.guide.cache is not None else None)
            dataset, truncation = tokenize_triplets(
                dataset, tokenizer, cfg.model.max_length, guide_tokenizer, cfg.guide.max_length,
                num_proc=cfg.data.num_proc, student_prompts=Prompts.from_config(cfg.model, instructions),
                guide_prompts=Prompts.from_config(cfg.guide, instructions))
        unused = sorted(set(instructions) - set(report.tasks))  # a typo, or another dataset's file
        if unused and accelerator.is_main_process:
            console.print(f"[yellow]warning:[/yellow] data.task_instructions names task(s) that the data does not "
                          f"have, so their instructions are unused: {', '.join(unused)}")
        # Raises with a fix-it message when not even one global batch fits in the data.
        sampler = build_sampler(dataset, cfg.data, plan.per_device_batch, plan.world_size, plan.rank,
                                plan.grad_accum_steps, cfg.train.seed)
        # A refused resume leaves the run directory as it was: config.yaml is written in `train`, after loading.
        resume.check_data(fingerprint, sampler.summary)
        tokens = count_tokens(dataset, "student")
        if guide_cache is not None:
            dataset, collator = guide_cache.attach(dataset, collator)
        return cls(build_dataloader(dataset, sampler, collator, cfg.data.num_workers), sampler, report, truncation,
                   tokens)

    def __iter__(self) -> Iterator[TripletBatch]:
        while True:
            self.sampler.load_state_dict(self.state_dict())  # the epoch, from its current position
            for batch in self.loader:
                # Counted when consumed (not when the sampler yields), so prefetching workers cannot skew a resume.
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def lines(self) -> list[str]:
        return [f"{self.tokens_per_epoch:,} real student tokens per epoch", *self.data_report.lines(),
                "truncated: " + ", ".join(f"{col} {frac:.1%}" for col, frac in self.truncation.items()),
                f"dropped tail rows per epoch: {self.sampler.summary.dropped_rows}",
                *mixture_lines(self.sampler.sources, self.steps_per_epoch)]

    def report(self) -> DataReport:
        return self.data_report

    def write_mixture(self, run_dir: Path) -> None:
        write_mixture(self.sampler.sources, run_dir)


class StreamedBatches(StreamingBatches, BatchSource):
    """`data.streaming`: rows read, validated and tokenized as training consumes them; no epochs. The stream is the
    source itself: it iterates, summarises and reports as `StreamingBatches` does, and its position (the stream's own
    state dict) is kept as the `TrainerState` field `stream`."""

    steps_per_epoch = None
    epoch = 0
    epochs = "streamed: no epochs"

    @classmethod
    def build(cls, cfg: JobConfig, plan: RunPlan, resume: ResumePlan, collator: TripletCollator,
              tokenizer: PreTrainedTokenizerBase, guide_tokenizer: PreTrainedTokenizerBase | None,
              instructions: dict[str, str]) -> StreamedBatches:
        stream = cls(
            cfg.data, collator, tokenizer, cfg.model.max_length, guide_tokenizer, cfg.guide.max_length,
            batch_size=plan.per_device_batch, world_size=plan.world_size, rank=plan.rank,
            grad_accum_steps=plan.grad_accum_steps, seed=cfg.train.seed,
            student_prompts=Prompts.from_config(cfg.model, instructions),
            guide_prompts=Prompts.from_config(cfg.guide, instructions))
        # A wrong path, column mapping or format fails now, before any model loads; later bad rows stop training.
        stream.check()
        resume.check_data(stream_fingerprint(cfg.data), stream.summary)
        return stream

    def state_dict(self) -> dict[str, Any]:
        return {"stream": super().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["stream"] is not None:
            super().load_state_dict(state["stream"])


def build_batch_source(cfg: JobConfig, plan: RunPlan, resume: ResumePlan, accelerator: Accelerator,
                       tokenizer: PreTrainedTokenizerBase, instructions: dict[str, str]) -> BatchSource:
    """The configured source (`data.streaming` or prepared), its data checked against the resumed checkpoint's."""
    # With a guide cache the guide is neither tokenized for nor loaded: its embeddings come with each batch.
    live_guide = cfg.guide.name is not None and cfg.guide.cache is None
    guide_tokenizer = (load_tokenizer(cfg.guide.name, cfg.guide.revision, cfg.guide.trust_remote_code,
                                      "--guide.trust_remote_code true") if live_guide else None)
    # With train.chunk_size the collator also plans the length-sorted chunks, off the training step's path.
    chunks = None if cfg.train.chunk_size is None else ChunkPlan(plan.per_device_batch, cfg.train.chunk_size)
    collator = TripletCollator(tokenizer, guide_tokenizer, cfg.data.pad_to_multiple_of, chunks=chunks)
    if cfg.data.streaming:
        return StreamedBatches.build(cfg, plan, resume, collator, tokenizer, guide_tokenizer, instructions)
    return PreparedBatches.build(cfg, plan, resume, accelerator, collator, tokenizer, guide_tokenizer, instructions)
