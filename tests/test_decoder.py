"""Decoder LLMs as students and guides (gist_scale.model.decoder): detection, EOS appending, last-token pooling
under left and right padding, in one call per column, in chunks and through GradCache."""

from __future__ import annotations

import subprocess

import datasets
import pytest
import torch
from decoders import FAMILIES
from dist_utils import loss_records, torchrun_command
from safetensors.torch import load_file

from gist_scale.config import MINILM, ConfigError, ModelConfig
from gist_scale.data import TripletCollator, tokenize_triplets
from gist_scale.encode import GradCache, encode_columns
from gist_scale.model import load_student, load_tokenizer
from gist_scale.model.decoder import is_decoder
from gist_scale.train import main

DECODERS = ["qwen3", "llama", "mistral", "gemma2", "gemma3"]
TEXTS = {
    "query": ["a dog", "the quick brown fox jumps over the lazy dog near the river bank", "x"],
    "pos": ["an animal that barks", "a fox", "the letter x, twenty-fourth of the alphabet"],
    "negs": [["a cat"], ["slow turtles sleep"], ["y is not x at all, it comes after it"]],
}


def _rows(tokenizer, max_length: int = 64):
    ds = datasets.Dataset.from_dict({**TEXTS, "task_name": ["t"] * 3})
    tokenized, _ = tokenize_triplets(ds, tokenizer, max_length)
    return [tokenized[i] for i in range(len(tokenized))]


def _alone(model, ids: list[int]) -> torch.Tensor:
    """One text encoded alone: no padding at all."""
    ids_t = torch.tensor([ids])
    return model(ids_t, torch.ones_like(ids_t))[0]


def test_decoders_are_detected_from_their_config(tiny_decoder_dir, tiny_model_dir):
    from transformers import AutoConfig

    for family in DECODERS:
        assert is_decoder(AutoConfig.from_pretrained(tiny_decoder_dir(family))), family
    assert not is_decoder(AutoConfig.from_pretrained(tiny_model_dir))
    for model_type in ("bert", "roberta", "xlm-roberta", "modernbert"):
        assert not is_decoder(AutoConfig.for_model(model_type)), model_type


@pytest.mark.parametrize("family", ["qwen3", "qwen3-eos", "llama"])
def test_tokenizer_appends_eos_once_and_truncation_keeps_it(tiny_decoder_dir, family):
    tokenizer = load_tokenizer(str(tiny_decoder_dir(family)))
    eos = tokenizer.eos_token_id
    raw = tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    ids = tokenizer("the quick brown fox")["input_ids"]
    bos = [tokenizer.bos_token_id] if FAMILIES[family][1] == "llama" else []
    assert ids == bos + raw + [eos]  # EOS appended exactly once, BOS template kept
    cut = tokenizer(["the quick brown fox " * 20], truncation=True, max_length=8)["input_ids"][0]
    assert len(cut) == 8 and cut[-1] == eos
    assert tokenizer.pad_token_id is not None  # llama style ships none: pad = EOS
    if family.startswith("qwen3"):
        assert tokenizer.pad_token_id == eos  # the common case that pooling must not confuse


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_embeds_like_each_text_alone(tiny_decoder_dir, family, padding_side):
    """last_token pooling reads the EOS of every text, whatever the padding side, also when pad == EOS: a padded
    batch (one call per column, chunked, and GradCache) embeds each text as it is embedded alone (fp32, 1e-5)."""
    path = str(tiny_decoder_dir(family))
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = padding_side
    attention = "eager" if family == "gemma2" else "sdpa"  # Gemma 2 has no sdpa attention (logit soft-capping)
    model = load_student(ModelConfig(name=path, pooling="last_token", normalize=False,
                                     attn_implementation=attention)).eval()
    rows = _rows(tokenizer)
    for row in rows:
        for ids in (row["student_query"], row["student_pos"], *row["student_negs"]):
            assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        want = {column: torch.stack([_alone(model, ids) for ids in (row[f"student_{column}"] for row in rows)])
                for column in ("query", "pos")}
        want["neg"] = torch.stack([torch.stack([_alone(model, ids) for ids in row["student_negs"]]) for row in rows])
        plain = TripletCollator(tokenizer)(rows)
        mask = plain.student["query"]["attention_mask"]
        assert (mask[:, 0 if padding_side == "left" else -1] == 0).any()  # really padded on that side
        got = {"columns": encode_columns(model, plain.student, 1),
               "chunked": encode_columns(model, TripletCollator(tokenizer, chunks=4)(rows).student, 1)}
    chunked = TripletCollator(tokenizer, chunks=2)(rows).student
    got["grad_cache"] = GradCache(model, chunked, 1).embeddings
    for mode, (query, pos, neg) in got.items():
        for name, value in (("query", query), ("pos", pos), ("neg", neg)):
            torch.testing.assert_close(value.detach(), want[name], rtol=0, atol=1e-5, msg=f"{mode} {name}")


def test_cls_pooling_on_a_decoder_is_refused(tiny_decoder_dir, capsys, tmp_path):
    path = str(tiny_decoder_dir("qwen3"))
    with pytest.raises(ConfigError, match="decoder .*last_token"):
        load_student(ModelConfig(name=path, pooling="cls"))
    code = main(["--model.name", path, "--model.pooling", "cls", "--guide.name", "null", "--data.max_rows", "64",
                 "--train.batch_size", "8", "--train.max_steps", "1", "--train.output_dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.pooling=cls" in err and "last_token" in err


def test_decoder_guides_a_bert_student_and_a_decoder_student_trains(tiny_decoder_dir, tiny_model_dir, tmp_path):
    """A decoder works as the guide of an encoder student and as a student (the whole loop, 2 steps each)."""
    common = ["--data.max_rows", "64", "--train.batch_size", "8", "--train.max_steps", "2", "--train.log_every",
              "1", "--eval.batch_size", "64"]
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_decoder_dir("llama")),
                 "--guide.pooling", "last_token", "--train.output_dir", str(tmp_path / "a"), *common]) == 0
    assert main(["--model.name", str(tiny_decoder_dir("qwen3")), "--model.pooling", "last_token",
                 "--guide.name", MINILM, "--train.chunk_size", "12", "--train.output_dir", str(tmp_path / "b"),
                 *common]) == 0
    assert (tmp_path / "b" / "final" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_decoder_under_zero3_with_grad_cache_matches_one_process(tiny_decoder_dir, tmp_path, launch_env):
    """A Qwen3 student guided by a Llama decoder, 2 ranks x 4 triplets under ZeRO-3 with chunked encoding and
    GradCache, logs the losses of one process with all 8 triplets and exports the same weights."""
    args = ["--model.name", str(tiny_decoder_dir("qwen3")), "--model.pooling", "last_token", "--model.dropout", "0.0",
            "--model.query_prompt", "query: ", "--guide.name", str(tiny_decoder_dir("llama")), "--guide.pooling",
            "last_token", "--data.max_rows", "256", "--train.max_steps", "3", "--train.log_every", "1",
            "--train.chunk_size", "6", "--train.grad_cache", "true"]
    assert main([*args, "--train.batch_size", "8", "--train.output_dir", str(tmp_path / "single")]) == 0
    command = torchrun_command(2, "train", *args, "--train.batch_size", "4", "--train.output_dir",
                               str(tmp_path / "zero3"))
    result = subprocess.run(command, env=launch_env("zero3"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    single, multi = loss_records(tmp_path / "single"), loss_records(tmp_path / "zero3")
    assert len(multi) == 3
    assert [r["loss"] for r in multi] == pytest.approx([r["loss"] for r in single], abs=1e-4)
    reference = load_file(tmp_path / "single" / "final" / "model.safetensors")
    exported = load_file(tmp_path / "zero3" / "final" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name].float(), tensor.float(), atol=1e-4, rtol=1e-4)
