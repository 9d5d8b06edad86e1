"""Elastic resume: the global batch is the run's identity, the world size is not.

What defines a run is recorded in every checkpoint's `run.json`: the global batch (the rows whose embeddings are
each other's negatives and which the guide masks), the accumulation, the data position in global batches, the
model, the guide, the loss settings, the seed and the fingerprint of the loaded data; plus the world size and ZeRO
stage that wrote it, which are *not* identity. A resume

- on the same world size loads the checkpoint as it is;
- on another world size keeps the global batch: the per-device batch becomes `global / (world x accumulation)`,
  decided here before anything is loaded (a world size that does not divide fails with the ones that do), the
  sampler continues at the same global batch (its plan depends only on the global batch, not on the world size),
  DDP's replicated state loads on any world size, and partitioned ZeRO-1/2/3 states are converted once into
  DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`), cached in `step_N/universal/`, and
  loaded with DeepSpeed's `load_universal`; a ZeRO checkpoint resumed without DeepSpeed (DDP or one process) is
  consolidated from that universal form into `step_N/plain/`. Per-rank dropout RNG streams cannot be mapped onto
  another rank count:
  every rank is re-seeded from (seed, step, rank), so dropout masks after such a resume differ from those of an
  uninterrupted run; the data order, the optimizer state and the learning-rate schedule do not;
- with a changed identity field is refused, naming the field, unless `checkpoint.allow_changes` lists it.

The order in `Trainer.__init__`: `plan_run` right after the Accelerator exists (before the DeepSpeed config is
filled, the data read or any model loaded), `ResumePlan.check_data` once the data is loaded and batched (before
the models), `ResumePlan.load` in place of a plain `load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from argparse import Namespace
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from gist_scale.checkpoint import (COMPLETE_MARKER, RUN_FILE, STATE_FILE, CheckpointError, TrainerState,
                                   load_checkpoint, resolve_resume, verify_checkpoint)
from gist_scale.config import RESUME_IDENTITY, JobConfig
from gist_scale.data import SamplerSummary
from gist_scale.plan import RunPlan, processes, requested_global_batch

UNIVERSAL_DIR = "universal"
"""Inside `step_N/`: the checkpoint converted to DeepSpeed's universal format, with the non-DeepSpeed files."""
PLAIN_DIR = "plain"
"""Inside `step_N/`: a ZeRO checkpoint as `accelerator.save_state` writes it without DeepSpeed (whole weights, AdamW
state by parameter), built from the universal one, for a resume without DeepSpeed."""
_DEEPSPEED_TAG = "pytorch_model"  # where `accelerator.save_state` puts the engine's files (its `ckpt_id`)

_FIX = {
    "train.global_batch_size": "--train.global_batch_size, or --train.batch_size with the checkpoint's world size",
    "data.fingerprint": "the --data.* options or the data files",
}


def config_identity(cfg: JobConfig) -> dict[str, Any]:
    """The identity fields a config alone determines (all but the global batch and the data fingerprint)."""
    fields = [(name, getattr(cfg, name.partition(".")[0]), name.partition(".")[2]) for name in RESUME_IDENTITY]
    return {name: getattr(section, key) for name, section, key in fields if hasattr(section, key)}


@dataclass
class RunRecord:
    """`run.json` of a checkpoint: what the run is, where its data stands, and the layout that wrote it."""

    global_batch_size: int
    world_size: int
    per_device_batch_size: int
    grad_accum_steps: int
    zero_stage: int | None
    """DeepSpeed ZeRO stage, None for DDP or one plain process (their states are not partitioned)."""
    epoch: int = 0
    global_batches: int = 0
    """Global batches of `epoch` already trained on: the data position, the same for every world size."""
    steps_per_epoch: int = 0
    identity: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, checkpoint: Path) -> RunRecord:
        # A damaged checkpoint is named by the file that is damaged, before its run record is trusted.
        verify_checkpoint(checkpoint)
        path = checkpoint / RUN_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError as error:
            raise CheckpointError(f"{path}: missing; {checkpoint} was written before checkpoints recorded their "
                                  "run, and cannot be resumed by this version") from error
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: unreadable run record ({error}); resume from an older checkpoint "
                                  "with --resume PATH") from error


@dataclass
class ResumePlan:
    """The checkpoint a run continues from (if any) and how it maps onto this run's plan; `load` and `record`
    carry it out."""

    cfg: JobConfig
    plan: RunPlan
    checkpoint: Path | None = None
    saved: RunRecord | None = None
    notes: list[str] = field(default_factory=list)
    """Summary lines for the identity changes that checkpoint.allow_changes let through."""
    data_fingerprint: str | None = None
    steps_per_epoch: int = 0

    @property
    def resharded(self) -> bool:
        return self.saved is not None and self.saved.world_size != self.plan.world_size

    def check_data(self, dataset_fingerprint: str, summary: SamplerSummary) -> None:
        """Refuse other data, and a sampler plan that a world-size change would alter; before any model loads."""
        self.data_fingerprint, self.steps_per_epoch = dataset_fingerprint, summary.steps_per_epoch
        if self.saved is None:
            return
        allowed = self.cfg.checkpoint.allow_changes
        self.notes += _compare(self.checkpoint, self.saved, allowed, {"data.fingerprint": dataset_fingerprint})
        changed_data = any(name in allowed for name in ("data.fingerprint", "train.global_batch_size"))
        if summary.steps_per_epoch != self.saved.steps_per_epoch and not changed_data:
            # Only data.drop_last=false can do this: a task's tail is kept only when it gives every process a row.
            raise CheckpointError(
                f"{self.checkpoint}: an epoch had {self.saved.steps_per_epoch} global batches on "
                f"{processes(self.saved.world_size)} and would have {summary.steps_per_epoch} on "
                f"{self.plan.world_size} (data.drop_last=false keeps a task's tail only when every process gets a "
                f"row of it), so the remaining batches would differ; resume on {self.saved.world_size} processes")

    def record(self, state: TrainerState) -> dict[str, Any]:
        """`run.json` for a checkpoint of `state`."""
        plan = self.plan
        identity = {**config_identity(self.cfg), "train.global_batch_size": plan.global_batch,
                    "data.fingerprint": self.data_fingerprint}
        return asdict(RunRecord(
            global_batch_size=plan.global_batch, world_size=plan.world_size,
            per_device_batch_size=plan.per_device_batch, grad_accum_steps=plan.grad_accum_steps,
            zero_stage=plan.zero_stage, epoch=state.epoch,
            # The loop counts micro-batches; every rank takes one slice of each micro-global batch.
            global_batches=state.position // plan.grad_accum_steps,
            steps_per_epoch=self.steps_per_epoch, identity=identity))

    def load(self, accelerator: Accelerator, state_kwargs: dict | None = None) -> TrainerState:
        """Restore the checkpoint onto this world size; returns the loop state, positioned in this run's units."""
        assert self.checkpoint is not None and self.saved is not None, "load() without a checkpoint to resume"
        source = self.checkpoint
        if self.saved.zero_stage is not None and self.plan.zero_stage is None:
            source = plain_checkpoint(accelerator, self.checkpoint)
        elif self.resharded and self.plan.zero_stage is not None:
            source = universal_checkpoint(accelerator, self.checkpoint)
        optimizer = accelerator._optimizers[0]  # the trainer's one optimizer
        built = [group["weight_decay"] for group in optimizer.param_groups]
        state = load_checkpoint(accelerator, self.checkpoint, load_from=source, state_kwargs=state_kwargs)
        _repair_loaded_optimizer(optimizer, built)
        if self.resharded:
            # The saved per-rank streams belong to another rank count (some ranks have none, some files are left
            # over); a stream per (seed, step, rank) keeps a resume reproducible.
            seed = np.random.SeedSequence([self.cfg.train.seed, state.step]).generate_state(1)[0]
            set_seed(int(seed) % 2**31, device_specific=True)
        # The position in this run's micro-batches; scaled by rows when the global batch was allowed to change.
        global_batches = self.saved.global_batches * self.saved.global_batch_size // self.plan.global_batch
        return replace(state, epoch=self.saved.epoch,
                       position=min(global_batches, self.steps_per_epoch) * self.plan.grad_accum_steps)

    def summary_lines(self) -> list[str]:
        if self.saved is None:
            return []
        lines = list(self.notes)
        plan = self.plan
        if self.resharded:
            kept = plan.global_batch == self.saved.global_batch_size
            lines.append(
                f"resuming a checkpoint of {processes(self.saved.world_size)} on {plan.world_size}: "
                + (f"same global batch {plan.global_batch}" if kept else
                   f"global batch {self.saved.global_batch_size} -> {plan.global_batch}")
                + f", per-device batch {self.saved.per_device_batch_size} -> "
                f"{plan.per_device_batch}; data order, optimizer state and learning-rate schedule continue, "
                "dropout masks are re-seeded (per-rank RNG streams do not carry over to another process count)")
            if plan.zero_stage is not None:
                lines.append(f"ZeRO-{plan.zero_stage} states resharded through DeepSpeed's universal checkpoint "
                             f"{self.checkpoint / UNIVERSAL_DIR} (converted once, kept with the checkpoint)")
        if self.saved.zero_stage is not None and plan.zero_stage is None:
            lines.append(f"ZeRO-{self.saved.zero_stage} states consolidated for a run without DeepSpeed into "
                         f"{self.checkpoint / PLAIN_DIR} (through DeepSpeed's universal checkpoint; converted once)")
        return lines


def plan_run(cfg: JobConfig, accelerator: Accelerator, checkpoint_dir: Path) -> ResumePlan:
    """The run's plan on this launch, with the checkpoint it resumes (`cfg.resume`), if any; loads nothing heavy.

    A fresh run takes its global batch from the config; a resumed one keeps the checkpoint's, whatever the world
    size now (a per-device batch in the config means "at the world size that started the run"). Refuses another
    run's checkpoint, naming the fields that differ, and sets DeepSpeed's `load_universal` when a partitioned
    checkpoint must be resharded. Raises ConfigError/CheckpointError (exit 2) with the fix.
    """
    plugin = accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage) if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    layout = {"world_size": accelerator.num_processes, "rank": accelerator.process_index, "zero_stage": stage,
              "device": str(accelerator.device)}
    checkpoint = resolve_resume(cfg.resume, checkpoint_dir)
    if checkpoint is None:
        return ResumePlan(cfg, RunPlan.create(cfg, **layout))
    saved = RunRecord.read(checkpoint)
    intended = requested_global_batch(cfg.train, saved.world_size)
    allowed = cfg.checkpoint.allow_changes
    notes = _compare(checkpoint, saved, allowed, {**config_identity(cfg), "train.global_batch_size": intended})
    kept = intended if "train.global_batch_size" in allowed else saved.global_batch_size
    plan = RunPlan.create(cfg, **layout, resumed_global_batch=kept,
                          source=f"the checkpoint {checkpoint.name}'s global batch")
    # ZeRO -> DDP or one plain process goes through the universal checkpoint too (`plain_checkpoint`).
    if saved.zero_stage != stage and stage is not None:
        written = "without DeepSpeed" if saved.zero_stage is None else f"under ZeRO-{saved.zero_stage}"
        layouts = ("DDP or one process" if saved.zero_stage is None
                   else f"ZeRO-{saved.zero_stage}, or DDP or one process without DeepSpeed")
        raise CheckpointError(
            f"{checkpoint}: written {written}, and this run uses ZeRO-{stage}; resume it with {layouts} (any "
            "number of processes that divides the global batch)")
    resume = ResumePlan(cfg, plan, checkpoint, saved, notes)
    if resume.resharded and stage is not None:
        plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
    return resume


def _compare(checkpoint: Path, saved: RunRecord, allowed: tuple[str, ...], current: dict[str, Any]) -> list[str]:
    """Refuse differing identity fields not listed in checkpoint.allow_changes; summary notes for the allowed ones."""
    differ = [(name, saved.identity.get(name), value) for name, value in current.items()
              if saved.identity.get(name) != value]
    refused = [(name, old, new) for name, old, new in differ if name not in allowed]
    if refused:
        fields = "\n  ".join(f"{name}: checkpoint {old!r}, this run {new!r} ({_FIX.get(name, '--' + name)})"
                             for name, old, new in refused)
        names = ",".join(name for name, _, _ in refused)
        raise CheckpointError(
            f"{checkpoint} is from another run; refusing to resume it:\n  {fields}\nresume with the "
            f"checkpoint's settings, start a new run in another train.output_dir, or accept the change with "
            f"--checkpoint.allow_changes '[{names}]'")
    return [f"[yellow]checkpoint.allow_changes: {name} changed from {old!r} to {new!r}" for name, old, new in differ]


def _repair_loaded_optimizer(optimizer: Any, weight_decays: list[float]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal-checkpoint loader (`load_hp_checkpoint_state_from_checkpoint_
    dir_stage3`, DeepSpeed 0.19), harmless after any other load:

    * it gives every sub-group's AdamW state the *same* `step` tensor, which AdamW increments in place, once per
      sub-group per step: with weights that decay and weights that do not (two groups), the bias correction then
      runs ahead (measured: losses off by 1e-4 four steps after a resume on another process count);
    * it gives every parameter group the hyperparameters of the first, which would put weight decay on the biases
      and norms; weight decay is fixed per group for the whole run, so the groups keep those this run built.
    """
    for group, decay in zip(optimizer.param_groups, weight_decays, strict=True):
        group["weight_decay"] = decay
    # torch's AdamW state, which Accelerate's wrapper and DeepSpeed's ZeRO optimizer both hand on as their `state`.
    for param_state in optimizer.state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()


def universal_checkpoint(accelerator: Accelerator, checkpoint: Path) -> Path:
    """`checkpoint` converted to DeepSpeed's universal format in `checkpoint/universal/` (once; then reused).

    DeepSpeed's universal format stores every parameter's fp32 weights and optimizer moments whole, so any number
    of ranks can take its partition of them (`load_universal`). The directory also gets the checkpoint's other
    files (scheduler, custom objects) so that `accelerator.load_state` can read it like the checkpoint itself.
    The main process converts into a temporary directory and renames it, so a killed conversion is redone.
    """
    target = checkpoint / UNIVERSAL_DIR
    if accelerator.is_main_process and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = checkpoint / f".tmp-{UNIVERSAL_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(input_folder=str(checkpoint / _DEEPSPEED_TAG), output_folder=str(tmp / _DEEPSPEED_TAG),
                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                         # Our engines do not set DeepSpeed's universal-checkpoint info; plain ZeRO needs none.
                         inject_missing_state=True)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as error:  # DeepSpeed raises assorted types; keep its own output for the message
            raise CheckpointError(f"{checkpoint}: converting to DeepSpeed's universal checkpoint failed ({error}); "
                                  f"resume on {RunRecord.read(checkpoint).world_size} processes instead. "
                                  f"Conversion log:\n{log.getvalue()[-2000:]}") from error
        _copy_common_files(checkpoint, tmp)
        os.replace(tmp, target)
    accelerator.wait_for_everyone()
    return target


def _copy_common_files(checkpoint: Path, destination: Path) -> None:
    """The checkpoint's files that every layout reads alike (scheduler, custom objects, RNG states)."""
    for file in checkpoint.iterdir():
        if file.is_file() and file.name not in (COMPLETE_MARKER, STATE_FILE, RUN_FILE):
            shutil.copy2(file, destination / file.name)


def plain_checkpoint(accelerator: Accelerator, checkpoint: Path) -> Path:
    """A ZeRO `checkpoint` as a run without DeepSpeed (DDP or one process) saves it, in `checkpoint/plain/`.

    The universal checkpoint holds every parameter's fp32 weights and AdamW moments whole, by parameter name; here
    they become `model.safetensors` (keyed like this run's model) and `optimizer.bin` (this run's optimizer groups,
    with the saved learning rate and step), which `accelerator.load_state` then reads as usual.
    """
    from safetensors.torch import save_file

    universal = universal_checkpoint(accelerator, checkpoint)
    target = checkpoint / PLAIN_DIR
    if accelerator.is_main_process and not target.is_dir():
        zero = universal / _DEEPSPEED_TAG / "zero"

        def saved(name: str, key: str) -> torch.Tensor:
            value = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
            return value["param"] if isinstance(value, dict) else value  # ZeRO-1/2 wrap tensors, ZeRO-3 does not

        model = accelerator._models[0]
        names = {param: name for name, param in accelerator.unwrap_model(model).named_parameters()}
        weights = {key: (saved(name, "fp32").reshape(value.shape) if (name := key.removeprefix("module."))
                         in names.values() else value).contiguous()
                   for key, value in accelerator.get_state_dict(model, unwrap=False).items()}
        global_state = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
        lr = global_state["param_groups"][0]["lr"]  # one schedule: every group has the same rate
        state, groups = {}, []
        for group in accelerator._optimizers[0].optimizer.param_groups:
            indices = []
            for param in group["params"]:
                name = names[param]
                step = (saved(name, "step") if (zero / name / "step.pt").is_file()
                        else global_state["optimizer_state_dict"]["state"][0]["step"])  # ZeRO-3 keeps it once
                state[len(state)] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                                     **{key: saved(name, key).reshape(param.shape) for key in ("exp_avg", "exp_avg_sq")}}
                indices.append(len(state) - 1)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "lr": lr, "params": indices})
        tmp = checkpoint / f".tmp-{PLAIN_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save({"state": state, "param_groups": groups}, tmp / "optimizer.bin")
        _copy_common_files(checkpoint, tmp)
        # ZeRO-3 regroups the parameters, so the schedule's per-group lists (one schedule for all groups) are
        # re-cut to this run's groups. It is the trainer's one object registered for checkpointing.
        schedule = tmp / "custom_checkpoint_0.pkl"
        saved_schedule = torch.load(schedule, weights_only=False)
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            saved_schedule[key] = saved_schedule[key][:1] * len(groups)
        torch.save(saved_schedule, schedule)
        os.replace(tmp, target)
    accelerator.wait_for_everyone()
    return target
