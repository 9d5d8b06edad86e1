"""Every ``torch.distributed`` call of gist-scale lives here.

Keeping the collectives in one module means the rest of the code base never has to ask
"is a process group up?" and never risks a rank skipping a collective that its peers enter
(which hangs the job until the NCCL/gloo timeout). Every helper is a no-op identity when no
process group is initialized, so single-process code paths call them unconditionally.

Rules every helper here follows, and that additions should keep:

* **Same collectives, same order, on every rank.** Nothing branches on rank-local data before
  a collective. Decisions that depend on local data (sizes, "is this input valid?") are first
  exchanged with one small all-gather, and then every rank takes the same branch.
* **Uneven first dimensions are fine.** The last batch of an epoch is smaller on some ranks;
  :func:`gather_with_grad` / :func:`gather_no_grad` all-gather the sizes, pad to the max,
  gather, and strip the padding, so callers see exactly ``sum(sizes)`` rows.
* **No hidden host syncs** beyond the one size exchange (skipped when the caller already
  knows the sizes).

Gradient semantics of :func:`gather_with_grad`: the backward of an all-gather is a
reduce-scatter with SUM, i.e. each rank's input receives the sum over *all* ranks of the
gradients flowing into its slice of the gathered tensor. If every rank returns a loss ``L_r``,
the input gradient on rank ``r`` is ``d(sum_r' L_r') / d x_r``, not ``d L_r / d x_r``. See
:mod:`gist_scale.loss` for how the loss is scaled so that this composes with DDP's averaging.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from gist_scale import plan as launch
from gist_scale.config import ConfigError

__all__ = ["agree_on_step", "all_reduce_mean", "all_reduce_sum", "comm_device", "gather_no_grad", "gather_sizes",
           "gather_with_grad", "is_collective_failure", "is_distributed", "launch_state", "main_process_decides",
           "rank", "require_synchronised", "world_size"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is usable and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def is_collective_failure(error: BaseException) -> bool:
    """Did a collective fail because a peer rank died or stalled past the process group's timeout?

    gloo reports a dead peer as "Connection closed/reset" and a stalled one as "Timed out waiting"; newer torch
    raises `DistError` subclasses. Only meaningful inside a process group.
    """
    markers = ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out waiting")
    return is_distributed() and (isinstance(error, dist.DistError) or any(marker in str(error) for marker in markers))


def _unsynchronised(num_processes: int, distributed_type: object, consequence: str) -> ConfigError:
    """The refusal of a multi-process job that Accelerate does not synchronise, naming what to set instead."""
    return ConfigError(
        f"{num_processes} processes, but Accelerate set up {distributed_type}, so {consequence}: set "
        "ACCELERATE_USE_CPU=1 to run CPU processes over gloo, or launch with a DDP or DeepSpeed config (accelerate "
        "launch --multi_gpu, or --config_file accelerate_configs/multi_gpu.yaml or zero2.yaml)")


def require_synchronised(model: torch.nn.Module, num_processes: int, distributed_type: object) -> None:
    """Refuse (ConfigError) a prepared model of a multi-process job that nothing keeps in sync across the ranks.

    After `accelerator.prepare`, several processes must hold a DDP-wrapped model or a DeepSpeed engine; anything
    else steps on each rank's own gradients while the loss's gathers (which need only the process group) keep the
    run looking healthy. `gist_scale.plan.launch_plan` avoids that on every launcher we know; this catches the ones
    it does not.
    """
    if num_processes <= 1 or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    # Looked up, not imported: a model DeepSpeed wrapped means DeepSpeed is imported already.
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return
    raise _unsynchronised(num_processes, distributed_type, f"the student stays a bare {type(model).__name__} (not "
                          "DDP, not a DeepSpeed engine) and each process would step on its own gradients")


def launch_state(timeout_s: float | None = None):
    """Accelerate's `PartialState` for a command run under `torchrun`/`accelerate launch` (none when alone).

    Set up as `gist_scale.plan.launch_plan` says (these commands never run DeepSpeed): without `cpu=True` on a CPU-only
    box, Accelerate forms the gloo group but calls the job "not distributed", so its barriers (`wait_for_everyone`,
    `main_process_first`) silently do nothing. A job that Accelerate still calls so is refused (ConfigError).
    """
    from accelerate import PartialState  # heavy, and only the commands run under a launcher need it

    plan = launch.launch_plan()
    if plan.world_size <= 1:
        return PartialState()
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    state = PartialState(cpu=plan.cpu, backend=plan.backend, **kwargs)
    if not state.use_distributed:
        raise _unsynchronised(plan.world_size, state.distributed_type, "its barriers would do nothing")
    return state


def world_size() -> int:
    """Number of ranks in the default group; ``1`` without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; ``0`` without a process group."""
    return dist.get_rank() if is_distributed() else 0


def comm_device() -> torch.device:
    """Device for small control tensors (flags, sizes) that have no natural device.

    NCCL (and other accelerator-only backends) cannot communicate CPU tensors, gloo can; a
    mixed backend such as ``"cpu:gloo,cuda:nccl"`` handles CPU tensors with gloo.
    """
    accelerator = torch.accelerator.current_accelerator()
    if not is_distributed() or "gloo" in str(dist.get_backend()) or accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _functional_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Autograd-aware all-gather along dim 0 of equal-shaped tensors, returned as a plain tensor.

    Uses the functional collectives: ``torch.distributed.nn.functional.all_gather`` is
    deprecated in torch 2.13, and ``all_gather_tensor_autograd`` now only forwards (with a
    FutureWarning) to ``all_gather_single_autograd``, whose backward is a reduce-scatter SUM
    (works on gloo/CPU and NCCL). Older torch only has ``all_gather_tensor_autograd``.
    """
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(t.contiguous(), 0, dist.group.WORLD)
    # The result is an AsyncCollectiveTensor that waits on first use; wait now (wait_tensor has
    # an identity backward) so that the wrapper subclass never leaks into the caller's code.
    if isinstance(out, fc.AsyncCollectiveTensor):
        out = fc.wait_tensor(out)
    return out


def gather_sizes(n: int, device: torch.device | str | None = None) -> list[int]:
    """All-gather one integer per rank (typically the local batch size). One host sync.

    ``device`` must be one the backend can communicate (e.g. CUDA for NCCL); defaults to
    :func:`comm_device`.
    """
    if not is_distributed():
        return [n]
    # Built on the host and copied without blocking: the .tolist() below is the one sync.
    local = torch.tensor([n], dtype=torch.int64).to(device or comm_device(), non_blocking=True)
    with torch.no_grad():
        return [int(v) for v in _functional_all_gather(local).tolist()]


def gather_with_grad(t: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All-gather ``t`` along dim 0 from every rank, keeping the autograd graph.

    Returns ``cat([t_0, ..., t_{W-1}])`` with ``sum(sizes)`` rows; ranks may hold different
    numbers of rows (including zero), but all trailing dimensions and the dtype must agree.
    ``sizes`` (every rank's row count, identical on all ranks) skips the size exchange and its
    host sync when the caller already knows them. The backward is a reduce-scatter SUM: rank
    ``r``'s ``t`` receives the sum over all ranks of the gradients of its rows. Without a
    process group, returns ``t`` itself.
    """
    if not is_distributed():
        return t
    sizes = gather_sizes(t.shape[0], t.device) if sizes is None else [int(s) for s in sizes]
    if len(sizes) != world_size() or sizes[rank()] != t.shape[0]:
        # A caller bug, not a data problem: every rank received the same sizes, so every rank
        # with the bug raises here, and before any collective.
        raise ValueError(f"sizes {sizes} do not match world size {world_size()} and local size {t.shape[0]}")
    max_n = max(sizes)
    if max_n == 0:
        return t
    if t.shape[0] < max_n:
        # cat (not an in-place copy) so that autograd routes the gradient back to ``t``.
        t = torch.cat([t, t.new_zeros((max_n - t.shape[0], *t.shape[1:]))])
    gathered = _functional_all_gather(t)
    if all(s == max_n for s in sizes):
        return gathered
    return torch.cat([gathered[r * max_n : r * max_n + s] for r, s in enumerate(sizes)])


def gather_no_grad(t: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Like :func:`gather_with_grad`, for tensors that need no gradient (e.g. a frozen guide).

    The result is detached, so no reduce-scatter is issued in the backward pass.
    """
    with torch.no_grad():
        return gather_with_grad(t.detach(), sizes)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, as a new detached tensor (for metrics; ``t`` is untouched)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Unweighted mean of ``t`` over ranks, as a new detached tensor.

    Computed as SUM / world size because gloo has no AVG. Integer inputs are promoted to
    float32 so the mean is not truncated.
    """
    if not (t.is_floating_point() or t.is_complex()):
        t = t.float()
    return all_reduce_sum(t) / world_size()


def agree_on_step(nonfinite: torch.Tensor, preempted: bool) -> tuple[torch.Tensor, bool]:
    """The two decisions of an optimizer step, the same on every rank: skip its update (``nonfinite``, a 0-dim bool
    device tensor: a non-finite loss here) and stop after it (``preempted``, host state: a signal reached this rank).
    Each is True on every rank iff it is True on at least one, so all ranks take the same branch and none is left
    waiting in a collective.

    Without a process group nothing moves and nothing is read: the skip stays on the device, where the optimizer
    decides on it. With one: one all-reduce of both flags, and one host read of its result (the stop decision); the
    skip comes back as a device tensor.
    """
    if not is_distributed():
        return nonfinite, preempted
    flags = torch.stack([nonfinite.to(device=comm_device(), dtype=torch.int32).reshape(()),
                         torch.tensor(int(preempted), dtype=torch.int32).to(comm_device(), non_blocking=True)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags[0].bool().to(nonfinite.device, non_blocking=True), bool(flags[1])


def main_process_decides(flag: bool) -> bool:
    """Rank 0's ``flag``, on every rank: for decisions that every rank must take alike even when their local inputs
    could differ (e.g. "is this the best model so far?", which a ZeRO-3 export that every rank joins follows)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())
