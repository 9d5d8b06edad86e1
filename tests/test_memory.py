"""The per-rank memory estimate of the student's model states (`gist_scale.memory`): counted without weights, exact
against a real model after one AdamW step, and the ZeRO figures against DeepSpeed's and Accelerate's estimators."""

from __future__ import annotations

import shutil

import pytest
import torch

from gist_scale.config import ModelConfig, OptimConfig
from gist_scale.memory import (GiB, ParameterCounts, count_parameters, estimate_model_states, format_estimate,
                               parameter_counts)
from gist_scale.model import load_student

# A 7B-sized student (divisible by 8, so partitions are whole) with a 0.5B largest layer (the embeddings), and LoRA
# on it: what the ZeRO arithmetic is checked on, next to the tiny BERT's own counts.
BIG = ParameterCounts(total=7_000_000_000, trainable=7_000_000_000, largest_layer=500_000_000,
                      largest_trainable_layer=500_000_000)
BIG_LORA = ParameterCounts(total=7_040_000_000, trainable=40_000_000, largest_layer=500_000_000,
                           largest_trainable_layer=65_536)
WORLDS = (1, 2, 8)


def _cfg(path, **kwargs) -> ModelConfig:
    return ModelConfig(name=str(path), **kwargs)


def _measured(student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state tensors held after a step."""
    params = list(student.parameters())
    states = [value for state in optimizer.state.values() for key, value in state.items() if key != "step"]
    steps = [state["step"] for state in optimizer.state.values()]
    # AdamW's `step` is one scalar per parameter tensor (4 bytes each), left out of the estimate by design.
    assert all(step.numel() == 1 for step in steps) and len(steps) == sum(p.requires_grad for p in params)
    return {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "optimizer_state": sum(t.numel() * t.element_size() for t in states)}


@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_estimate_equals_measured_bytes_after_a_step(tiny_model_dir, lora_r, mixed_precision):
    """Stage 0, one process: the estimate is the bytes a real student and its AdamW hold after one step, with the
    trainer's own loading (pooler dropped, LoRA via peft) and optimizer; bf16 autocast stores nothing more."""
    from gist_scale.trainer.optimizer import build_optimizer

    cfg = _cfg(tiny_model_dir, lora_r=lora_r)
    student = load_student(cfg)
    optimizer = build_optimizer(student, OptimConfig())
    torch.manual_seed(0)
    input_ids = torch.randint(1000, 2000, (3, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        loss = student(input_ids, torch.ones_like(input_ids)).sum(0).pow(2).sum()
    loss.backward()
    optimizer.step()

    counts = count_parameters(cfg)
    assert counts == parameter_counts(student)  # the meta-device build is the model training builds
    assert (counts.trainable < counts.total) == bool(lora_r)
    estimate = estimate_model_states(counts, zero_stage=0, world_size=1, mixed_precision=mixed_precision)
    measured = _measured(student, optimizer)
    assert {"weights": estimate.weights, "gradients": estimate.gradients,
            "optimizer_state": estimate.optimizer_state} == measured
    assert estimate.total == sum(measured.values()) and estimate.offloaded == 0


def test_counts_of_a_lora_decoder_match_the_loaded_one(tiny_decoder_dir):
    cfg = _cfg(tiny_decoder_dir("qwen3"), pooling="last_token", lora_r=8, lora_target_modules=["q_proj", "v_proj"])
    counts = count_parameters(cfg)
    assert counts == parameter_counts(load_student(cfg))
    assert 0 < counts.largest_trainable_layer < counts.trainable < counts.total


def test_counting_reads_no_weights(tiny_model_dir, tmp_path, no_weight_reads):
    """A directory with config.json and the tokenizer only gives the counts of the full one, and no safetensors or
    torch checkpoint is opened on the way."""
    full = {r: count_parameters(_cfg(tiny_model_dir, lora_r=r)) for r in (0, 4)}
    for item in tiny_model_dir.iterdir():
        if not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, tmp_path / item.name)
    assert not list(tmp_path.glob("*.safetensors")) and list(tiny_model_dir.glob("*.safetensors"))
    for r in (0, 4):
        assert count_parameters(_cfg(tmp_path, lora_r=r)) == full[r]
    with pytest.raises(AssertionError, match="weight file"):  # the guard works: loading does open one
        load_student(_cfg(tiny_model_dir))


def _ds_zero2(counts: ParameterCounts, world: int, offload: bool) -> tuple[int, int]:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(counts.total, num_gpus_per_node=world, num_nodes=1,
                                                 cpu_offload=offload, additional_buffer_factor=1)


def _ds_zero3(counts: ParameterCounts, world: int, offload: bool, offload_param: bool) -> tuple[int, int, int]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs(counts.total, counts.largest_layer, num_gpus_per_node=world,
                                                 num_nodes=1, cpu_offload=offload, cpu_offload_params=offload_param,
                                                 zero_init=True, additional_buffer_factor=1)


@pytest.fixture(scope="module")
def tiny_counts(tiny_model_dir) -> ParameterCounts:
    counts = count_parameters(_cfg(tiny_model_dir))
    assert counts.total % 8 == 0  # whole partitions over 1, 2 and 8 ranks, as DeepSpeed's formulas assume
    return counts


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_zero2_equals_deepspeeds_estimator(tiny_counts, world, mixed_precision):
    """Full fine-tuning under ZeRO-2 (and ZeRO-1, which differs only in keeping its 16-bit gradients whole): 2 Psi
    + 18 Psi/N on the device, DeepSpeed's own figure; offloading the optimizer leaves the 16-bit weights."""
    for counts in (tiny_counts, BIG):
        _, gpu = _ds_zero2(counts, world, offload=False)
        estimate = estimate_model_states(counts, 2, world, mixed_precision)
        assert estimate.total == gpu
        stage1 = estimate_model_states(counts, 1, world, mixed_precision)
        assert stage1.total - estimate.total == 2 * counts.trainable - 2 * counts.trainable // world

        _, gpu_offload = _ds_zero2(counts, world, offload=True)
        offloaded = estimate_model_states(counts, 2, world, mixed_precision, offload_optimizer=True)
        assert offloaded.total == gpu_offload == estimate.weights
        assert offloaded.offloaded == 16 * counts.trainable // world  # fp32 gradients, master and moments


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_zero3_equals_deepspeeds_estimator_plus_the_gradient_partition(tiny_counts, world, mixed_precision):
    """ZeRO-3: DeepSpeed's 4 L + 18 Psi/N, plus the 16-bit gradient partition (2 Psi/N) its formula leaves out
    (see `estimate_model_states`); offloaded, the device figures are DeepSpeed's, and the host ones again 2 Psi/N
    more than its 18 (16 without parameter offload) per parameter over the node's ranks."""
    for counts in (tiny_counts, BIG):
        grad_partition = 2 * counts.total // world
        _, gpu, layer = _ds_zero3(counts, world, offload=False, offload_param=False)
        estimate = estimate_model_states(counts, 3, world, mixed_precision)
        assert estimate.total == gpu + grad_partition
        assert estimate.weights == 2 * counts.total // world + layer // 2  # partition + the gathered layer

        for offload_param in (False, True):
            cpu, gpu, _ = _ds_zero3(counts, world, offload=True, offload_param=offload_param)
            offloaded = estimate_model_states(counts, 3, world, mixed_precision, offload_optimizer=True,
                                              offload_param=offload_param)
            assert offloaded.total == gpu
            assert offloaded.offloaded * world == cpu + 2 * counts.total


def test_stage0_fp32_equals_accelerates_estimator(tiny_counts):
    """`accelerate estimate-memory`'s training figures (fp32) are stage 0's: weights, gradients, AdamW moments."""
    from accelerate.commands.estimate import estimate_training_usage

    for counts in (tiny_counts, BIG):
        usage = estimate_training_usage(4 * counts.total, "float32")
        estimate = estimate_model_states(counts, 0, 1, "no")
        assert (estimate.weights, estimate.gradients, estimate.optimizer_state) == (
            usage["model"], usage["gradients"], usage["optimizer"])


def test_stage0_ddp_keeps_a_second_gradient_copy_and_ignores_mixed_precision():
    one = estimate_model_states(BIG, 0, 1, "no")
    for world in (2, 8):
        for mixed_precision in ("no", "bf16", "fp16"):
            many = estimate_model_states(BIG, 0, world, mixed_precision)
            assert (many.weights, many.gradients, many.optimizer_state) == (
                one.weights, 2 * one.gradients, one.optimizer_state)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_per_rank_memory_shrinks_with_stage_and_ranks(mixed_precision):
    """Each stage partitions one more kind of state over the ranks, as documented: ZeRO-1 the optimizer state,
    ZeRO-2 also the gradients, ZeRO-3 also the weights (beyond one gathered layer)."""
    w = 4 if mixed_precision == "no" else 2
    psi, layer = BIG.total, BIG.largest_layer
    one = {stage: estimate_model_states(BIG, stage, 1, mixed_precision) for stage in (1, 2, 3)}
    for world in (2, 8):
        est = {stage: estimate_model_states(BIG, stage, world, mixed_precision) for stage in (0, 1, 2, 3)}
        assert est[0].total > est[1].total > est[2].total > est[3].total
        for stage in (1, 2, 3):
            assert est[stage].total < one[stage].total
            assert est[stage].optimizer_state * world == one[stage].optimizer_state
        assert est[1].weights == est[2].weights == w * psi  # replicated
        assert est[1].gradients == w * psi + 4 * psi // world  # 16-bit gradients whole until the step
        assert est[2].gradients == (w + 4) * psi // world
        assert est[3].weights == w * psi // world + w * layer
        assert est[3].gradients == (w + 4) * psi // world + w * layer
    # fp32 master weights: cloned by ZeRO-1/2 always, kept by ZeRO-3 only besides a 16-bit model
    assert one[2].optimizer_state == 12 * psi
    assert one[3].optimizer_state == (8 if mixed_precision == "no" else 12) * psi


def test_offloaded_fp32_zero3_copies_its_partition_to_the_host():
    """In fp32, ZeRO-3 steps its own weight partition on the device, but offloaded it keeps an fp32 copy on the host:
    fp32 gradients, the step's copy of them, master weights and moments, 20 bytes per parameter over the ranks."""
    device = estimate_model_states(BIG, 3, 8, "no")
    host = estimate_model_states(BIG, 3, 8, "no", offload_optimizer=True)
    assert device.optimizer_state == 8 * BIG.total // 8
    assert host.offloaded == 20 * BIG.total // 8 and host.optimizer_state == 0


def test_lora_states_follow_the_adapters_and_zero3_partitions_the_frozen_base():
    for world in WORLDS:
        stage2 = estimate_model_states(BIG_LORA, 2, world, "bf16")
        stage3 = estimate_model_states(BIG_LORA, 3, world, "bf16")
        full = estimate_model_states(BIG, 3, world, "bf16")
        adapters = BIG_LORA.trainable
        assert stage2.weights == 2 * BIG_LORA.total  # the frozen base replicated below ZeRO-3
        assert stage3.weights == 2 * BIG_LORA.total // world + 2 * BIG_LORA.largest_layer
        assert stage2.optimizer_state == stage3.optimizer_state == 12 * adapters // world
        assert stage2.gradients == 6 * adapters // world
        assert stage3.gradients == 6 * adapters // world + 2 * BIG_LORA.largest_trainable_layer
        assert stage3.total < full.total
    assert estimate_model_states(BIG_LORA, 3, 8, "bf16").weights < estimate_model_states(BIG_LORA, 2, 8, "bf16").weights
    lora0 = estimate_model_states(BIG_LORA, 0, 1, "no")
    assert (lora0.weights, lora0.gradients, lora0.optimizer_state) == (
        4 * BIG_LORA.total, 4 * BIG_LORA.trainable, 8 * BIG_LORA.trainable)


def test_partitions_round_up_like_deepspeeds_padding():
    odd = ParameterCounts(total=10, trainable=10, largest_layer=4, largest_trainable_layer=4)
    assert estimate_model_states(odd, 2, 4, "bf16").optimizer_state == 12 * 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(zero_stage=0, offload_optimizer=True), "DeepSpeed"),
    (dict(zero_stage=2, offload_param=True), "ZeRO-3"),
    (dict(zero_stage=4), "zero_stage"),
    (dict(world_size=0), "world_size"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
])
def test_refuses_settings_deepspeed_does_not_have(kwargs, match):
    args = dict(counts=BIG, zero_stage=2, world_size=2, mixed_precision="bf16") | kwargs
    with pytest.raises(ValueError, match=match):
        estimate_model_states(**args)


def test_format_prints_gib_with_two_decimals():
    estimate = estimate_model_states(BIG_LORA, 3, 8, "bf16", offload_optimizer=True)
    text = format_estimate(BIG_LORA, estimate)
    assert f"{estimate.total / GiB:.2f} GiB = weights {estimate.weights / GiB:.2f} GiB" in text
    assert f"optimizer state {estimate.optimizer_state / GiB:.2f} GiB" in text
    assert f"offloaded to CPU memory: {estimate.offloaded / GiB:.2f} GiB per rank" in text
    assert "ZeRO-3, 8 ranks, bf16, LoRA, optimizer offloaded" in text
    assert "7,040.0M parameters, 40.0M trainable (LoRA adapters)" in text
    assert "offloaded" not in format_estimate(BIG, estimate_model_states(BIG, 2, 8, "bf16"))
