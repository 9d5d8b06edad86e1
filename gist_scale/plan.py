"""The run plan: what the launcher started and what the config asks for, decided once.

`launch_plan` is the one reader of the launcher's environment (`WORLD_SIZE`, `ACCELERATE_USE_CPU`, ...): it says how
Accelerate must be set up so that the job's processes train in sync. `RunPlan` is the run's geometry, computed once
from the config, the launch and the checkpoint being resumed: world size, rank, per-device batch, accumulation,
global batch, rank sizes, ZeRO stage, precision, device, steps and epochs. The sampler, the stream, the loss, the
DeepSpeed config, resume, the model card and the start-up summary read it; nothing recomputes it. Elastic resume is
a new plan for another world size with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gist_scale.config import ConfigError, JobConfig, TrainConfig

__all__ = ["LaunchPlan", "RunPlan", "global_batch", "launch_plan", "launched_world_size", "per_device_batch",
           "processes", "requested_global_batch"]


@dataclass(frozen=True)
class LaunchPlan:
    """How Accelerate must be set up for this process to join its job: the one answer the trainer and every
    command run under a launcher use."""

    world_size: int
    """Processes the launcher started (torchrun's and accelerate launch's `WORLD_SIZE`; 1 without a launcher)."""
    cpu: bool
    """Accelerate's `cpu=`: True makes it set up a `MULTI_CPU` job (gloo) instead of the device's backend."""
    backend: str | None
    """Process-group backend; None for a single process, which must not name one (nobody starts a group)."""


_MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""What MPI launchers set instead of `WORLD_SIZE` (Accelerate's `MULTI_CPU` reads them under `mpirun`)."""


def launched_world_size() -> int:
    """Processes the launcher started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_plan(deepspeed: bool = False) -> LaunchPlan:
    """Decide, from the launcher's environment and this machine, how Accelerate synchronises the job's processes.

    Accelerate looks for a device with a distributed backend (CUDA: nccl) and, on a machine without one, calls a
    multi-process job "not distributed" unless told `cpu=True`: it still forms a gloo group, but `prepare` leaves the
    model unwrapped (no DDP) and every rank steps on its own gradients. So without an accelerator several processes
    get `cpu=True` (Accelerate's `MULTI_CPU`, DDP over gloo), whatever the launcher. The exception is DeepSpeed
    (`deepspeed`: the caller runs it when `ACCELERATE_USE_DEEPSPEED=true` asks, as the trainer does), which
    Accelerate sets up only with `cpu=False`, and which forms its gloo group itself. `ACCELERATE_USE_CPU`, which
    Accelerate obeys in any case, makes the plan say so, so that no device backend is named for a CPU job.

    Raises ConfigError when `accelerate launch --cpu` asked for several processes but started one (its `--cpu`
    starts several only under MPI): that process would train alone, on a fraction of the global batch.
    """
    from accelerate.utils import parse_flag_from_env  # heavy, and only commands that start Accelerate need it

    world = launched_world_size()
    cpu_requested = parse_flag_from_env("ACCELERATE_USE_CPU")
    if world <= 1:
        # accelerate launch's single-process launcher (no torchrun, so no WORLD_SIZE; ACCELERATE_DYNAMO_BACKEND as
        # every accelerate launcher) sets MASTER_ADDR only when more processes or machines were asked for, yet starts
        # one process unless MPI starts them. torchrun with one process sets WORLD_SIZE=1 and MASTER_ADDR: not this.
        lone = (cpu_requested and "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ
                and "MASTER_ADDR" in os.environ
                and not any(int(os.environ.get(name, "1")) > 1 for name in _MPI_WORLD_SIZES))
        if lone:
            raise ConfigError(
                "accelerate launch --cpu started a single process although several were asked for (it sets "
                "MASTER_ADDR only for --num_processes or --num_machines above 1): its --cpu mode starts several "
                "processes only under MPI (--mpirun_hostfile). For N CPU processes run `accelerate launch --multi_gpu "
                "--num_processes N -m gist_scale ...` or `torchrun --nproc_per_node N -m gist_scale ...`, which use "
                "gloo when there is no GPU; for one process leave --num_processes out (and unset MASTER_ADDR)")
        return LaunchPlan(world, cpu=False, backend=None)
    deepspeed_requested = deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed_requested and cpu_requested:
        # Accelerate sets DeepSpeed up only when not told cpu: the job would train as plain DDP, unsharded, silently.
        raise ConfigError("ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_USE_CPU=1: in CPU mode Accelerate drops "
                          "DeepSpeed and would train plain DDP, without ZeRO; unset ACCELERATE_USE_CPU (DeepSpeed runs "
                          "on CPU over gloo by itself), or unset ACCELERATE_USE_DEEPSPEED for DDP")
    accelerator = None if cpu_requested else torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None:
        return LaunchPlan(world, cpu=False, backend="nccl" if accelerator.type == "cuda" else "gloo")
    # CPU processes: DDP over gloo (`cpu=True`), unless DeepSpeed, which forms its gloo group itself (and which
    # `cpu_requested` has been refused with above).
    return LaunchPlan(world, cpu=not deepspeed_requested, backend="gloo")


def global_batch(per_device_batch: int, world_size: int, grad_accum_steps: int) -> int:
    """Triplets per optimizer step over all ranks and accumulation micro-steps: the run's batch, which defines each
    step's GIST negatives."""
    return per_device_batch * world_size * grad_accum_steps


def requested_global_batch(train: TrainConfig, world_size: int) -> int:
    """The global batch the config asks for at `world_size`: `global_batch_size`, or `batch_size` x `world_size` x
    `grad_accum_steps`."""
    if train.global_batch_size is not None:
        return train.global_batch_size
    return global_batch(train.batch_size, world_size, train.grad_accum_steps)


def processes(count: int) -> str:
    """`1 process`, `2 processes`: for messages."""
    return f"{count} process" if count == 1 else f"{count} processes"


def per_device_batch(global_rows: int, world_size: int, grad_accum_steps: int, source: str) -> int:
    """`global / (world x accumulation)`, or a ConfigError listing the world sizes that divide it."""
    per_step = world_size * grad_accum_steps
    if global_rows % per_step == 0:
        return global_rows // per_step
    rows = global_rows // grad_accum_steps if global_rows % grad_accum_steps == 0 else None
    working = ([f"{w} ({rows // w} per device)" for w in range(1, rows + 1) if rows % w == 0] if rows else [])
    options = (f"world sizes that work with train.grad_accum_steps={grad_accum_steps}: {', '.join(working)}"
               if working else f"no world size works with train.grad_accum_steps={grad_accum_steps}")
    raise ConfigError(f"global batch {global_rows} ({source}) cannot be split over {processes(world_size)} x "
                      f"{grad_accum_steps} accumulation steps ({global_rows} / {per_step} is not a whole number); "
                      f"{options}. Start the job with one of those process counts")


@dataclass(frozen=True)
class RunPlan:
    """The run's geometry, decided once (`RunPlan.create`), read by everything that needs it."""

    world_size: int
    """Processes in the job."""
    rank: int
    """This process's rank."""
    global_batch: int
    """Triplets per optimizer step over all ranks and accumulation micro-steps."""
    per_device_batch: int
    """Triplets per rank per micro-step: `global_batch / (world_size x grad_accum_steps)`."""
    grad_accum_steps: int
    """Micro-steps per optimizer step."""
    rank_sizes: tuple[int, ...] | None
    """Rows of every rank's micro-batch when they are known in advance (full global batches only: `data.drop_last`,
    or a stream), so the loss need not exchange them; None when an epoch's tail may be uneven."""
    zero_stage: int | None
    """DeepSpeed ZeRO stage; None for DDP or one plain process."""
    mixed_precision: str
    """The student's autocast precision (`train.mixed_precision`)."""
    device: str
    """This process's device."""
    max_steps: int | None
    """Optimizer steps to run; None: `epochs` full epochs (see `total_steps`)."""
    epochs: int
    """Epochs when `max_steps` is None."""

    @classmethod
    def create(cls, cfg: JobConfig, world_size: int, rank: int = 0, zero_stage: int | None = None,
               device: str = "cpu", resumed_global_batch: int | None = None, source: str | None = None) -> RunPlan:
        """The plan for `cfg` on this launch. `resumed_global_batch`: the global batch of the checkpoint being
        resumed (elastic resume keeps it whatever the world size), named by `source` in errors."""
        train = cfg.train
        rows = requested_global_batch(train, world_size) if resumed_global_batch is None else resumed_global_batch
        if source is None:
            source = (f"train.global_batch_size={train.global_batch_size}" if train.global_batch_size is not None
                      else f"train.batch_size={train.batch_size} x {processes(world_size)} x {train.grad_accum_steps}")
        per_device = per_device_batch(rows, world_size, train.grad_accum_steps, source)
        full_batches = cfg.data.drop_last or cfg.data.streaming
        return cls(world_size=world_size, rank=rank, global_batch=rows, per_device_batch=per_device,
                   grad_accum_steps=train.grad_accum_steps,
                   rank_sizes=(per_device,) * world_size if full_batches else None, zero_stage=zero_stage,
                   mixed_precision=train.mixed_precision, device=device, max_steps=train.max_steps, epochs=train.epochs)

    def total_steps(self, steps_per_epoch: int | None) -> int:
        """Optimizer steps of the whole run, given the data's global batches per epoch (None: unknown, a stream's)."""
        if self.max_steps is not None:
            return self.max_steps
        assert steps_per_epoch is not None, "a run without train.max_steps needs data with epochs"
        return self.epochs * steps_per_epoch

    def summary(self) -> str:
        """One line for the start-up summary and the dry run."""
        layout = f"ZeRO-{self.zero_stage}" if self.zero_stage is not None else "no ZeRO"
        return (f"world size {self.world_size}  per-device batch {self.per_device_batch}  grad accum "
                f"{self.grad_accum_steps}  global batch {self.global_batch}  {layout}  precision "
                f"{self.mixed_precision}  device {self.device}")
