"""Per-rank memory of the student's model states (weights, gradients, optimizer state), estimated without weights.

`gist-scale train --dry-run` prints it for the chosen ZeRO stage, world size, mixed precision and LoRA setting.
`count_parameters` builds the student on the meta device from its `config.json` alone (the pooler dropped and LoRA
added exactly as `load_student` does), so no weight file is read, even for a 70B model. `estimate_model_states`
turns the counts into bytes per rank:

* ZeRO stage 0 (one process, or DDP under Accelerate): fp32 weights, fp32 gradients and AdamW's two fp32 moments
  for the trainable parameters, whatever `mixed_precision` says (autocast casts activations, not the stored
  states); over 2+ ranks DDP's gradient buckets are a second fp32 copy of the gradients. Exact in bytes (tested
  against a real model after one step).
* ZeRO-1/2/3 (DeepSpeed): the model in the 16-bit type under bf16/fp16 (fp32 under `no`), frozen base included;
  the ZeRO paper's 2+2+K accounting with DeepSpeed's own extra fp32 gradient partition, as DeepSpeed's estimators
  count it (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`; see
  `estimate_model_states` for where this differs from them, and the tests for the cross-check).

Not counted: activations, the guide, the CUDA context, and transient buffers (DeepSpeed's reduce/all-gather buckets,
foreach AdamW's temporaries in the step, DDP's bucket for a single rank, AdamW's scalar `step` per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gist_scale.config import ModelConfig
from gist_scale.model.student import student_encoder

__all__ = ["GiB", "MIXED_PRECISIONS", "MemoryEstimate", "ParameterCounts", "count_parameters", "estimate_model_states",
           "format_estimate", "parameter_counts"]

MIXED_PRECISIONS = ("no", "bf16", "fp16")
GiB = 2**30


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of the student, as training holds it (BERT's unused pooler dropped, LoRA adapters added)."""

    total: int
    """Unique parameters, frozen base included (a tied weight counts once)."""
    trainable: int
    """Parameters the optimizer gets: all of them, or the LoRA adapters alone."""
    largest_layer: int
    """Parameters of the largest single module (its own, not its children's): what ZeRO-3 gathers at once, as
    DeepSpeed's `estimate_zero3_model_states_mem_needs` takes it (`largest_layer_params`)."""
    largest_trainable_layer: int
    """The same over trainable parameters only (ZeRO-3 gathers a layer's full gradient before it reduce-scatters
    it); equal to `largest_layer` for full fine-tuning."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model states per rank on the accelerator (host memory for what is offloaded)."""

    weights: int
    """The student's weights (for ZeRO-3: this rank's partition plus the largest layer gathered)."""
    gradients: int
    """Gradients of the trainable parameters, in every copy that lives through the step."""
    optimizer_state: int
    """AdamW's two moments, and under DeepSpeed the fp32 master weights."""
    offloaded: int
    """Per-rank host (CPU) memory of the states that `offload_optimizer` / `offload_param` move off the device."""
    setting: str
    """The setting in a few words: `ZeRO-2, 8 ranks, bf16, LoRA`."""
    assumptions: str
    """What the figure assumes, in a sentence or two."""

    @property
    def total(self) -> int:
        """Per-rank accelerator bytes: weights + gradients + optimizer state (offloaded bytes not included)."""
        return self.weights + self.gradients + self.optimizer_state


def parameter_counts(model: torch.nn.Module) -> ParameterCounts:
    """The counts of a built model (real or on the meta device); a shared parameter counts once."""
    params = list(model.parameters())  # deduplicated by identity: tied weights once (meta tensors have no data_ptr)
    layers = [list(module.parameters(recurse=False)) for module in model.modules()]  # each module's own
    return ParameterCounts(
        total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_layer=max(sum(p.numel() for p in own) for own in layers),
        largest_trainable_layer=max(sum(p.numel() for p in own if p.requires_grad) for own in layers))


def count_parameters(model_cfg: ModelConfig) -> ParameterCounts:
    """Count the student's parameters from its config alone: no weight file is opened.

    The encoder is the one training builds (`gist_scale.model.student.student_encoder`: the same config, the
    unused pooler dropped, the same LoRA adapters), on the meta device, so the counts are those of training.
    """
    return parameter_counts(student_encoder(model_cfg, weights=False))


def _shard(n: int, world_size: int) -> int:
    """Elements of `n` that one rank holds: DeepSpeed pads partitions to equal size, so this rounds up."""
    return -(-n // world_size)


def estimate_model_states(counts: ParameterCounts, zero_stage: int, world_size: int, mixed_precision: str,
                          offload_optimizer: bool = False, offload_param: bool = False) -> MemoryEstimate:
    """Per-rank bytes of the student's weights, gradients and optimizer state (AdamW) for a ZeRO stage.

    `zero_stage` 0 is training without DeepSpeed (one process, or DDP), 1-3 DeepSpeed ZeRO; `world_size` is the
    number of ranks (data-parallel processes); `mixed_precision` is `train.mixed_precision`. Frozen (non-LoRA)
    parameters never get gradients or optimizer state, and are partitioned only under ZeRO-3.

    Under DeepSpeed, with w the bytes of the model's type (2 for bf16/fp16, 4 for `no`), Psi the trainable
    parameters and N the ranks, per rank:

    * weights: w per parameter (frozen included), replicated under ZeRO-1/2, a 1/N partition under ZeRO-3 plus the
      largest layer gathered in full (w x `largest_layer`);
    * gradients: the w-byte gradients (all of them under ZeRO-1, which reduces them only at the step; a 1/N
      partition under ZeRO-2/3, plus under ZeRO-3 the largest trainable layer's full gradient before its
      reduce-scatter), and the fp32 partition the step makes of them (4 Psi/N; `single_grad_partition`);
    * optimizer state: AdamW's two fp32 moments (8 Psi/N) and the fp32 master partition (4 Psi/N), which ZeRO-1/2
      clone even when the model is fp32 already (`single_partition_of_fp32_groups`), while ZeRO-3 then updates its
      fp32 partition in place.

    The ZeRO paper's 2+2+K (K = 12) has no fp32 gradient partition; DeepSpeed's step makes one, and DeepSpeed's own
    estimators count it: for full fine-tuning in bf16/fp16 this gives exactly `estimate_zero2_model_states_mem_needs`
    (2 Psi + 18 Psi/N on the GPU, offload or not). Against `estimate_zero3_model_states_mem_needs` (4 L + 18 Psi/N)
    this counts 2 Psi/N more, deliberately: ZeRO-3 keeps both the 16-bit parameter partition and the 16-bit gradient
    partition (`grad_partitions_flat_buffer`, in the model's type by default) besides the 16 bytes of fp32 state,
    and DeepSpeed's 18 has room for only one of them (the same 2 Psi/N on the host when offloaded). DeepSpeed's CPU
    figures for ZeRO-2 (max(4 N, 16) Psi per node) and for ZeRO-3 without offload include the model loaded on each
    process, not model states alone, and are not used. Accelerate's `estimate_training_usage` matches stage 0 in
    fp32; for mixed precision it adds a 16-bit copy of the gradients (for "computation (GEMM)") that Accelerate's
    autocast never stores.

    Offloading (DeepSpeed only; `offload_param` needs ZeRO-3) moves to the host: the optimizer state and the fp32
    gradient partition (under ZeRO-2 the 16-bit gradients then go straight from DeepSpeed's buckets to the host,
    under ZeRO-3 their partition buffer lives there); with `offload_param`, the weight partition (the gathered
    layer stays on the device).

    Not counted: ZeRO-3's parameters below `stage3_param_persistence_threshold`, which stay whole on every rank
    (biases, norms, LoRA adapters of narrow layers: small next to the partitions), prefetching beyond one gathered
    layer, and DeepSpeed's fp32 gradient accumulation buffer when offloading with `grad_accum_steps` > 1.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: use 0 (no DeepSpeed), 1, 2 or 3")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be at least 1")
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r}: use {', '.join(MIXED_PRECISIONS)}")
    if zero_stage == 0 and (offload_optimizer or offload_param):
        raise ValueError("offloading needs DeepSpeed (ZeRO-1/2/3); zero_stage=0 has none")
    if offload_param and zero_stage != 3:
        raise ValueError(f"offload_param needs ZeRO-3 (DeepSpeed partitions parameters only there); got "
                         f"zero_stage={zero_stage}")
    total, trainable = counts.total, counts.trainable
    setting = (f"{'no DeepSpeed' if zero_stage == 0 else f'ZeRO-{zero_stage}'}, {world_size} "
               f"rank{'s' if world_size > 1 else ''}, {'fp32' if mixed_precision == 'no' else mixed_precision}"
               f"{', LoRA' if trainable < total else ''}{', optimizer offloaded' if offload_optimizer else ''}"
               f"{', parameters offloaded' if offload_param else ''}")

    if zero_stage == 0:
        # Accelerate without DeepSpeed keeps the model in fp32 and autocasts (bf16/fp16 change no stored state).
        # DDP copies gradients into its own flat buckets (Accelerate leaves `gradient_as_bucket_view` off).
        buckets = 4 * trainable if world_size > 1 else 0
        assumptions = ("fp32 weights, gradients and AdamW moments on every rank (autocast changes activations only)"
                       + ("; DDP's buckets hold a second copy of the gradients" if buckets else ""))
        return MemoryEstimate(weights=4 * total, gradients=4 * trainable + buckets, optimizer_state=8 * trainable,
                              offloaded=0, setting=setting, assumptions=assumptions)

    w = 4 if mixed_precision == "no" else 2
    shard = _shard(trainable, world_size)
    weights = w * (_shard(total, world_size) + counts.largest_layer if zero_stage == 3 else total)
    low_grads = w * (trainable if zero_stage == 1 else shard)  # the gradients in the model's type
    gathered_grads = w * counts.largest_trainable_layer if zero_stage == 3 else 0
    fp32_grads = 4 * shard  # the fp32 gradient partition of the step
    # ZeRO-1/2 clone an fp32 master partition even of an fp32 model; ZeRO-3 then steps its own partition, unless
    # the optimizer is offloaded (DeepSpeed copies the partition to the host).
    has_master = not (zero_stage == 3 and w == 4 and not offload_optimizer)
    master = 4 * shard if has_master else 0
    moments = 8 * shard

    offloaded = 0
    if offload_optimizer:
        # The 16-bit gradients leave the device too: ZeRO-2 copies them from the reduce buckets straight into the
        # host's fp32 partition, ZeRO-3 keeps their partition on the host (counted there).
        offloaded = fp32_grads + master + moments + (low_grads if zero_stage == 3 else 0)
        fp32_grads = master = moments = 0
        if zero_stage > 1:
            low_grads = 0
    if offload_param:
        partition = w * _shard(total, world_size)
        offloaded, weights = offloaded + partition, weights - partition

    kind = "16-bit" if w == 2 else "fp32"
    whole = [f"{kind} weights"] + ([f"{kind} gradients"] if zero_stage == 1 else [])
    low_grads_split = zero_stage == 3 or zero_stage == 2 and not offload_optimizer
    split = (([f"{kind} weights"] if zero_stage == 3 else []) + [f"{kind} gradients"] * low_grads_split
             + ["the step's fp32 gradients"] + ["fp32 master weights"] * has_master + ["AdamW moments"])
    assumptions = f"DeepSpeed ZeRO-{zero_stage}: "
    if zero_stage < 3:
        assumptions += f"{' and '.join(whole)} on every rank; "
    assumptions += f"{', '.join(split)} split over {world_size} rank{'s' if world_size > 1 else ''}"
    if zero_stage == 3:
        assumptions += (f", plus one layer gathered at a time ({counts.largest_layer:,} parameters, as DeepSpeed's "
                        f"estimator)")
    moved = ["optimizer state and gradient partitions"] * offload_optimizer + ["weight partitions"] * offload_param
    if moved:
        assumptions += f"; {' and '.join(moved)} in CPU memory"
    return MemoryEstimate(weights=weights, gradients=low_grads + gathered_grads + fp32_grads, offloaded=offloaded,
                          optimizer_state=master + moments, setting=setting, assumptions=assumptions)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def format_estimate(counts: ParameterCounts, estimate: MemoryEstimate) -> str:
    """A few lines for the dry run: the counts, then the per-rank bytes in GiB with 2 decimals."""
    trainable = (f"{_millions(counts.trainable)} trainable (LoRA adapters)" if counts.trainable < counts.total
                 else "all trainable")
    lines = [f"student: {_millions(counts.total)} parameters, {trainable}; largest layer "
             f"{_millions(counts.largest_layer)}",
             f"model states per rank ({estimate.setting}): {_gib(estimate.total)} = weights "
             f"{_gib(estimate.weights)} + gradients {_gib(estimate.gradients)} + optimizer state "
             f"{_gib(estimate.optimizer_state)}"]
    if estimate.offloaded:
        lines.append(f"offloaded to CPU memory: {_gib(estimate.offloaded)} per rank")
    lines.append(f"assumes {estimate.assumptions}; activations, the guide and the CUDA context come on top")
    return "\n".join(lines)
