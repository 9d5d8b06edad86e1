"""Length-sorted chunked encoding and GradCache (gist_scale.encode).

Unit tests run in-process on the tiny BERT; the slow test trains 2-rank jobs (DDP, ZeRO-2, ZeRO-3) with and
without GradCache and compares their losses, gradient norms and final weights.
"""

from __future__ import annotations

import copy
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dist_utils import loss_records, torchrun_command
from gist_scale import chunking, encode
from gist_scale.data import sample_data_path
from gist_scale.loss import GISTLoss
from gist_scale.model import Embedder


def _features(n: int, low: int, high: int, width: int | None = None, left: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g)
    width = width or int(lengths.max())
    ids = torch.randint(1000, 2000, (n, width), generator=g)
    positions = torch.arange(width)[None]
    mask = (positions >= width - lengths[:, None]) if left else (positions < lengths[:, None])
    return {"input_ids": ids * mask, "attention_mask": mask.long()}


def _columns(b: int = 6, k: int = 2, seed: int = 0) -> dict:
    return {"query": _features(b, 3, 10, seed=seed), "pos": _features(b, 10, 40, seed=seed + 1),
            "neg": _features(b * k, 8, 50, seed=seed + 2)}


def _embedder(model_dir: Path, dropout: float = 0.0) -> Embedder:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    encoder = AutoModel.from_pretrained(model_dir, config=config)
    encoder.pooler = None
    return Embedder(encoder, "mean", True)


class Recorder(nn.Module):
    """Wraps a model and records the [rows, width] of every forward call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(tuple(input_ids.shape))
        return self.model(input_ids, attention_mask)


class BagOfTokens(nn.Module):
    """Position-independent: the masked sum of token embeddings. Any padding side or width gives the same output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(2000, 8)

    def forward(self, input_ids, attention_mask):
        return (self.emb(input_ids) * attention_mask[..., None]).sum(1)


# ------------------------------------------------------------------------------------------ chunked encoding


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1000])
def test_chunked_encoding_gives_the_embeddings_of_one_padded_call(tiny_model_dir, chunk_size):
    model = _embedder(tiny_model_dir).eval()
    features = _features(37, 3, 60, width=64)  # padded beyond the longest text, as pad_to_multiple_of does
    with torch.no_grad():
        reference = model(features["input_ids"], features["attention_mask"])
        chunked_texts = chunking.chunk_texts({"texts": features}, chunking.num_chunks(37, chunk_size))
        chunked = encode.encode_chunked(model, chunked_texts)
    assert chunked.shape == reference.shape
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-5)


def test_chunks_are_length_sorted_trimmed_and_fewer_tokens(tiny_model_dir):
    model = Recorder(_embedder(tiny_model_dir).eval())
    columns = _columns(b=8, k=3)
    texts = 8 + 8 + 24
    with torch.no_grad():
        per_column = encode.encode_columns(model, columns, 3)
        assert len(model.calls) == 3
        padded_tokens = sum(r * w for r, w in model.calls)
        model.calls.clear()
        chunked = encode.encode_columns(model, chunking.chunk_texts(columns, chunking.num_chunks(texts, 10)), 3)
    assert len(model.calls) == chunking.num_chunks(texts, 10) == 4
    assert sum(r for r, _ in model.calls) == texts
    widths = [w for _, w in model.calls]
    assert widths == sorted(widths, reverse=True)  # longest chunk first: peak memory shows up at once
    assert sum(r * w for r, w in model.calls) < padded_tokens
    for got, want in zip(chunked, per_column):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert chunked[2].shape == (8, 3, 32)


def test_all_columns_in_one_forward_call(tiny_model_dir):
    """Under ZeRO-3 every call re-gathers the parameters: a chunk size >= the step's texts makes it one call."""
    model = Recorder(_embedder(tiny_model_dir).eval())
    columns = _columns(b=4, k=1)
    with torch.no_grad():
        query, pos, neg = encode.encode_columns(model, chunking.chunk_texts(columns, chunking.num_chunks(12, 1000)), 1)
    assert len(model.calls) == 1 and model.calls[0][0] == 12
    assert query.shape == pos.shape == (4, 32) and neg.shape == (4, 1, 32)


def test_fixed_chunk_count_with_fewer_texts_than_chunks(tiny_model_dir):
    """A rank with an uneven tail still makes the agreed number of calls (placeholders), same embeddings."""
    model = Recorder(_embedder(tiny_model_dir).eval())
    columns = _columns(b=2, k=1)
    with torch.no_grad():
        reference = encode.encode_columns(model, columns, 1)
        model.calls.clear()
        chunked = encode.encode_columns(model, chunking.chunk_texts(columns, 9), 1)
    assert len(model.calls) == 9
    for got, want in zip(chunked, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("left", [False, True])
def test_padding_side_and_column_widths(left):
    model = BagOfTokens()
    columns = {"query": _features(5, 1, 4, left=left), "pos": _features(5, 3, 20, left=left),
               "neg": _features(10, 2, 30, width=33, left=left)}
    with torch.no_grad():
        reference = encode.encode_columns(model, columns, 2)
        for chunk_size in (1, 3, 7, 100):
            chunks = chunking.num_chunks(5 + 5 + 10, chunk_size)
            chunked = encode.encode_columns(model, chunking.chunk_texts(columns, chunks, pad_token_id=0), 2)
            for got, want in zip(chunked, reference):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_plan_and_counts_validation():
    assert chunking.num_chunks(10, None) == 1 and chunking.num_chunks(10, 3) == 4 and chunking.num_chunks(0, 3) == 1
    with pytest.raises(ValueError, match="chunk_size"):
        chunking.num_chunks(10, 0)
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    ids = mask * torch.tensor([[11], [12], [13]])
    chunked = chunking.chunk_texts({"query": {"input_ids": ids, "attention_mask": mask}}, 2)
    assert [c["input_ids"].tolist() for c in chunked.chunks] == [[[12, 12, 12, 12], [13, 13, 0, 0]], [[11]]]
    assert chunked.real_chunks == 2 and chunked.chunk_rows == [2, 1] and chunked.counts == {"query": 3}
    assert chunked.inverse.tolist() == [2, 0, 1] and chunked.processed_tokens == 9
    # Widths rounded up for tensor cores, never past the batch's own width; placeholders for missing texts.
    rounded = chunking.chunk_texts({"query": {"input_ids": ids, "attention_mask": mask}}, 5, pad_to_multiple_of=4)
    assert [tuple(c["input_ids"].shape) for c in rounded.chunks] == [(1, 4), (1, 4), (1, 4), (1, 1), (1, 1)]
    assert rounded.real_chunks == 3 and rounded.chunks[3]["attention_mask"].tolist() == [[1]]
    with pytest.raises(ValueError, match="chunks"):
        chunking.chunk_texts({"query": {"input_ids": ids, "attention_mask": mask}}, 0)


def test_collator_plans_the_chunks_on_the_host(tiny_model_dir):
    """`TripletCollator(chunks=N)` hands over each side already chunked (the plan the encoder would make), with
    the real token counts the metrics need; the chunks survive pinning and the move to the device."""
    from transformers import AutoTokenizer

    from gist_scale.data import TokenCounts, TripletCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"student_query": [101, 5, 102], "student_pos": [101, 6, 7, 8, 102],
             "student_negs": [[101, 9, 102], [101] + [10] * 9 + [102]]},
            {"student_query": [101, 11, 12, 13, 102], "student_pos": [101, 14, 102],
             "student_negs": [[101, 15, 16, 102], [101, 17, 102]]}]
    per_column = TripletCollator(tokenizer)(rows)
    chunked = TripletCollator(tokenizer, chunks=3)(rows)
    lengths = [3, 5, 5, 3, 3, 11, 4, 3]
    assert per_column.token_counts == chunked.token_counts == {
        "student": TokenCounts(8, sum(lengths), sum(n * n for n in lengths))}
    want = chunking.chunk_texts(per_column.student, 3, tokenizer.pad_token_id)
    got = chunked.student
    assert isinstance(got, chunking.ChunkedTexts) and got.counts == {"query": 2, "pos": 2, "neg": 4}
    assert [tuple(c["input_ids"].shape) for c in got.chunks] == [(3, 11), (3, 4), (2, 3)]
    for a, b in zip(got.chunks, want.chunks):
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "attention_mask"))
    moved = got.to("cpu", non_blocking=True)
    assert torch.equal(moved.inverse, got.inverse) and moved.counts == got.counts
    model = BagOfTokens()
    with torch.no_grad():
        for x, y in zip(encode.encode_columns(model, moved, 2), encode.encode_columns(model, per_column.student, 2)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_a_chunked_training_step_reads_nothing_back_from_the_device(tiny_model_dir, monkeypatch):
    """With the plan made by the collator, the student's chunked forward, the loss and GradCache's backward
    never read a tensor's value on the host (on an accelerator each such read would stall the step)."""
    model = _embedder(tiny_model_dir, dropout=0.1).train()
    chunked = chunking.chunk_texts(_columns(b=5, k=2), 4)
    guide = tuple(e.detach() for e in encode.encode_columns(BagOfTokens(), chunked, 2))
    loss_fn = GISTLoss(check_finite=False)  # as training runs it outside debug mode

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss, _ = loss_fn(*encode.encode_columns(model, chunked, 2), *guide)
    loss.backward()
    cache = encode.GradCache(model, chunked, 2)
    cache.backward(loss_fn(*cache.embeddings, *guide)[0])
    monkeypatch.undo()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ GradCache


@pytest.mark.parametrize("chunks", [3, 50])
def test_grad_cache_matches_the_plain_step_with_dropout(tiny_model_dir, chunks):
    """Same loss, same parameter gradients, and the RNG ends where the plain step leaves it (exact replay)."""
    plain = _embedder(tiny_model_dir, dropout=0.1).train()
    cached = copy.deepcopy(plain)
    columns = _columns()
    loss_fn = GISTLoss()
    guide = encode.encode_columns(BagOfTokens().requires_grad_(False), columns, 2)

    torch.manual_seed(7)
    loss, _ = loss_fn(*encode.encode_columns(plain, chunking.chunk_texts(columns, chunks), 2), *guide)
    loss.backward()
    rng_after_plain = torch.get_rng_state()

    torch.manual_seed(7)
    cache = encode.GradCache(cached, chunking.chunk_texts(columns, chunks), 2)
    assert all(e.requires_grad for e in cache.embeddings) and cache.leaf.is_leaf
    cached_loss, _ = loss_fn(*cache.embeddings, *guide)
    cache.backward(cached_loss)

    assert torch.equal(torch.get_rng_state(), rng_after_plain)
    torch.testing.assert_close(cached_loss, loss, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_grad_cache_with_matryoshka_matches_the_plain_step_and_reencodes_once(tiny_model_dir):
    """Matryoshka GIST through GradCache: the loss is taken on the embedding leaves, so the sizes change only the
    cached gradient. Same loss and parameter gradients as the plain step, and the encoder re-runs each chunk once
    (not once per size)."""
    chunks = 3
    plain = _embedder(tiny_model_dir, dropout=0.1).train()
    cached = Recorder(copy.deepcopy(plain))
    columns = _columns()
    loss_fn = GISTLoss(matryoshka_dims=[32, 16, 8], matryoshka_weights=[1.0, 0.5, 0.25])
    guide = encode.encode_columns(BagOfTokens().requires_grad_(False), columns, 2)

    torch.manual_seed(7)
    loss, _ = loss_fn(*encode.encode_columns(plain, chunking.chunk_texts(columns, chunks), 2), *guide)
    loss.backward()

    torch.manual_seed(7)
    cache = encode.GradCache(cached, chunking.chunk_texts(columns, chunks), 2)
    cached_loss, stats = loss_fn(*cache.embeddings, *guide)
    cache.backward(cached_loss)

    assert len(cached.calls) == 2 * chunks  # one no-grad forward and one re-encoding per chunk
    assert stats.dim_losses.shape == (3,)
    torch.testing.assert_close(cached_loss, loss, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_grad_cache_backward_driver_order():
    """The driver sees one chunk(last) per chunk, the last one flagged, and finish() once after."""
    events = []

    class Spy(encode.ChunkBackward):
        def chunk(self, last):
            events.append(("chunk", last))
            return super().chunk(last)

        def backward(self, surrogate):
            events.append(("backward",))
            surrogate.backward()

        def finish(self):
            events.append(("finish",))

    model = BagOfTokens()
    cache = encode.GradCache(model, chunking.chunk_texts(_columns(b=3, k=1), 3), 1)
    cache.backward(GISTLoss()(*cache.embeddings)[0], Spy())
    assert events == [("chunk", False), ("backward",), ("chunk", False), ("backward",), ("chunk", True),
                      ("backward",), ("finish",)]
    assert model.emb.weight.grad is not None and cache.leaf.grad is None


# ------------------------------------------------------------------------------------ multi-process training


def _train_command(model_dir: Path, out: Path, *extra: str) -> list[str]:
    # The shipped sample named as a file: same rows, and no evaluation passes (those need the sample's eval split).
    return torchrun_command(
        2, "train", "--data.path", str(sample_data_path("train")),
        "--model.name", str(model_dir), "--guide.name", str(model_dir),
        "--model.dropout", "0.1", "--train.batch_size", "4", "--train.max_steps", "2", "--train.log_every", "1",
        "--optim.lr", "1e-3", "--optim.warmup_ratio", "0", "--train.chunk_size", "5",
        "--train.output_dir", str(out), *extra)


@pytest.mark.slow
def test_grad_cache_training_equals_plain_training_ddp_zero2_zero3(tiny_model_dir, launch_env, tmp_path):
    """2 ranks, dropout 0.1, lr 1e-3, 2 steps: GradCache under DDP, ZeRO-2 (DeepSpeed's coalesced reduction) and
    ZeRO-3 (per-chunk micro-steps, the path of DeepSpeed versions without it) reproduces the plain DDP run's losses,
    gradient norms and weights; with 2 accumulation micro-batches too (ZeRO-2). ZeRO-3 with the coalesced reduction
    is held to one process by tests/test_decoder.py and tests/test_lora.py (a decoder student, fully trained and with
    LoRA adapters), so it is not run a third time here.

    The plain run encodes the same length-sorted chunks with autograd, so it draws the same dropout masks; equal
    results therefore also show that GradCache replays each chunk's RNG exactly. Gradient norms are compared
    because Adam's update is invariant to a constant gradient scale, which weights alone would not reveal.
    """
    accumulate = ("--train.batch_size", "2", "--train.grad_accum_steps", "2")
    runs = {
        "plain-ddp": ("ddp", ()),
        "gc-ddp": ("ddp", ("--train.grad_cache", "true")),
        "gc-zero2": ("zero2", ("--train.grad_cache", "true")),
        "gc-zero3-per-chunk": ("zero3", ("--train.grad_cache", "true", "--train.grad_cache_coalesce", "false")),
        # Accumulation: DeepSpeed's coalesced block cannot span micro-batches, so each chunk is a micro-step.
        "plain-ddp-accum": ("ddp", accumulate),
        "gc-zero2-accum": ("zero2", (*accumulate, "--train.grad_cache", "true")),
    }
    reference_of = {name: "plain-ddp-accum" if name.endswith("-accum") else "plain-ddp" for name in runs}
    procs = {}
    for name, (layout, extra) in runs.items():
        # All at once: each job is mostly start-up, and torchrun --standalone picks a free port per job.
        log = (tmp_path / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(_train_command(tiny_model_dir, tmp_path / name, *extra), env=launch_env(layout),
                                       stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)
    for name, proc in procs.items():
        assert proc.wait(timeout=400) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]

    for name in runs:
        reference = loss_records(tmp_path / reference_of[name])
        reference_weights = load_file(tmp_path / reference_of[name] / "final" / "model.safetensors")
        assert reference[-1]["loss"] != reference[0]["loss"]
        metrics = loss_records(tmp_path / name)
        assert [m["step"] for m in metrics] == [1, 2]
        for got, want in zip(metrics, reference):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), name
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), name
            assert got["masked_fraction"] == want["masked_fraction"], name
        weights = load_file(tmp_path / name / "final" / "model.safetensors")
        assert weights.keys() == reference_weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(value.float(), reference_weights[key].float(), rtol=0, atol=1e-5,
                                       msg=lambda m: f"{name} {key}: {m}")


def test_grad_cache_under_zero_refuses_a_deepspeed_without_the_coalesced_reduction():
    from gist_scale.config import ConfigError

    for version in ("0.19.1", "0.19.8", "0.20.0+cu128"):
        encode.require_deepspeed_for_grad_cache(version)
    for version in ("0.18.9", "0.19.0", "0.16.4+abc"):
        with pytest.raises(ConfigError, match=rf"needs deepspeed>=0.19.1 \(installed: {re.escape(version)};"):
            encode.require_deepspeed_for_grad_cache(version)
