"""LoRA students (peft): which layers get adapters, checkpoints of adapters only, exact resume, the two exports, and
parity across parallel layouts (DDP, ZeRO-2, ZeRO-3; a tiny decoder under ZeRO-3 with GradCache)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import loss_records, torchrun_command
from safetensors.torch import load_file
from test_train import LAYOUT_STEPS, _run_layout, tiny_args

from gist_scale.config import ModelConfig
from gist_scale.options import load_config
from gist_scale.model import Embedder, load_student, load_tokenizer
from gist_scale.train import Trainer, main

TEXTS = ["a large domesticated carnivore", "the act of moving quickly", "He ran to the station."]
LORA = ("--model.lora_r", "4", "--model.lora_alpha", "8", "--optim.lr", "1e-2")


def _embed(embedder: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return embedder.eval()(batch["input_ids"], batch["attention_mask"])


def _trainable(embedder: torch.nn.Module) -> list[str]:
    return [name for name, p in embedder.named_parameters() if p.requires_grad]


def test_default_targets_are_the_attention_and_mlp_linear_layers(tiny_model_dir):
    student = load_student(ModelConfig(name=str(tiny_model_dir), lora_r=4))
    trainable = _trainable(student)
    wrapped = {name.split(".lora_")[0].split("layer.", 1)[1].split(".", 1)[1] for name in trainable}
    assert wrapped == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "intermediate.dense", "output.dense"}
    assert len(trainable) == 2 * 6 * 2  # lora_A and lora_B, 6 layers each, 2 transformer blocks
    assert not any("embeddings" in name or "pooler" in name for name in trainable)
    frozen = [p for p in student.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) > 20 * sum(p.numel() for p in student.parameters() if p.requires_grad)
    # A named subset.
    chosen = load_student(ModelConfig(name=str(tiny_model_dir), lora_r=4, lora_target_modules=["query", "value"]))
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in _trainable(chosen)} == {"query", "value"}


def test_lora_targets_matching_nothing_exit_2_naming_the_linear_layers(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, run, "--model.lora_r", "4", "--model.lora_target_modules", "[q_proj]")) == 2
    err = capsys.readouterr().err
    assert "model.lora_target_modules=['q_proj']: matches no linear layer" in err
    assert "attention.self.query" in err and "intermediate.dense" in err and "[all-linear]" in err
    assert "Traceback" not in err and not (run / "metrics.jsonl").exists()
    assert main(["--model.lora_r", "-1"]) == 2
    assert "model.lora_r=-1: must be >= 0" in capsys.readouterr().err


def test_lora_exports_a_merged_model_and_an_adapter_that_embed_like_the_trainer(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    run = tmp_path / "run"
    trainer = Trainer(load_config(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "3",
                                            *LORA)))
    assert trainer.train() == 0
    tokenizer = load_tokenizer(str(tiny_model_dir))
    expected = _embed(trainer.accelerator.unwrap_model(trainer.student), tokenizer)
    base = _embed(load_student(ModelConfig(name=str(tiny_model_dir))), tokenizer)
    assert not torch.allclose(base, expected, atol=1e-3), "the adapters did not train"

    # RUN/final: the merged model, plain sentence-transformers.
    merged = SentenceTransformer(str(run / "final"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name in load_file(run / "final" / "model.safetensors"))
    # RUN/final-adapter: peft on the base model...
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), run / "final-adapter")
    torch.testing.assert_close(_embed(Embedder(encoder, "mean", normalize=True), tokenizer), expected,
                               atol=1e-5, rtol=1e-5)
    # ...and sentence-transformers' load_adapter (a plain transformers directory: mean pooling, not normalized).
    st_base = SentenceTransformer(str(tiny_model_dir), device="cpu")
    st_base.load_adapter(str(run / "final-adapter"))
    torch.testing.assert_close(F.normalize(st_base.encode(TEXTS, convert_to_tensor=True), dim=-1), expected,
                               atol=1e-5, rtol=1e-5)


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path, tiny_model_dir):
    """Dropout on (RNG state restored); the checkpoint is a small fraction of the frozen base it leaves out."""

    def args(run: Path, *extra: str) -> list[str]:
        return tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "4",
                         "--checkpoint.every", "2", *LORA, *extra)

    full = tmp_path / "full"
    assert main(args(full, "--checkpoint.keep_last", "5")) == 0
    step_2 = full / "checkpoints" / "step_2"
    saved = load_file(step_2 / "model.safetensors")
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    base = load_student(ModelConfig(name=str(tiny_model_dir)))
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    checkpoint_bytes = sum(f.stat().st_size for f in step_2.rglob("*") if f.is_file())
    assert checkpoint_bytes < base_bytes / 20, (checkpoint_bytes, base_bytes)

    resumed = tmp_path / "resumed"
    shutil.copytree(step_2, resumed / "checkpoints" / "step_2")
    assert main(args(resumed, "--resume", "auto")) == 0
    expected = {r["step"]: r["loss"] for r in loss_records(full)}
    got = {r["step"]: r["loss"] for r in loss_records(resumed)}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    for export in ("final/model.safetensors", "final-adapter/adapter_model.safetensors"):
        reference, other = load_file(full / export), load_file(resumed / export)
        assert reference.keys() == other.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(other[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize("extra", [("--model.gradient_checkpointing", "true"),
                                   ("--train.chunk_size", "10", "--train.grad_cache", "true")],
                         ids=["gradient_checkpointing", "chunked_grad_cache"])
def test_lora_trains_the_same_with_gradient_checkpointing_and_grad_cache(extra, tmp_path, tiny_model_dir):
    def run(out: Path, *more: str) -> list[float]:
        assert main(tiny_args(tiny_model_dir, out, "--train.batch_size", "8", "--train.max_steps", "3",
                              "--model.dropout", "0.0", *LORA, *more)) == 0
        return [r["loss"] for r in loss_records(out)]

    reference = run(tmp_path / "plain")
    assert run(tmp_path / "variant", *extra) == pytest.approx(reference, abs=1e-5)
    adapter = load_file(tmp_path / "variant" / "final-adapter" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "final-adapter" / "adapter_model.safetensors")
    # lora_B starts at zero: nonzero means gradients reached the adapters through the checkpointed blocks.
    assert all(tensor.abs().max() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    for name, tensor in plain.items():
        torch.testing.assert_close(adapter[name], tensor, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- parity across parallel layouts (multi-process)

def _assert_same_exports(reference: Path, other: Path) -> None:
    for export in ("final/model.safetensors", "final-adapter/adapter_model.safetensors"):
        expected, got = load_file(reference / export), load_file(other / export)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name].float(), tensor.float(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def lora_single(tiny_model_dir, tmp_path_factory) -> Path:
    """One process with the whole global batch of 8 and LoRA: the run every layout below must reproduce (trained
    once for the three of them)."""
    out = tmp_path_factory.mktemp("lora-single") / "single"
    _run_layout(None, tiny_model_dir, out, None, *LORA)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "zero2", "zero3"])
def test_lora_two_ranks_match_one_process_with_the_whole_global_batch(layout, tmp_path, tiny_model_dir, launch_env,
                                                                      lora_single):
    """2 ranks x 4 triplets == 1 process x 8 triplets with LoRA: same losses, same merged weights and adapter."""
    single = [r["loss"] for r in loss_records(lora_single)]
    multi = _run_layout(layout, tiny_model_dir, tmp_path / layout, launch_env, *LORA)
    assert len(multi) == len(single) == LAYOUT_STEPS
    assert multi == pytest.approx(single, abs=1e-4)
    _assert_same_exports(lora_single, tmp_path / layout)


@pytest.mark.slow
def test_lora_decoder_under_zero3_with_grad_cache_matches_one_process(tmp_path, tiny_decoder_dir, tiny_model_dir,
                                                                      launch_env):
    """A decoder student (Qwen3, last_token pooling), LoRA on its q/k/v/o and MLP projections, ZeRO-3 + GradCache
    on 2 ranks: the losses and exports of one process with the whole batch and no GradCache."""
    decoder = ("--model.name", str(tiny_decoder_dir("qwen3")), "--model.pooling", "last_token", *LORA)
    single = _run_layout(None, tiny_model_dir, tmp_path / "single", launch_env, *decoder)
    multi = _run_layout("zero3", tiny_model_dir, tmp_path / "zero3", launch_env, *decoder,
                        "--train.grad_cache", "true", "--train.chunk_size", "4")
    assert multi == pytest.approx(single, abs=1e-4)
    targets = {name.split(".lora_")[0].rsplit(".", 1)[1]
               for name in load_file(tmp_path / "zero3" / "final-adapter" / "adapter_model.safetensors")}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    _assert_same_exports(tmp_path / "single", tmp_path / "zero3")


@pytest.mark.slow
def test_lora_resume_under_zero3_continues_exactly(tmp_path, tiny_model_dir, launch_env):
    """DeepSpeed's own checkpoint without the frozen base (`exclude_frozen_parameters`) resumes the same curve."""
    def run(out: Path, *extra: str) -> None:
        args = tiny_args(tiny_model_dir, out, "--train.batch_size", "4", "--train.max_steps", "4",
                         "--checkpoint.every", "2", *LORA, *extra)
        result = subprocess.run(torchrun_command(2, "train", *args), env=launch_env("zero3"), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(full, "--checkpoint.keep_last", "5")
    step_2 = full / "checkpoints" / "step_2"
    base = load_student(ModelConfig(name=str(tiny_model_dir)))
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert sum(f.stat().st_size for f in step_2.rglob("*") if f.is_file()) < base_bytes / 20
    shutil.copytree(step_2, resumed / "checkpoints" / "step_2")
    run(resumed, "--resume", "auto")
    expected = {r["step"]: r["loss"] for r in loss_records(full)}
    got = {r["step"]: r["loss"] for r in loss_records(resumed)}
    assert sorted(got) == [3, 4]
    assert [got[3], got[4]] == pytest.approx([expected[3], expected[4]], abs=1e-6)
    _assert_same_exports(full, resumed)
