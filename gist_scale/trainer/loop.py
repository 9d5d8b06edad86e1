"""`Trainer`: the GISTEmbed training loop on Accelerate (+ DeepSpeed ZeRO when configured), built from components.

Order, as in Accelerate's examples: Accelerator -> set_seed -> build (batches, student, guide, loss, optimizer)
-> prepare -> loop -> export -> end_training. The loop knows its components by their interfaces only: the batch
source (`batches`), the student policy (`student`), the optimizer step (`optimizer`), the evaluator, the exporter
and the metrics log (`step_metrics`); which data, which student, which parallel layout is theirs to know.

The step reads nothing back from the device: its decisions (skip a non-finite step, stop on preemption) stay on the
device or are host state, and metrics reach the host at log steps only (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import send_to_device, set_seed

from gist_scale import distributed, encode, faults
from gist_scale.checkpoint import TrainerState, incomplete_checkpoints, save_checkpoint
from gist_scale.config import JobConfig, save_config
from gist_scale.data import MixtureMeter, TripletBatch
from gist_scale.flops import peak_tflops
from gist_scale.loss import GISTLoss, LossPolicy
from gist_scale.memory import count_parameters, estimate_model_states, format_estimate
from gist_scale.model import Embedder, load_guide, load_tokenizer, outside_zero3
from gist_scale.model.prompts import load_task_instructions
from gist_scale.model_card import check_push_to_hub
from gist_scale.places import require_writable_dir
from gist_scale.preemption import EXIT_PREEMPTED, PreemptionFlag
from gist_scale.resume import plan_run
from gist_scale.trainer.accelerator import build_accelerator, configure_deepspeed, deepspeed_offload, zero3_restorer
from gist_scale.trainer.batches import build_batch_source
from gist_scale.trainer.console import console
from gist_scale.trainer.evaluator import build_evaluator, load_held_out
from gist_scale.trainer.exporter import SentenceTransformersExporter
from gist_scale.trainer.optimizer import NonFiniteSteps, build_optimizer, build_optimizer_step, build_scheduler
from gist_scale.trainer.step_metrics import (MetricsLog, MetricsWindow, StepMetrics, StepOutcome, model_flops,
                                             progress_bar)
from gist_scale.trainer.student import student_policy

__all__ = ["Trainer"]


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
        configure_deepspeed(self.accelerator, self.plan, cfg.train, cfg.optim)
        set_seed(cfg.train.seed)
        self.device = self.accelerator.device

        # Data first: a bad row must fail before any model is loaded.
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
        self.instructions = load_task_instructions(cfg.data.task_instructions)
        self.batches = build_batch_source(cfg, self.plan, self.resume, self.accelerator, self.tokenizer,
                                          self.instructions)
        self.mixture = MixtureMeter(self.batches.source_names, self.plan.grad_accum_steps, self.plan.global_batch)
        self.eval_data = load_held_out(cfg, self.accelerator)
        self.total_steps = self.plan.total_steps(self.batches.steps_per_epoch)
        if not load_models:
            return

        self.policy = student_policy(cfg.model, self.tokenizer, zero3_restorer(self.accelerator))
        student = self.policy.load(self.instructions)
        cfg.loss.check_embedding_dim(student.dim, cfg.model.name)
        # With a guide cache the guide is not loaded: its embeddings come with each batch.
        self.guide = (load_guide(cfg.guide, self.device, zero3_restorer(self.accelerator))
                      if cfg.guide.name is not None and cfg.guide.cache is None else None)
        self.encoder_configs = {"student": student.encoder.config}
        if self.guide is not None:
            self.encoder_configs["guide"] = self.guide.encoder.config
        # Outside debug mode, non-finite embeddings are not an error but a skipped step.
        self.loss_fn = faults.with_loss_fault(GISTLoss(**dataclasses.asdict(cfg.loss), check_finite=cfg.debug),
                                              cfg.train.grad_accum_steps)
        # The guide's settings per mixture source (index = `TripletBatch.source`); one source: the loss section's.
        self.policies = [LossPolicy.of(cfg.loss, source) for source in cfg.data.sources] or [LossPolicy.of(cfg.loss)]
        self.student, self.optimizer = self.accelerator.prepare(student, build_optimizer(student, cfg.optim))
        # Whatever started these processes: several of them train in sync (DDP, DeepSpeed), or not at all.
        distributed.require_synchronised(self.student, self.accelerator.num_processes,
                                         self.accelerator.distributed_type)
        self.state_kwargs = self.policy.checkpoint_kwargs(self.accelerator)
        # `from_pretrained` returns the encoder in eval mode (dropout off); evaluation restores whatever mode it found.
        self.student.train()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        # The scheduler is stepped by hand once per optimizer step; registering it puts it in every checkpoint.
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.update = build_optimizer_step(self.accelerator, self.student, self.optimizer, cfg.optim)
        self.state = TrainerState()
        self.nonfinite = NonFiniteSteps(self.device, cfg.train.max_nonfinite_steps)
        self.last_checkpoint_step: int | None = None
        self.metrics = MetricsLog(self.accelerator, self.run_dir, self.total_steps, cfg.train.grad_accum_steps,
                                  cfg.logging.peak_tflops or peak_tflops(self.device), self.batches.source_names)
        self.exporter = SentenceTransformersExporter(
            cfg, self.plan, self.total_steps, self.accelerator, self.student, self.policy, self.batches.report,
            self.eval_data.describe() if self.eval_data is not None else None, self.start_time)
        self.evaluator = build_evaluator(cfg, self.eval_data, self.accelerator, self.student, self.tokenizer,
                                         self.metrics.record, self.exporter, self.run_dir)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run to `total_steps`, or until a preemption signal; returns the exit code (0, or EXIT_PREEMPTED)."""
        self._start()
        progress = progress_bar(enabled=self.accelerator.is_main_process)
        bar = progress.add_task("train", total=self.total_steps, completed=self.state.step)
        window = MetricsWindow()
        steps = self.optimizer_steps()
        preempted = False
        with progress:
            while self.state.step < self.total_steps and not preempted:
                outcome = self.train_step(next(steps))
                preempted = outcome.preempted
                window.steps.append(outcome)
                progress.advance(bar)
                step = self.state.step
                if self._due(self.cfg.train.log_every) or step == self.total_steps:
                    self._log(window)  # the loop's sync point: metrics cross ranks and reach the host only here
                    window = MetricsWindow()
                if self._due(self.cfg.checkpoint.every):
                    window.timed("checkpoint_seconds", self._save_checkpoint)
                if self.evaluator.due(step) and step < self.total_steps:
                    window.timed("eval_seconds", lambda: self.evaluator.evaluate(step))
        return self._finish(preempted)

    def optimizer_steps(self) -> Iterator[list[TripletBatch]]:
        """This rank's micro-batches, on the device, grouped by optimizer step, from the resumed position. Every
        global batch, and so every epoch, holds whole steps (cut into `grad_accum_steps` parts)."""
        group: list[TripletBatch] = []
        for batch in self.batches:
            self.mixture.count(batch)
            group.append(send_to_device(batch, self.device, non_blocking=True))
            if len(group) == self.cfg.train.grad_accum_steps:
                yield group
                group = []

    def train_step(self, micro_batches: list[TripletBatch]) -> StepOutcome:
        """One optimizer step: forward and backward of every micro-batch, then its update, skipped whole when a loss
        was non-finite on any rank, in any micro-batch. Like AMP's GradScaler, a skipped step still counts (the step
        counter and the learning-rate schedule advance). Reads nothing back from the device; with several ranks, one
        small collective agrees on the skip and on stopping after this step (a preemption signal on any rank)."""
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        metrics = []
        for batch in micro_batches:
            with self.accelerator.accumulate(self.student):
                metrics.append(self._forward_backward(batch))
            nonfinite |= ~torch.isfinite(metrics[-1].loss)
        nonfinite, preempted = distributed.agree_on_step(nonfinite, self.preemption.is_set)
        skipped, grad_norm = self.update.apply(nonfinite)
        self.scheduler.step()
        self.state.step += 1
        self.nonfinite.add(skipped, nonfinite)
        return StepOutcome(skipped, preempted, metrics, grad_norm)

    def _forward_backward(self, batch: TripletBatch) -> StepMetrics:
        """Loss and backward of one micro-batch; returns its metrics (the detached loss among them)."""
        student = batch.student  # column tensors, or `chunking.ChunkedTexts` planned by the collator
        k = batch.num_negatives
        guide_embeddings = None, None, None  # no guide: plain InfoNCE
        if batch.guide_embeddings is not None:  # from the guide cache (`guide.cache`)
            guide_embeddings = tuple(batch.guide_embeddings.get(column) for column in ("query", "pos", "neg"))
        elif self.guide is not None:
            guide_embeddings = encode.embed_frozen(self.guide, batch.guide, k)
        grad_cache = None
        if self.cfg.train.grad_cache:
            # Embeddings without autograd now; the backward below re-encodes chunk by chunk with the cached gradient.
            grad_cache = encode.GradCache(self.student, student, k, self.accelerator.autocast)
            query, pos, neg = grad_cache.embeddings
        else:
            with self.accelerator.autocast():
                query, pos, neg = encode.encode_columns(self.student, student, k)
        loss, stats = self.loss_fn(query, pos, neg, *guide_embeddings, rank_sizes=self.plan.rank_sizes,
                                   text_ids=tuple(batch.text_ids.get(column) for column in ("query", "pos", "neg")),
                                   slot_roles=batch.slot_roles, policy=self.policies[batch.source or 0])
        if grad_cache is None:
            self.accelerator.backward(loss)
        else:
            grad_cache.backward(loss, encode.AcceleratorBackward(self.accelerator, self.student,
                                                                 coalesce=self.cfg.train.grad_cache_coalesce))
        if self.cfg.debug:  # debug mode reads every step back, on purpose
            shapes = ({col: tuple(f["input_ids"].shape) for col, f in student.items()} if isinstance(student, dict)
                      else [tuple(c["input_ids"].shape) for c in student.chunks])
            console.log(f"debug: step {self.state.step} shapes {shapes} loss {loss.item():.4f} "
                        f"masked {stats.masked_fraction.item():.3f} duplicates {stats.duplicates_masked.item():.0f} "
                        f"candidates/anchor {stats.candidates_per_anchor.item():.0f}")
        counts = batch.token_counts
        return StepMetrics(loss.detach(), stats, counts["student"].tokens, counts["student"].texts // (2 + k),
                           model_flops(self.encoder_configs, counts), batch.source)

    def _due(self, every: int | None) -> bool:
        """Is an every-N-steps action (logging, checkpointing) due after the step just taken?"""
        return bool(every) and self.state.step % every == 0

    # ------------------------------------------------------------------ start, log, checkpoint, finish

    def _start(self) -> None:
        """Resume, write the run's config, start the trackers, print the summary, evaluate the starting model."""
        resume_from = self.resume.checkpoint
        if resume_from is not None:
            self.state = self.resume.load(self.accelerator, self.state_kwargs.load)
            self.batches.load_state_dict(dataclasses.asdict(self.state))
            self.nonfinite = NonFiniteSteps(self.device, self.cfg.train.max_nonfinite_steps,
                                            self.state.nonfinite_in_a_row)
            self.last_checkpoint_step = self.state.step
        # Written only now, after the data, the models and the checkpoint have loaded: a start that fails on bad input
        # leaves the run directory of an earlier, good start as it was.
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.metrics.init_trackers(self.cfg)
        self._print_summary(resume_from)
        if self.state.step == 0:
            self.evaluator.baseline(self.state.step)

    def _log(self, window: MetricsWindow) -> None:
        """Log the window's steps; too many non-finite steps in a row (read here) stop the run."""
        skipped, longest = self.nonfinite.read(self.state.step)
        if skipped and self.accelerator.is_main_process:
            console.print(f"[yellow]non-finite loss: {skipped} step(s) skipped up to step {self.state.step} "
                          f"({longest}/{self.nonfinite.limit} in a row at most)")
        self.metrics.log(window, {"step": self.state.step, "epoch": self.batches.epoch,
                                  "lr": self.scheduler.get_last_lr()[0], "skipped_steps": skipped,
                                  **self.mixture.flush()})

    def _save_checkpoint(self) -> None:
        # Checkpoints are taken between steps: the batch source's position is where training stands.
        self.state = dataclasses.replace(self.state, nonfinite_in_a_row=self.nonfinite.in_a_row(),
                                         **self.batches.state_dict())
        save_checkpoint(self.accelerator, self.checkpoint_dir, self.state, self.cfg.checkpoint.keep_last,
                        self.resume.record(self.state), self.state_kwargs.save)
        self.last_checkpoint_step = self.state.step

    def _finish(self, preempted: bool) -> int:
        """The loop's one exit: a preempted run leaves a checkpoint to resume from, a finished one its models."""
        if preempted:
            if self.last_checkpoint_step != self.state.step:
                self._save_checkpoint()
            console.print(f"[yellow]preempted at step {self.state.step}: checkpoint saved; exiting with "
                          f"{EXIT_PREEMPTED} so the job is requeued")
        else:
            # Evaluated before the export, so that final/'s model card holds the final metrics.
            final_metrics = self.evaluator.evaluate(self.state.step)
            self.exporter.export(self.run_dir / "final", self.state.step, final_metrics)
            self.evaluator.compare(final_metrics)
            self.exporter.publish(self.run_dir / "final")
        # From here a signal has nothing left to save: the process ends normally.
        self.preemption.uninstall()
        self.accelerator.end_training()
        return EXIT_PREEMPTED if preempted else 0

    # ------------------------------------------------------------------ what the run says about itself

    def _print_summary(self, resume_from: Path | None) -> None:
        if self.accelerator.is_main_process:
            # ZeRO-3 leaves each rank a shard; `ds_numel` is the whole parameter.
            trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.student.parameters() if p.requires_grad)
            guide = self.cfg.guide
            lines = [
                self.plan.summary(),
                f"steps {self.total_steps} ({self.batches.epochs})  guide {guide.name or 'none (plain InfoNCE)'} "
                + (f"(cached embeddings: {guide.cache})" if guide.cache else f"({guide.dtype})"),
                f"student {self.cfg.model.name}: {trainable / 1e6:.1f}M trainable parameters",
                *self.batches.lines(),
                *_prompt_lines(self.accelerator.unwrap_model(self.student), self.cfg.model.pool_prompt),
                f"run directory: {self.run_dir}",
            ]
            lines += [f"[yellow]ignoring incomplete checkpoint {path}" for path in incomplete_checkpoints(
                self.checkpoint_dir)]
            if resume_from is not None:
                lines += [f"resumed from {resume_from} at step {self.state.step}", *self.resume.summary_lines()]
            self.batches.write_mixture(self.run_dir)
            console.rule("gist-scale train")
            for line in lines:
                console.print(line)

    def dry_run(self) -> int:
        """Print what the run would do (`--dry-run`, on a Trainer built with `load_models=False`): the plan, the
        schedule, the data, the resume, and the student's per-rank memory for weights, gradients and optimizer
        state under this launch's ZeRO stage (`gist_scale.memory`, counted on the meta device). Returns 0."""
        with outside_zero3(zero3_restorer(self.accelerator)):  # the meta device: nothing for zero.Init to partition
            counts = count_parameters(self.cfg.model)
        estimate = estimate_model_states(counts, self.plan.zero_stage or 0, self.plan.world_size,
                                         self.plan.mixed_precision, **deepspeed_offload(self.accelerator))
        if self.accelerator.is_main_process:
            lines = ["[bold]dry run[/bold]: nothing is trained and no weights are loaded", self.plan.summary(),
                     f"steps {self.total_steps} ({self.batches.epochs})", *self.batches.lines(),
                     *self.resume.summary_lines(), f"student {self.cfg.model.name}",
                     *format_estimate(counts, estimate).splitlines(), f"run directory: {self.run_dir}"]
            console.print("\n".join(lines), markup=True)
        return 0


def _prompt_lines(student: Embedder, pool_prompt: bool) -> list[str]:
    """The student's prompts for the startup summary (none: no line)."""
    prompts = dict(student.prompts)
    if not prompts:
        return []
    shown = [f"{name} {prompts.pop(name)!r}" for name in ("query", "document") if name in prompts]
    if prompts:
        shown.append(f"{len(prompts)} task instruction(s)")
    return [f"prompts: {', '.join(shown)}" + ("" if pool_prompt else " (left out of pooling)")]
