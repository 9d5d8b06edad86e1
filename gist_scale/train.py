"""`gist-scale train`: the GISTEmbed training loop on Accelerate (+ DeepSpeed ZeRO when configured).

Order, as in Accelerate's examples: Accelerator -> set_seed -> build (data, student, guide, loss, optimizer)
-> prepare -> loop -> export -> end_training. Only the student and its optimizer go through `prepare`, so the
student is the only module DDP wraps or DeepSpeed shards; the guide stays a frozen bf16 module beside it.
The DataLoader is deliberately not prepared: our sampler already hands every rank its slice of a task-homogeneous
global batch and can resume mid-epoch exactly, which Accelerate's sharding would undo.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, send_to_device, set_seed
from jsonargparse import ArgumentParser
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedTokenizerBase, get_scheduler

from gist_scale import chunking, distributed, encode, faults
from gist_scale.checkpoint import CheckpointError, TrainerState, incomplete_checkpoints, save_checkpoint
from gist_scale.config import METRICS_FILE, ConfigError, JobConfig, LoggingConfig, OptimConfig, TrainConfig, save_config
from gist_scale.data import (DataError, MixtureMeter, TripletCollator, build_dataloader, build_sampler, count_tokens,
                             load_triplets, mixture_lines, tokenize_triplets, write_mixture)
from gist_scale.guide_cache import open_guide_cache
from gist_scale.loss import GISTLoss
from gist_scale.memory import count_parameters, estimate_model_states, format_estimate
from gist_scale.beir import load_beir
from gist_scale.evaluate import EvalData, evaluate_embedder, load_eval_data, read_sts
from gist_scale.model_card import RunFacts, check_push_to_hub, push_to_hub, write_model_card
from gist_scale.flops import forward_flops, peak_tflops
from gist_scale.places import require_writable_dir
from gist_scale.preemption import EXIT_PREEMPTED, PreemptionFlag
from gist_scale.plan import RunPlan, launch_plan
from gist_scale.resume import plan_run
from gist_scale.model import Embedder, load_guide, load_student, load_tokenizer, lora, outside_zero3
from gist_scale.model.prompts import Prompts, load_task_instructions, unknown_tasks
from gist_scale.options import job_parser, parse_job
from gist_scale.streaming import StreamingBatches, stream_fingerprint
from gist_scale.st_format import export_sentence_transformer

console = Console(stderr=True, highlight=False, soft_wrap=True)


def build_accelerator(train: TrainConfig, logging: LoggingConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator, set up as `gist_scale.plan.launch_plan` says for this launcher and machine (DDP over gloo
    for CPU processes, the device's backend on GPUs, DeepSpeed when the launcher asks for it)."""
    plan = launch_plan(deepspeed=True)
    # The plan's backend, named: gloo for CPU processes (left to itself, Accelerate's CPU mode would pick MPI where
    # torch has it, which torchrun does not set up) and for DeepSpeed on CPU; nccl on GPUs. The timeout is what ends
    # the job when a peer dies instead of hanging forever. A single process must not name a backend at all, or
    # Accelerate expects a process group that nobody started.
    handlers = []
    if plan.backend is not None:
        handlers.append(InitProcessGroupKwargs(backend=plan.backend,
                                               timeout=timedelta(seconds=train.collective_timeout_s)))
    return Accelerator(
        cpu=plan.cpu,
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
        log_with=list(logging.trackers) or None,
        project_dir=str(run_dir),
    )


def configure_deepspeed(accelerator: Accelerator, plan: RunPlan, optim: OptimConfig) -> None:
    """Fill the `"auto"` entries of the DeepSpeed JSON from the run plan and the config (the single source of
    truth)."""
    if plan.zero_stage is None:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    # We never hand Accelerate a DataLoader, so it cannot infer the micro-batch size itself.
    ds["train_micro_batch_size_per_gpu"] = plan.per_device_batch
    ds["train_batch_size"] = plan.global_batch
    ds["gradient_clipping"] = optim.max_grad_norm or 0.0
    # A non-finite loss skips the whole step (`Trainer.train_step`), but under DeepSpeed the update runs inside the
    # last backward: DeepSpeed's own check of the gradients must skip it. bf16 has that check off by default.
    ds.setdefault("bf16", {})["check_grad_overflow"] = True
    if plan.zero_stage == 3:
        # The final export needs full weights consolidated from the shards.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def build_optimizer(student: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in student.named_parameters():
        # Under ZeRO-3 a parameter is an empty 1-D shard by now; `ds_shape` keeps its real shape.
        shape = getattr(param, "ds_shape", param.shape)
        if param.requires_grad:
            (no_decay if len(shape) < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = optim.fused and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused)


class StepProgress:
    """A Rich progress bar over optimizer steps; log lines printed through `console` appear above it."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=console, disable=not enabled, transient=True)
        self._task = self._progress.add_task("train", total=total, completed=done)
        self._progress.start()

    def update(self, steps: int) -> None:
        self._progress.advance(self._task, steps)

    def close(self) -> None:
        self._progress.stop()


@dataclass
class StepMetrics:
    """Per-step values: device tensors kept there until a log step so the loop never waits on the host, and
    host numbers the collator counted."""

    loss: torch.Tensor
    masked_fraction: torch.Tensor
    candidates_per_anchor: torch.Tensor
    duplicates_masked: torch.Tensor
    tokens: int
    triplets: int
    model_flops: float


@dataclass
class StepOutcome:
    """What one optimizer step decided, the same on every rank."""

    applied: bool
    """False when the step was skipped whole (a non-finite loss on some rank)."""
    preempted: bool
    """A preemption signal reached some rank: stop after this step."""
    metrics: list[StepMetrics] = field(default_factory=list)
    """One entry per micro-batch of an applied step."""
    grad_norm: torch.Tensor | None = None
    """Global gradient norm before clipping (with clipping on)."""


@dataclass
class MetricsWindow:
    """The steps since the last log line: their micro-batch metrics and their own time, and, as separate fields,
    the time spent in evaluation and checkpoints in between (so neither is mixed into the throughput)."""

    metrics: list[StepMetrics] = field(default_factory=list)
    train_seconds: float = 0.0
    grad_norm: torch.Tensor | None = None
    other_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, outcome: StepOutcome, seconds: float) -> None:
        self.metrics.extend(outcome.metrics)
        self.train_seconds += seconds
        self.grad_norm = outcome.grad_norm

    def timed(self, name: str, action: Callable[[], object]) -> None:
        started = time.perf_counter()
        action()
        self.other_seconds[name] = self.other_seconds.get(name, 0.0) + time.perf_counter() - started


class Trainer:
    """Builds everything in `__init__`; `train()` runs the loop and returns the process exit code."""

    def __init__(self, cfg: JobConfig, load_models: bool = True) -> None:
        """`load_models=False` stops before the first weight is read (`gist-scale train --dry-run`): the config, the
        places, the launch, the checkpoint to resume, the data rows and their tokenization are checked by then."""
        self.cfg = cfg
        self.start_time = time.monotonic()  # the model card's wall time counts from here
        check_push_to_hub(cfg.export)
        # Installed first: a preemption signal during the minutes of loading must not kill the job uncheckpointed;
        # the loop answers it after the first step.
        self.preemption = PreemptionFlag().install()
        self.run_dir = Path(cfg.train.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        # Before anything is loaded: a run that cannot write where it saves must fail now, not at its first save.
        require_writable_dir(self.checkpoint_dir, "train.output_dir")
        self.accelerator = build_accelerator(cfg.train, cfg.logging, self.run_dir)
        # Before anything is loaded: the run's geometry on this launch, and the checkpoint it resumes (another run's
        # is refused); an elastic resume keeps the checkpoint's global batch on the new world size.
        self.resume = plan_run(cfg, self.accelerator, self.checkpoint_dir)
        self.plan = self.resume.plan
        configure_deepspeed(self.accelerator, self.plan, cfg.optim)
        if cfg.train.grad_cache and self.plan.zero_stage is not None:
            encode.require_deepspeed_for_grad_cache(importlib.metadata.version("deepspeed"))
        set_seed(cfg.train.seed)
        self.device = self.accelerator.device

        # Data first: a bad row must fail before any model is loaded.
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
        # With a guide cache the guide is neither tokenized for nor loaded: its embeddings come with each batch.
        live_guide = cfg.guide.name is not None and cfg.guide.cache is None
        guide_tokenizer = (load_tokenizer(cfg.guide.name, cfg.guide.revision, cfg.guide.trust_remote_code,
                                          "--guide.trust_remote_code true") if live_guide else None)
        self.instructions = load_task_instructions(cfg.data.task_instructions)
        # With train.chunk_size the collator also plans the length-sorted chunks, off the training step's path.
        collator = TripletCollator(self.tokenizer, guide_tokenizer, cfg.data.pad_to_multiple_of,
                                   chunks=self._chunks)
        self.stream: StreamingBatches | None = None
        if cfg.data.streaming:
            self._stream_data(collator, guide_tokenizer)
        else:
            self._prepare_data(collator, guide_tokenizer)
        self.eval_data = self._load_eval_data()
        # A stream has no epochs (it needs train.max_steps); prepared data has a known number of batches per epoch.
        self.total_steps = self.plan.total_steps(None if self.stream else self.sampler.summary.steps_per_epoch)
        if not load_models:
            return

        student = load_student(cfg.model, self.instructions)
        cfg.loss.check_embedding_dim(student.dim, cfg.model.name)
        self.guide = self._load_guide()
        self.encoder_configs = {"student": student.encoder.config}
        if self.guide is not None:
            self.encoder_configs["guide"] = self.guide.encoder.config
        self.peak_tflops = cfg.logging.peak_tflops or peak_tflops(self.device)
        # Outside debug mode, non-finite embeddings are not an error but a skipped step (see `_skip`).
        self.loss_fn = GISTLoss(**dataclasses.asdict(cfg.loss), check_finite=cfg.debug)
        optimizer = build_optimizer(student, cfg.optim, self.device)
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        # Whatever started these processes: several of them train in sync (DDP, DeepSpeed), or not at all.
        distributed.require_synchronised(self.student, self.accelerator.num_processes,
                                         self.accelerator.distributed_type)
        # With LoRA, checkpoints hold the adapters and their optimizer state, not the frozen base.
        self.state_kwargs = lora.checkpoint_kwargs(self.accelerator) if cfg.model.lora_r else lora.StateKwargs({}, {})
        # `from_pretrained` returns the encoder in eval mode (dropout off); evaluation restores whatever mode it found.
        self.student.train()
        # Built on the prepared optimizer: ZeRO-3 regroups the parameters, so a scheduler made before `prepare` would
        # hold learning rates for groups that no longer exist.
        self.scheduler = get_scheduler(cfg.optim.schedule if cfg.optim.schedule != "constant" else
                                       "constant_with_warmup", self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.optim.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        # The scheduler is stepped by hand once per optimizer step; registering it puts it in every checkpoint.
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.state = TrainerState()
        self.last_checkpoint_step: int | None = None
        best_file = self.run_dir / "best" / "best.json"
        # A resumed run must beat the best model it already kept, not start the contest over.
        self.best_metric = json.loads(best_file.read_text())[cfg.checkpoint.keep_best] \
            if cfg.checkpoint.keep_best and best_file.is_file() else float("-inf")

    def _prepare_data(self, collator: TripletCollator, guide_tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Load, validate and tokenize the data into `datasets`' cache, and plan its global batches."""
        cfg = self.cfg
        with self.accelerator.main_process_first():
            # The main process fills the datasets cache; the others then read it instead of tokenizing again.
            dataset, self.data_report = load_triplets(cfg.data)
            data_fingerprint = dataset._fingerprint
            # Refuses a cache built for another guide, guide setting or data, before anything else is loaded.
            guide_cache = (open_guide_cache(cfg.guide, dataset, self.data_report.num_negatives, self.instructions)
                           if cfg.guide.cache is not None else None)
            dataset, self.truncation = tokenize_triplets(
                dataset, self.tokenizer, cfg.model.max_length, guide_tokenizer, cfg.guide.max_length,
                num_proc=cfg.data.num_proc, student_prompts=Prompts.from_config(cfg.model, self.instructions),
                guide_prompts=Prompts.from_config(cfg.guide, self.instructions))
        unused = unknown_tasks(self.instructions, self.data_report.tasks)
        if unused and self.accelerator.is_main_process:
            console.print(f"[yellow]warning:[/yellow] data.task_instructions names task(s) that the data does not "
                          f"have, so their instructions are unused: {', '.join(unused)}")
        # Raises with a fix-it message when not even one global batch fits in the data.
        self.sampler = build_sampler(
            dataset, cfg.data, self.plan.per_device_batch, self.plan.world_size, self.plan.rank,
            self.plan.grad_accum_steps, cfg.train.seed)
        self.mixture = MixtureMeter([s.name for s in self.sampler.sources], self.plan.grad_accum_steps,
                                    self.plan.global_batch)
        # A refused resume leaves the run directory as it was: config.yaml is written in `train`, after loading.
        self.resume.check_data(data_fingerprint, self.sampler.summary)
        self.tokens_per_epoch = count_tokens(dataset, "student")
        if guide_cache is not None:
            dataset, collator = guide_cache.attach(dataset, collator)
        self.loader = build_dataloader(dataset, self.sampler, collator, cfg.data.num_workers)

    def _stream_data(self, collator: TripletCollator, guide_tokenizer: PreTrainedTokenizerBase | None) -> None:
        """`data.streaming`: rows read, validated and tokenized as training consumes them (`gist_scale.streaming`)."""
        cfg = self.cfg
        self.stream = StreamingBatches(
            cfg.data, collator, self.tokenizer, cfg.model.max_length, guide_tokenizer, cfg.guide.max_length,
            batch_size=self.plan.per_device_batch, world_size=self.plan.world_size, rank=self.plan.rank,
            grad_accum_steps=self.plan.grad_accum_steps, seed=cfg.train.seed,
            student_prompts=Prompts.from_config(cfg.model, self.instructions),
            guide_prompts=Prompts.from_config(cfg.guide, self.instructions))
        # A wrong path, column mapping or format fails now, before any model loads; later bad rows stop training.
        self.stream.check()
        self.mixture = MixtureMeter(self.stream.source_names, self.plan.grad_accum_steps, self.plan.global_batch)
        self.resume.check_data(stream_fingerprint(cfg.data), self.stream.summary)

    def _load_guide(self) -> Embedder | None:
        if self.cfg.guide.name is None or self.cfg.guide.cache is not None:
            return None
        return load_guide(self.cfg.guide, self.device, self._restore_zero3())

    def _restore_zero3(self):
        """What re-registers the DeepSpeed config after loading a model outside ZeRO-3 (`outside_zero3`)."""
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin.set_deepspeed_weakref if plugin else None

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run to `total_steps`, or until a preemption signal; returns the exit code (0, or EXIT_PREEMPTED)."""
        resume_from = self.resume.checkpoint
        if resume_from is not None:
            self.state = self.resume.load(self.accelerator, self.state_kwargs.load)
            self.last_checkpoint_step = self.state.step
            if self.stream is not None and self.state.stream is not None:
                self.stream.load_state_dict(self.state.stream)
        # Written only now, after the data, the models and the checkpoint have loaded: a start that fails on bad input
        # leaves the run directory of an earlier, good start as it was.
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        if self.cfg.logging.trackers:
            self.accelerator.init_trackers(self.cfg.logging.project, config=_flatten(self.cfg.to_dict()))
        self._print_summary(resume_from)
        if self.eval_data is not None and self.state.step == 0:
            self._evaluate(baseline=True)
        progress = StepProgress(self.total_steps, self.state.step, enabled=self.accelerator.is_main_process)
        window = MetricsWindow()
        preempted = False
        steps = self.optimizer_steps()
        while self.state.step < self.total_steps and not preempted:
            started = time.perf_counter()
            outcome = self.train_step(next(steps))
            preempted = outcome.preempted
            if not outcome.applied:
                continue
            window.add(outcome, time.perf_counter() - started)
            progress.update(1)
            if self._due(self.cfg.train.log_every) or self.state.step == self.total_steps:
                # This is a sync point: metrics cross ranks and reach the host only here.
                self._log({**self._reduce_metrics(window), **self.mixture.flush()})
                window = MetricsWindow()
            if self._due(self.cfg.checkpoint.every):
                window.timed("checkpoint_seconds", self._save_checkpoint)
            if self.eval_data is not None and self._due(self.cfg.eval.every) and self.state.step < self.total_steps:
                window.timed("eval_seconds", self._evaluate)
        progress.close()
        return self._finish(preempted)

    def _due(self, every: int | None) -> bool:
        """Is an every-N-steps action (logging, checkpointing, evaluation) due after the step just taken?"""
        return bool(every) and self.state.step % every == 0

    def _finish(self, preempted: bool) -> int:
        """The loop's one exit: a preempted run leaves a checkpoint to resume from, a finished one its models."""
        if preempted:
            if self.last_checkpoint_step != self.state.step:
                self._save_checkpoint()
            console.print(f"[yellow]preempted at step {self.state.step}: checkpoint saved; exiting with "
                          f"{EXIT_PREEMPTED} so the job is requeued")
        else:
            # Evaluated before the export, so that final/'s model card holds the final metrics.
            final_metrics = self._evaluate() if self.eval_data is not None else None
            self._export(self.run_dir / "final", final_metrics)
            if final_metrics is not None:
                self._print_comparison(final_metrics)
            if self.cfg.export.push_to_hub and self.accelerator.is_main_process:
                console.print(f"uploaded to the Hub: {push_to_hub(self.run_dir / 'final', self.cfg.export)}")
        # From here a signal has nothing left to save: the process ends normally.
        self.preemption.uninstall()
        self.accelerator.end_training()
        return EXIT_PREEMPTED if preempted else 0

    def _save_checkpoint(self) -> None:
        if self.stream is not None:  # checkpoints are taken between steps: the stream is where training stands
            self.state.stream = self.stream.state_dict()
        save_checkpoint(self.accelerator, self.checkpoint_dir, self.state, self.cfg.checkpoint.keep_last,
                        self.resume.record(self.state), self.state_kwargs.save)
        self.last_checkpoint_step = self.state.step

    def optimizer_steps(self) -> Iterator[list[dict]]:
        """This rank's micro-batches, on the device, grouped by optimizer step, from the resumed position. Every
        global batch, and so every epoch, holds whole steps (cut into `grad_accum_steps` parts)."""
        group: list[dict] = []
        for batch in self._micro_batches():
            self.mixture.count(batch)
            group.append(send_to_device(batch, self.device, non_blocking=True))
            if len(group) == self.cfg.train.grad_accum_steps:
                yield group
                group = []

    def _micro_batches(self) -> Iterator[dict]:
        """The stream's micro-batches, or the sampler's epoch after epoch, from the resumed position."""
        if self.stream is not None:
            yield from self.stream  # endless: sources start over
            return
        while True:
            self.sampler.set_epoch(self.state.epoch)
            self.sampler.load_state_dict({"epoch": self.state.epoch, "position": self.state.position})
            for batch in self.loader:
                # Counted when consumed (not when the sampler yields), so prefetching workers cannot skew a resume.
                self.state.position += 1
                yield batch
            self.state.epoch += 1
            self.state.position = 0

    def train_step(self, micro_batches: list[dict]) -> StepOutcome:
        """One optimizer step: forward and backward of every micro-batch, then one decision that every rank shares:
        apply the update, or skip it whole (a non-finite loss on any rank, in any micro-batch), and stop after it or
        not (a preemption signal on any rank).

        The decision waits for the backward passes: under DeepSpeed the update already happened inside the last one
        (Accelerate calls `engine.step()` there), and DeepSpeed's own overflow check, switched on for every precision
        (`configure_deepspeed`), skipped it and cleared the gradients, which `_skip` verifies.
        """
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        metrics = []
        for batch in micro_batches:
            with self.accelerator.accumulate(self.student):
                loss, batch_metrics = self._forward_backward(batch)
            nonfinite |= ~torch.isfinite(loss)
            metrics.append(batch_metrics)
        # The step's one sync point: a collective and a host read for both decisions.
        skip, preempted = distributed.any_rank(nonfinite, self.preemption.is_set)
        if skip:
            self._skip()
            return StepOutcome(applied=False, preempted=preempted)
        grad_norm = None
        if self.cfg.optim.max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.nonfinite_in_a_row = 0
        return StepOutcome(applied=True, preempted=preempted, metrics=metrics, grad_norm=grad_norm)

    def _forward_backward(self, batch: dict) -> tuple[torch.Tensor, StepMetrics]:
        """Loss and backward of one micro-batch; returns the detached loss and the micro-batch's metrics."""
        student = batch["student"]  # column tensors, or `chunking.ChunkedTexts` planned by the collator
        k = batch["num_negatives"]
        guide_embeddings = self._guide_embeddings(batch, k)
        grad_cache = None
        if self.cfg.train.grad_cache:
            # Embeddings without autograd now; the backward below re-encodes chunk by chunk with the cached gradient.
            grad_cache = encode.GradCache(self.student, student, k, self.accelerator.autocast)
            query, pos, neg = grad_cache.embeddings
        else:
            with self.accelerator.autocast():
                query, pos, neg = encode.encode_columns(self.student, student, k)
        text_ids = batch["text_ids"]
        loss, stats = self.loss_fn(query, pos, neg, *guide_embeddings, rank_sizes=self.plan.rank_sizes,
                                   text_ids=(text_ids["query"], text_ids["pos"], text_ids.get("neg")))
        first_attempt = self.state.nonfinite_in_a_row == 0
        if self.accelerator.sync_gradients and first_attempt and faults.requested("nonfinite_loss", self.state.step + 1):
            loss = loss * float("nan")
        if grad_cache is None:
            self.accelerator.backward(loss)
        else:
            grad_cache.backward(loss, encode.AcceleratorBackward(self.accelerator, self.student,
                                                                 coalesce=self.cfg.train.grad_cache_coalesce))
        if self.cfg.debug:
            shapes = ({col: tuple(f["input_ids"].shape) for col, f in student.items()} if isinstance(student, dict)
                      else [tuple(c["input_ids"].shape) for c in student.chunks])
            console.log(f"debug: step {self.state.step} shapes {shapes} loss {loss.item():.4f} "
                        f"masked {stats.masked_fraction.item():.3f} duplicates {stats.duplicates_masked.item():.0f} "
                        f"candidates/anchor {stats.candidates_per_anchor.item():.0f}")
        counts = batch["token_counts"]
        loss = loss.detach()
        return loss, StepMetrics(loss, stats.masked_fraction, stats.candidates_per_anchor, stats.duplicates_masked,
                                 counts["student"].tokens, counts["student"].texts // (2 + k),
                                 self._model_flops(counts))

    def _skip(self) -> None:
        """Drop the step's gradients (every micro-batch's) and count the skip; too many in a row stop the run."""
        if self.plan.zero_stage is None:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.accelerator.deepspeed_engine_wrapped.engine.was_step_applied():
            raise FloatingPointError(
                f"step {self.state.step + 1}: the loss was non-finite but DeepSpeed applied the update; its gradient "
                "overflow check must be on (bf16.check_grad_overflow, set by gist-scale): check the DeepSpeed config")
        self.state.nonfinite_in_a_row += 1
        limit = 1 if self.cfg.debug else self.cfg.train.max_nonfinite_steps
        console.log(f"[yellow]non-finite loss at step {self.state.step}; skipped "
                    f"({self.state.nonfinite_in_a_row}/{limit} in a row)")
        if self.state.nonfinite_in_a_row >= limit:
            raise FloatingPointError(f"{self.state.nonfinite_in_a_row} non-finite losses in a row at step "
                                     f"{self.state.step}: lower optim.lr, or check the data (--debug shows shapes)")

    def _model_flops(self, counts: dict) -> float:
        """Training FLOPs of this micro-batch on real tokens: the student's forward and backward (3x a forward) and
        the live guide's forward. GradCache's second forward is recomputation and is not counted."""
        flops = 0.0
        for side, config in self.encoder_configs.items():
            forward = forward_flops(config, counts[side].tokens, counts[side].tokens_squared)
            flops += 3 * forward if side == "student" else forward
        return flops

    def _chunks(self, k: int) -> int | None:
        """Encoder calls per side and step (None: one per column); from the per-device batch size, so every rank
        makes the same calls even when its own micro-batch is smaller."""
        if self.cfg.train.chunk_size is None:
            return None
        return chunking.num_chunks(self.plan.per_device_batch * (2 + k), self.cfg.train.chunk_size)

    def _guide_embeddings(self, batch: dict, k: int) -> tuple:
        if "guide_embeddings" in batch:  # from the guide cache (`guide.cache`)
            cached = batch["guide_embeddings"]
            return cached["query"], cached["pos"], cached.get("neg")
        if self.guide is None:
            return None, None, None
        return encode.embed_frozen(self.guide, batch["guide"], k)

    def _reduce_metrics(self, window: MetricsWindow) -> dict:
        pending = window.metrics
        local = torch.stack([torch.stack([m.loss, m.masked_fraction, m.candidates_per_anchor]).float()
                             for m in pending]).mean(0)
        counts = torch.tensor([[m.tokens, m.triplets, m.model_flops] for m in pending], dtype=torch.float64,
                              device=self.device).sum(0)
        # Per optimizer step over the global batch: summed over micro-batches and ranks, averaged over steps.
        local_duplicates = torch.stack([m.duplicates_masked for m in pending]).double().sum().reshape(1)
        loss, masked, candidates = distributed.all_reduce_mean(local).tolist()
        tokens, triplets, flops, duplicates = distributed.all_reduce_sum(
            torch.cat([counts, local_duplicates.to(counts.device)])).tolist()
        steps = len(pending) / self.cfg.train.grad_accum_steps
        # Throughput over the training steps' own time: evaluation and checkpoints are reported on their own.
        elapsed = window.train_seconds
        tflops = flops / elapsed / self.accelerator.num_processes / 1e12
        record = {
            "step": self.state.step, "epoch": self.state.epoch, "loss": loss,
            "lr": self.scheduler.get_last_lr()[0], "masked_fraction": masked, "candidates_per_anchor": candidates,
            "duplicates_masked": duplicates / steps,
            "triplets_per_s": triplets / elapsed, "tokens_per_s": tokens / elapsed,
            "model_tflops_per_s": tflops, **window.other_seconds,
        }
        if self.peak_tflops:
            record["mfu"] = tflops / self.peak_tflops
        if window.grad_norm is not None:
            record["grad_norm"] = float(window.grad_norm)
        return record

    def _record(self, record: dict) -> None:
        """Send a metrics record to the trackers and append it to RUN/metrics.jsonl (main process)."""
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with (self.run_dir / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _log(self, record: dict) -> None:
        self._record(record)
        if not self.accelerator.is_main_process:
            return
        console.print(
            f"step {record['step']:>6}/{self.total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"masked {record['masked_fraction']:.3f}  duplicates {record['duplicates_masked']:.1f}  "
            f"cand/anchor {record['candidates_per_anchor']:.0f}  "
            f"{record['triplets_per_s']:.1f} triplets/s  {record['tokens_per_s']:.0f} tokens/s"
            + (f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""))

    def _print_summary(self, resume_from: Path | None) -> None:
        if not self.accelerator.is_main_process:
            return
        # ZeRO-3 leaves each rank a shard; `ds_numel` is the whole parameter.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.student.parameters() if p.requires_grad)
        lines = [
            self.plan.summary(),
            f"steps {self.total_steps} ("
            + ("streamed: no epochs" if self.stream else f"{self.sampler.summary.steps_per_epoch} per epoch") + ")  "
            f"guide {self.cfg.guide.name or 'none (plain InfoNCE)'} "
            + (f"(cached embeddings: {self.cfg.guide.cache})" if self.cfg.guide.cache else f"({self.cfg.guide.dtype})"),
            f"student {self.cfg.model.name}: {trainable / 1e6:.1f}M trainable parameters",
            *self._data_lines(),
            *_prompt_lines(self.accelerator.unwrap_model(self.student), self.cfg.model.pool_prompt),
            f"run directory: {self.run_dir}",
        ]
        for leftover in incomplete_checkpoints(self.checkpoint_dir):
            lines.append(f"[yellow]ignoring incomplete checkpoint {leftover}")
        if resume_from is not None:
            lines.append(f"resumed from {resume_from} at step {self.state.step}")
            lines += self.resume.summary_lines()
        if self.stream is not None:
            self.stream.write_mixture(self.run_dir)
        else:
            write_mixture(self.sampler.sources, self.run_dir)
        console.rule("gist-scale train")
        for line in lines:
            console.print(line)

    def dry_run(self) -> int:
        """Print what the run would do (`--dry-run`, on a Trainer built with `load_models=False`): the plan, the
        schedule, the data, the resume, and the student's per-rank memory for weights, gradients and optimizer
        state under this launch's ZeRO stage (`gist_scale.memory`, counted on the meta device). Returns 0."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config if self.plan.zero_stage is not None else {}
        zero = ds.get("zero_optimization", {})
        with outside_zero3(self._restore_zero3()):  # counted on the meta device: nothing for zero.Init to partition
            counts = count_parameters(self.cfg.model)
        estimate = estimate_model_states(
            counts, self.plan.zero_stage or 0, self.plan.world_size, self.plan.mixed_precision,
            offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
            offload_param=zero.get("offload_param", {}).get("device", "none") != "none")
        if self.accelerator.is_main_process:
            epochs = "streamed: no epochs" if self.stream else f"{self.sampler.summary.steps_per_epoch} per epoch"
            lines = [f"[bold]dry run[/bold]: nothing is trained and no weights are loaded",
                     self.plan.summary(), f"steps {self.total_steps} ({epochs})", *self._data_lines(),
                     *self.resume.summary_lines(), f"student {self.cfg.model.name}",
                     *format_estimate(counts, estimate).splitlines(), f"run directory: {self.run_dir}"]
            console.print("\n".join(lines), markup=True)
        return 0

    def _data_lines(self) -> list[str]:
        """The startup summary's data lines: the stream's, or the prepared dataset's and its epoch plan."""
        if self.stream is not None:
            return self.stream.lines()
        return [f"{self.tokens_per_epoch:,} real student tokens per epoch", *self.data_report.lines(),
                "truncated: " + ", ".join(f"{col} {frac:.1%}" for col, frac in self.truncation.items()),
                f"dropped tail rows per epoch: {self.sampler.summary.dropped_rows}",
                *mixture_lines(self.sampler.sources, self.sampler.summary.steps_per_epoch)]

    def _export(self, destination: Path, metrics: dict[str, float] | None = None) -> None:
        # Under ZeRO-3 this gathers the full weights from every rank's shard: all ranks must call it.
        # With LoRA only the adapters: the frozen base is on disk.
        state_dict = (lora.adapter_state_dict(self.accelerator, self.student) if self.cfg.model.lora_r
                      else self.accelerator.get_state_dict(self.student))
        if not self.accelerator.is_main_process:
            return
        encoder_state = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        embedder = self.accelerator.unwrap_model(self.student)
        encoder = embedder.encoder
        if self.cfg.model.lora_r:  # RUN/final/ is the merged model; RUN/final-adapter/ the adapter alone
            encoder = lora.merged_encoder(self.cfg.model, encoder_state,
                                          destination.with_name(destination.name + "-adapter"), self._restore_zero3())
            encoder_state = None
        export_sentence_transformer(
            encoder, self.tokenizer, self.cfg.model.pooling, self.cfg.model.normalize,
            self.cfg.model.max_length, destination, state_dict=encoder_state, prompts=embedder.prompts,
            include_prompt=embedder.include_prompt)
        write_model_card(destination, self.cfg, RunFacts(
            embedding_dim=embedder.dim, plan=self.plan, steps=self.state.step, total_steps=self.total_steps,
            wall_time_s=time.monotonic() - self.start_time,
            data=self.stream.report() if self.stream is not None else self.data_report,
            eval_source=self.eval_data.describe() if self.eval_data is not None else None, metrics=metrics))
        console.print(f"model (sentence-transformers format): {destination}")

    # ------------------------------------------------------------------ evaluation

    def _load_eval_data(self) -> EvalData | None:
        """The held-out split: `eval.beir`, `eval.path`, or the shipped sample's own eval split when training on it."""
        if self.cfg.eval.path is None and self.cfg.eval.beir is None and not self.cfg.data.is_sample:
            return None
        with self.accelerator.main_process_first():
            if self.cfg.eval.beir is not None:
                return load_beir(self.cfg.eval.beir, self.cfg.eval.beir_split,
                                 read_sts(self.cfg.eval.sts) if self.cfg.eval.sts else None)
            return load_eval_data(self.cfg.eval.path, self.cfg.data, self.cfg.eval.corpus, sts=self.cfg.eval.sts,
                                  split=self.cfg.eval.split)

    def _evaluate(self, baseline: bool = False) -> dict[str, float]:
        """Evaluate on every rank (the encoding is sharded), log `eval/*` metrics, keep the best model if asked.

        The starting model's metrics are stored in RUN/eval_baseline.json, so a resumed run can still compare.
        """
        metrics = evaluate_embedder(self.accelerator.unwrap_model(self.student), self.tokenizer,
                                    self.cfg.model.max_length, self.eval_data, self.cfg.eval.batch_size,
                                    self.device, autocast=self.accelerator.autocast,
                                    dims=sorted(self.cfg.loss.matryoshka_dims or (), reverse=True))
        self._record({"step": self.state.step, **{f"eval/{name}": value for name, value in metrics.items()}})
        if self.accelerator.is_main_process:
            console.print(f"eval at step {self.state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if baseline:
                (self.run_dir / "eval_baseline.json").write_text(json.dumps(metrics))
        best_metric = self.cfg.checkpoint.keep_best
        if best_metric and not baseline:
            if best_metric not in metrics:
                raise ConfigError(f"checkpoint.keep_best={best_metric!r}: not an eval metric; use one of "
                                  f"{', '.join(metrics)}")
            # Rank 0 decides for all: the ZeRO-3 export below needs every rank, and ranks comparing their own floats
            # could disagree (and then wait forever).
            if distributed.main_process_decides(metrics[best_metric] > self.best_metric):
                self.best_metric = metrics[best_metric]
                self._export(self.run_dir / "best", metrics)
                if self.accelerator.is_main_process:
                    (self.run_dir / "best" / "best.json").write_text(
                        json.dumps({"step": self.state.step, "metric": best_metric, **metrics}))
        return metrics

    def _print_comparison(self, final: dict[str, float]) -> None:
        baseline_file = self.run_dir / "eval_baseline.json"
        if not self.accelerator.is_main_process or not baseline_file.is_file():
            return
        base = json.loads(baseline_file.read_text())
        table = Table(title=f"held-out retrieval: {self.cfg.model.name} before vs after GIST fine-tuning")
        for column in ("metric", "before", "after", "delta"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name, value in final.items():
            before = base.get(name, float("nan"))
            table.add_row(name, f"{before:.4f}", f"{value:.4f}", f"{value - before:+.4f}")
        console.print(table)
        console.print(f"plot this run: gist-scale report {self.run_dir}")


def _prompt_lines(student: Embedder, pool_prompt: bool) -> list[str]:
    """The student's prompts for the startup summary (none: no line)."""
    prompts = dict(student.prompts)
    if not prompts:
        return []
    shown = [f"{name} {prompts.pop(name)!r}" for name in ("query", "document") if name in prompts]
    if prompts:
        shown.append(f"{len(prompts)} task instruction(s)")
    return [f"prompts: {', '.join(shown)}" + ("" if pool_prompt else " (left out of pooling)")]


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Trackers take flat scalar hyperparameters: {"optim.lr": 2e-5, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def apply_debug(cfg: JobConfig) -> JobConfig:
    """Debug mode: a handful of logged-every-step iterations (`main` adds autograd anomaly detection), as a new
    config derived from the loaded one."""
    if launch_plan().world_size > 1:
        raise ConfigError("--debug runs a single process: start it with `gist-scale train --debug` (or "
                          "launch/single_gpu_debug.sh), not under torchrun/accelerate launch with several processes")
    train = dataclasses.replace(cfg.train, max_steps=min(cfg.train.max_steps or 3, 3), log_every=1,
                                max_nonfinite_steps=1)
    return dataclasses.replace(cfg, train=train)


def build_parser() -> ArgumentParser:
    """`gist-scale train`'s options: every config field (`--section.field VALUE`), `--recipe`, `--config`,
    `--dry-run`."""
    parser = job_parser("gist-scale train", "Fine-tune an embedding model with GISTEmbed. With no arguments: the "
                        "offline quickstart (all-MiniLM-L6-v2 guiding itself on the shipped WordNet sample). Values "
                        "are YAML: --optim.betas [0.9,0.99], --train.max_steps null; `--debug` alone means true.")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything that needs no weights (config, places, launch, checkpoint to resume, "
                             "data rows and tokenization), print the plan and the per-rank memory of the student's "
                             "weights, gradients and optimizer state, and exit without training")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_job(build_parser(), argv)
        if args.dry_run:
            return Trainer(cfg, load_models=False).dry_run()
        if cfg.debug:
            cfg = apply_debug(cfg)
        # Scoped, not global: in-process callers (tests, notebooks) must not keep paying for anomaly detection.
        with torch.autograd.set_detect_anomaly(cfg.debug):
            return Trainer(cfg).train()
    except (ConfigError, DataError, CheckpointError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        return 2
    except FloatingPointError as error:  # the run diverged (`Trainer._skip`): one line, not a traceback
        console.print(f"[red]error:[/red] {escape(str(error))}")
        return 1
    except RuntimeError as error:
        # A peer rank that died (gloo: connection reset/closed) or stalled past train.collective_timeout_s (timed
        # out) surfaces here on the surviving ranks: one clear line instead of a wall of tracebacks, and a non-zero
        # exit so the launcher ends the job. (NCCL's watchdog aborts the process itself, with its own message.)
        if not distributed.is_collective_failure(error):
            raise
        text = str(error)
        console.print(f"[red]error:[/red] rank {distributed.rank()}: a collective failed: another rank died, or "
                      f"stalled longer than train.collective_timeout_s ({cfg.train.collective_timeout_s} s). The job "
                      f"stops here; start it again with --resume auto to continue from the newest complete "
                      f"checkpoint. ({escape(text.strip().splitlines()[-1][:300])})")
        return 1
