"""The run's Accelerator, and the DeepSpeed configuration filled from the run plan.

Only the student and its optimizer go through `prepare`, so the student is the only module DDP wraps or DeepSpeed
shards; the guide stays a frozen bf16 module beside it. The DataLoader is deliberately not prepared: the batch
source already hands every rank its slice of a task-homogeneous global batch and resumes mid-epoch exactly, which
Accelerate's sharding would undo.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from gist_scale import encode
from gist_scale.config import LoggingConfig, OptimConfig, TrainConfig
from gist_scale.plan import RunPlan, launch_plan

__all__ = ["build_accelerator", "configure_deepspeed", "deepspeed_offload", "zero3_restorer"]


def build_accelerator(train: TrainConfig, logging: LoggingConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator, set up as `gist_scale.plan.launch_plan` says for this launcher and machine (DDP over gloo
    for CPU processes, the device's backend on GPUs, DeepSpeed when the launcher asks for it)."""
    plan = launch_plan(deepspeed=True)
    # The plan's backend, named: gloo for CPU processes (left to itself, Accelerate's CPU mode would pick MPI where
    # torch has it, which torchrun does not set up) and for DeepSpeed on CPU; nccl on GPUs. The timeout is what ends
    # the job when a peer dies instead of hanging forever. A single process must not name a backend at all, or
    # Accelerate expects a process group that nobody started.
    handlers = ([] if plan.backend is None else
                [InitProcessGroupKwargs(backend=plan.backend, timeout=timedelta(seconds=train.collective_timeout_s))])
    return Accelerator(cpu=plan.cpu, mixed_precision=train.mixed_precision, kwargs_handlers=handlers,
                       gradient_accumulation_steps=train.grad_accum_steps, step_scheduler_with_optimizer=False,
                       log_with=list(logging.trackers) or None, project_dir=str(run_dir))


def configure_deepspeed(accelerator: Accelerator, plan: RunPlan, train: TrainConfig, optim: OptimConfig) -> None:
    """Fill the `"auto"` entries of the DeepSpeed JSON from the run plan and the config (the single source of
    truth), and refuse a DeepSpeed that GradCache cannot run on. Nothing to do without DeepSpeed."""
    if plan.zero_stage is None:
        return
    if train.grad_cache:
        encode.require_deepspeed_for_grad_cache(importlib.metadata.version("deepspeed"))
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    # We never hand Accelerate a DataLoader, so it cannot infer the micro-batch size itself.
    ds["train_micro_batch_size_per_gpu"] = plan.per_device_batch
    ds["train_batch_size"] = plan.global_batch
    ds["gradient_clipping"] = optim.max_grad_norm or 0.0
    # A non-finite loss skips the whole step, but under DeepSpeed the update runs inside the last backward: DeepSpeed's
    # own check of the gradients must skip it (`gist_scale.trainer.optimizer.DeepSpeedStep`). bf16 has it off by
    # default.
    ds.setdefault("bf16", {})["check_grad_overflow"] = True
    if plan.zero_stage == 3:
        # The final export needs full weights consolidated from the shards.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def deepspeed_offload(accelerator: Accelerator) -> dict[str, bool]:
    """Whether the DeepSpeed config offloads the optimizer state and the parameters (neither without DeepSpeed), as
    `gist_scale.memory.estimate_model_states`' `offload_optimizer` and `offload_param`."""
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin else {}
    return {f"offload_{part}": zero.get(f"offload_{part}", {}).get("device", "none") != "none"
            for part in ("optimizer", "param")}


def zero3_restorer(accelerator: Accelerator) -> Callable[[], None] | None:
    """What re-registers the DeepSpeed config after loading a model outside ZeRO-3 (`gist_scale.model.outside_zero3`);
    None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.set_deepspeed_weakref if plugin else None
