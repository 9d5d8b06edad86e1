"""`gist-scale bench`: training-step throughput of sentence-transformers' GISTEmbedLoss and of ours, side by side.

One process, the same synthetic batches and the same initial weights for every mode:

* `st`: the reference. `SentenceTransformer` (loaded from a locally written random BERT) + `GISTEmbedLoss`, with
  `torch.optim.AdamW` (fused on CUDA) and bf16 autocast on CUDA; the guide is a second `SentenceTransformer`.
* ours, cumulative, so each mode adds one idea to the previous one:
  `plain` (`Embedder` + `GISTLoss`, one forward per column, the guide frozen in bf16 on CUDA),
  `chunked` (+ length-sorted chunks with per-chunk padding, `gist_scale.encode`),
  `guide_cache` (+ guide embeddings precomputed and copied in as fp16, as `guide.cache` does: no guide forward),
  `grad_cache` (+ GradCache over the same chunks: activation memory independent of the batch).
* DeepSpeed (single process, the ZeRO settings of `ds_configs/zero{2,3}.json`, built in so that a pip-installed
  package has them): `zero2`, `zero3` (one forward per column, the live
  guide), `zero2_chunked`, `zero3_chunked` (all the step's texts in `--chunk-size` chunks: fewer calls, so fewer
  ZeRO-3 parameter gathers). Not in the default modes; they need `deepspeed`.
* Matryoshka GIST: `matryoshka` (`plain` with `loss.matryoshka_dims`) and `st_matryoshka` (sentence-transformers'
  `MatryoshkaLoss(GISTEmbedLoss)`), at `--matryoshka-dims` (default: the student's width, 1/2, 1/4, 1/8). Not in
  the default modes; `--modes plain,matryoshka` measures the overhead of the sizes over plain GIST.

LoRA (`--lora-r R`): every mode trains rank-R adapters (alpha 2R, peft) on the attention and MLP linear layers of a
frozen student, ours through `model.lora_r` as training does, sentence-transformers through its own
`model.add_adapter(LoraConfig(...))` with the same target names (on BERT they also put an adapter on
sentence-transformers' unused pooler, which gets no gradient). `trainable_params` tells what each mode optimises.

Memory: on CUDA `peak_mem_gib` is the accelerator's peak allocation. On a CPU, `--isolate` runs every mode in a fresh
process (spawned, so no mode inherits another's memory) and `peak_mem_gib` is that process's peak resident set
(`VmHWM`) during the steps, counted from the moment the mode is built (loading's transient peak left out): the
resident model, optimizer state and activations, plus what is the same for every mode (the interpreter, the
libraries, since each process imports sentence-transformers, peft and deepspeed whatever its mode, and the batches).

Sizes are BERT configs built locally (no download) with BERT's 30522-token vocabulary: `tiny` (2x32), `small` (12x384,
33M), `base` (12x768, 110M), `large` (24x1024, 335M); and Qwen3 decoders with last-token pooling: `qwen3-tiny`
(2x32) and `qwen3-0.6b` (Qwen3-Embedding-0.6B's shape, 28x1024, with the 30522-token vocabulary). A case is
`STUDENT/GUIDE` (`small/large`) or one size for both. Batches: random token ids with [CLS] .. [SEP] (a decoder
student: ids ending with its EOS, padded with the EOS id, the common pad == EOS case), query lengths uniform in
`--query-len`, positive and one negative in `--doc-len`, each column padded to its longest text as the collator
does.

Reported per mode: triplets/s, real (non-padding) student tokens/s, the padding share of the student's processed
tokens, model TFLOP/s on real tokens (student 3x forward, plus the guide's forward where it runs; GradCache's
recomputation is not counted) and MFU against `--peak-tflops` (known for H100/H200/A100), peak accelerator memory
(CUDA only) and the ratio to `st` in the same case. `first_loss` is the loss of the first step, identical across
modes with `--dropout 0` (a check that all modes train the same model on the same batch).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, BertConfig, BertModel, BertTokenizerFast, Qwen3Config, Qwen3Model

from gist_scale import chunking, distributed, encode
from gist_scale.flops import forward_flops, peak_tflops
from gist_scale.loss import GISTLoss
from gist_scale.config import GuideConfig, ModelConfig
from gist_scale.model import Embedder, load_guide, load_student
from gist_scale.st_format import export_sentence_transformer
from gist_scale.tools.data_memory import memory_status

console = Console(stderr=True, highlight=False, soft_wrap=True)

SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
DECODER_SIZES = {
    "qwen3-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       intermediate_size=64),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288),
}
"""Qwen3 decoders (last-token pooling on the EOS, which is also the pad token), with the 30522-token vocabulary."""
BF16_SIZES = {"qwen3-8b"}
"""Sizes written (hence loaded, by us and sentence-transformers alike) in bf16: 7B parameters in fp32 would take
28 GB of disk and of accelerator memory; with LoRA the frozen base in bf16 is how such a model is trained."""
LORA_TARGETS = {"bert": ["query", "key", "value", "dense"],
                "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
"""`--lora-r` targets: every linear layer of attention and MLP (the trainer's default `all-linear` on the student)."""
MODES = ("st", "plain", "chunked", "guide_cache", "grad_cache")
DEEPSPEED_MODES = ("zero2", "zero3", "zero2_chunked", "zero3_chunked")
MATRYOSHKA_MODES = ("matryoshka", "st_matryoshka")
ALL_MODES = MODES + DEEPSPEED_MODES + MATRYOSHKA_MODES
CLS, SEP, PAD = 101, 102, 0
VOCAB = 30522
ZERO_SETTINGS = {
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    3: {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
        "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": False},
}
"""The `zero_optimization` sections of `ds_configs/zero2.json` and `zero3.json` (a test keeps them equal), minus the
save-time weight gathering that a benchmark never uses."""
DISTINCT_BATCHES = 3
"""Synthetic batches cycled through (several, so that no mode benefits from one fixed shape)."""
RECORD_FIELDS = ("case", "student", "guide", "mode", "batch", "chunk_size", "triplets_per_s", "real_tokens_per_s",
                 "padding_fraction", "model_tflops_per_s", "mfu", "peak_mem_gib", "ratio_vs_st", "first_loss",
                 "seconds_per_step", "steps", "oom", "device", "precision", "matryoshka_dims", "lora_r",
                 "trainable_params", "peak_mem_kind")


@dataclass
class BenchConfig:
    cases: list[tuple[str, str]]
    batches: list[int]
    modes: list[str]
    steps: int
    warmup: int
    chunk_size: int
    query_len: tuple[int, int]
    doc_len: tuple[int, int]
    device: torch.device
    dropout: float
    lr: float
    seed: int
    peak_tflops: float | None
    out: Path | None
    threads: int | None = None
    matryoshka_dims: list[int] | None = None
    """Sizes of the Matryoshka modes; None: the student's width, 1/2, 1/4 and 1/8 of it."""
    lora_r: int = 0
    """LoRA rank of the student's adapters in every mode (0: full fine-tuning)."""
    isolate: bool = False
    """Each mode in a fresh process, for a per-mode peak resident memory on a CPU."""


# -------------------------------------------------------------------------------------------------- setup


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    low_i, high_i = int(low), int(high or low)
    if not 2 <= low_i <= high_i:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN-MAX with 2 <= MIN <= MAX")
    return low_i, high_i


def _case(text: str) -> tuple[str, str]:
    student, _, guide = text.partition("/")
    guide = guide or student
    for size in (student, guide):
        if size not in SIZES and size not in DECODER_SIZES:
            raise argparse.ArgumentTypeError(f"unknown size {size!r} in case {text!r}: use "
                                             f"{', '.join([*SIZES, *DECODER_SIZES])}")
    return student, guide


def _dims(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",") if d]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive sizes, e.g. 384,192,96")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gist-scale bench", description=__doc__.split("\n\n")[0],
        epilog="Example (one H100/H200): gist-scale bench --cases base/base,small/large --batch 32,256 "
               "--out bench.json.  CPU smoke test: gist-scale bench --cases tiny --batch 8 --query-len 8-16 "
               "--doc-len 16-32 --steps 2")
    parser.add_argument("--cases", default="base/base,small/large",
                        help="comma-separated STUDENT/GUIDE sizes (tiny, small, base, large, qwen3-tiny, qwen3-0.6b); "
                             "one size = both")
    parser.add_argument("--batch", default="32,256", help="comma-separated triplets per step")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(ALL_MODES)} (st is the reference)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--chunk-size", type=int, default=128, help="texts per encoder call in the chunked modes")
    parser.add_argument("--query-len", type=_range, default=(16, 64), help="query token lengths MIN-MAX")
    parser.add_argument("--doc-len", type=_range, default=(64, 256), help="positive/negative token lengths MIN-MAX")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    parser.add_argument("--dropout", type=float, default=0.1, help="encoder dropout (0 makes first_loss comparable)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: known bf16 peaks of H100/H200/A100, else no MFU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 gives stable CPU timings on a busy host")
    parser.add_argument("--matryoshka-dims", type=_dims, default=None, metavar="D,D,...",
                        help="sizes of the matryoshka modes (default: the student's width, 1/2, 1/4, 1/8)")
    parser.add_argument("--lora-r", type=int, default=0,
                        help="train LoRA adapters of this rank (alpha 2r) on the student in every mode, "
                             "sentence-transformers included (0: full fine-tuning)")
    parser.add_argument("--isolate", action="store_true",
                        help="run each mode in a fresh process: on a CPU, peak GiB is then its peak resident memory")
    parser.add_argument("--out", help="write the records as a JSON list to this file")
    return parser


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: use {', '.join(ALL_MODES)}")
    batches = [int(b) for b in args.batch.split(",") if b]
    if not batches or min(batches) < 2:
        parser.error("--batch needs sizes >= 2 (in-batch negatives)")
    if args.steps < 1 or args.warmup < 1 or args.chunk_size < 1:
        parser.error("--steps, --warmup and --chunk-size must be >= 1")
    if args.lora_r < 0:
        parser.error("--lora-r must be >= 0 (0: full fine-tuning)")
    try:
        cases = [_case(c) for c in args.cases.split(",") if c]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.isolate and device.type == "cuda":
        parser.error("--isolate measures CPU memory; on CUDA peak GiB is the accelerator's own peak already")
    return BenchConfig(cases, batches, modes, args.steps, args.warmup,
                       args.chunk_size, args.query_len, args.doc_len, device, args.dropout, args.lr, args.seed,
                       args.peak_tflops if args.peak_tflops is not None else peak_tflops(device),
                       Path(args.out) if args.out else None, args.threads, args.matryoshka_dims, args.lora_r,
                       args.isolate)


def bench_tokenizer(root: Path):
    """A BERT WordPiece tokenizer over a generated vocabulary of BERT's size and special-token ids ([PAD] 0,
    [UNK] 100, [CLS] 101, [SEP] 102): the batches are synthetic ids, and nothing has to be downloaded."""
    vocab = root / "vocab.txt"
    if not vocab.exists():
        root.mkdir(parents=True, exist_ok=True)
        tokens = (["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                  + [f"tok{i}" for i in range(VOCAB - 104)])
        vocab.write_text("\n".join(tokens) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def pooling_of(size: str) -> str:
    return "last_token" if size in DECODER_SIZES else "mean"


def lora_targets(size: str) -> list[str]:
    return LORA_TARGETS["qwen3" if size in DECODER_SIZES else "bert"]


def build_model_dir(size: str, root: Path, dropout: float, seed: int, device: torch.device | None = None) -> Path:
    """A random BERT (mean pooling) or Qwen3 (last-token pooling) of `size` in sentence-transformers layout, with
    `bench_tokenizer` (the batches are token ids already: the tokenizer is only saved). Initialised on `device`
    (on a GPU, seconds instead of minutes for a 7B model)."""
    out = root / size
    if out.exists():
        return out
    tokenizer = bench_tokenizer(root)
    torch.manual_seed(seed)
    if size in DECODER_SIZES:
        config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=512, attention_dropout=dropout,
                             eos_token_id=SEP, pad_token_id=SEP, bos_token_id=None, **DECODER_SIZES[size])
        with torch.device(device or "cpu"):
            encoder = Qwen3Model(config)
        if size in BF16_SIZES:
            encoder = encoder.to(torch.bfloat16)
    else:
        config = BertConfig(vocab_size=VOCAB, max_position_embeddings=512, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, **SIZES[size])
        # With its (unused) pooler, as real checkpoints have: sentence-transformers keeps it, `Embedder` drops it.
        encoder = BertModel(config)
    export_sentence_transformer(encoder, tokenizer, pooling_of(size), False, 512, out)
    return out


def write_mining_inputs(root: str | Path, size: str, rows: int, query_len: tuple[int, int] = (8, 32),
                        doc_len: tuple[int, int] = (32, 120), seed: int = 0) -> None:
    """Inputs for timing `gist-scale mine` (`launch/bench_gpu.sh`): a random BERT guide `ROOT/SIZE`
    (`build_model_dir`) and `ROOT/pairs.jsonl`, `rows` (query, pos) pairs of random vocabulary words (`tok123` is one
    token), lengths in words uniform in `query_len` and `doc_len`."""
    import numpy as np

    root = Path(root)
    build_model_dir(size, root, 0.0, seed)
    rng = np.random.default_rng(seed)

    def text(span: tuple[int, int]) -> str:
        return " ".join(f"tok{i}" for i in rng.integers(0, VOCAB - 104, int(rng.integers(span[0], span[1] + 1))))

    with (root / "pairs.jsonl").open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"query": text(query_len), "pos": text(doc_len)}) + "\n")


def synthetic_batch(generator: torch.Generator, batch: int, query_len: tuple[int, int], doc_len: tuple[int, int],
                    vocab: int, decoder: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Collated-like columns `query`, `pos`, `neg` (one negative per row) of random ids, right-padded: BERT's
    [CLS] .. [SEP] with [PAD], or for a decoder ids ending with the EOS (the SEP id) and padded with it."""

    def column(n: int, span: tuple[int, int]) -> dict[str, torch.Tensor]:
        lengths = torch.randint(span[0], span[1] + 1, (n,), generator=generator)
        width = int(lengths.max())
        ids = torch.randint(1000, vocab, (n, width), generator=generator)
        positions = torch.arange(width)[None]
        if not decoder:
            ids[:, 0] = CLS
        ids[positions == (lengths - 1)[:, None]] = SEP
        mask = (positions < lengths[:, None]).long()
        return {"input_ids": ids * mask + (SEP if decoder else PAD) * (1 - mask), "attention_mask": mask}

    return {"query": column(batch, query_len), "pos": column(batch, doc_len), "neg": column(batch, doc_len)}


def _batch_flops(config, columns: dict) -> float:
    lengths = torch.cat([c["attention_mask"].sum(1) for c in columns.values()]).long()
    return forward_flops(config, int(lengths.sum()), int((lengths ** 2).sum()))


def _real_tokens(columns: dict) -> int:
    return int(sum(c["attention_mask"].sum() for c in columns.values()))


def chunk_batch(columns: dict, chunk_size: int) -> chunking.ChunkedTexts:
    """The batch as the training collator hands it over with `train.chunk_size`: chunked on the host."""
    return chunking.chunk_texts(columns, chunking.num_chunks(sum(c["input_ids"].shape[0] for c in columns.values()),
                                                         chunk_size))


# -------------------------------------------------------------------------------------------------- modes


@dataclass
class Mode:
    """A built training step: `step(batch_index) -> loss`, and what it needs to be measured."""

    step: Callable[[int], torch.Tensor]
    guide_runs: bool
    chunk_size: int | None
    precision: str
    trainable_params: int


class Context:
    """What every mode of one (case, batch) shares: model directories, batches, device."""

    def __init__(self, cfg: BenchConfig, student_dir: Path, guide_dir: Path, batches: list[dict],
                 poolings: dict[Path, str], width: int, lora_targets: list[str]) -> None:
        self.cfg = cfg
        self.lora_targets = lora_targets
        self.matryoshka_dims = cfg.matryoshka_dims or [width // 2**i for i in range(4) if width // 2**i]
        self.student_dir, self.guide_dir = student_dir, guide_dir
        self.poolings = poolings
        self.device = cfg.device
        self.cuda = cfg.device.type == "cuda"
        self.batches = [send_to_device(b, self.device) for b in batches]
        # Chunked on the host beforehand, as the training collator does in its worker processes.
        self.chunked = [chunk_batch(b, cfg.chunk_size).to(self.device) for b in batches]

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in params if p.requires_grad], lr=self.cfg.lr, fused=self.cuda)

    def embedder(self, path: Path, guide: bool) -> Embedder:
        """Loaded as training loads them (mean or last-token pooling, normalized); the guide frozen, in bf16 on CUDA."""
        pooling = self.poolings[path]
        if guide:
            return load_guide(GuideConfig(name=str(path), pooling=pooling, dtype="bf16" if self.cuda else "fp32"),
                              self.device)
        lora = dict(lora_r=self.cfg.lora_r, lora_alpha=2.0 * self.cfg.lora_r, lora_target_modules=self.lora_targets)
        return load_student(ModelConfig(name=str(path), pooling=pooling, **(lora if self.cfg.lora_r else {}))
                            ).to(self.device).train()

    def side(self, index: int, chunked: bool):
        """Batch `index` as one tensor pair per column, or as the collator's chunks."""
        return self.chunked[index] if chunked else self.batches[index]

    def guide_embeddings(self, guide: Embedder, index: int, chunked: bool):
        return encode.embed_frozen(guide, self.side(index, chunked), 1)


def build_mode(name: str, ctx: Context) -> Mode:
    if name in ("st", "st_matryoshka"):
        return _st_mode(ctx, matryoshka=name == "st_matryoshka")
    if name in DEEPSPEED_MODES:
        return _deepspeed_mode(name, ctx)
    chunk = None if name in ("plain", "matryoshka") else ctx.cfg.chunk_size
    student = ctx.embedder(ctx.student_dir, guide=False)
    optimizer = ctx.optimizer(student.parameters())
    loss_fn = GISTLoss(check_finite=False, matryoshka_dims=ctx.matryoshka_dims if name == "matryoshka" else None)
    precision = "bf16-autocast" if ctx.cuda else "fp32"
    live_guide = name in ("plain", "chunked", "matryoshka")
    if live_guide:
        guide = ctx.embedder(ctx.guide_dir, guide=True)

        def guide_for(i: int) -> tuple:
            return ctx.guide_embeddings(guide, i, chunk is not None)
    else:
        # The cache as training reads it: fp16 on the host, copied in with each batch.
        cache_builder = ctx.embedder(ctx.guide_dir, guide=True)
        cached = [tuple(e.to("cpu", torch.float16) for e in ctx.guide_embeddings(cache_builder, i, True))
                  for i in range(len(ctx.batches))]
        if ctx.cuda:
            cached = [tuple(e.pin_memory() for e in c) for c in cached]
        del cache_builder  # the cached modes never hold the guide, as in training with --guide.cache

        def guide_for(i: int) -> tuple:
            return tuple(e.to(ctx.device, non_blocking=True) for e in cached[i])

    def step(i: int) -> torch.Tensor:
        guide_embeddings = guide_for(i)
        if name == "grad_cache":
            cache = encode.GradCache(student, ctx.chunked[i], 1, autocast=ctx.autocast)
            loss, _ = loss_fn(*cache.embeddings, *guide_embeddings)
            cache.backward(loss)
        else:
            with ctx.autocast():
                query, pos, neg = encode.encode_columns(student, ctx.side(i, chunk is not None), 1)
            loss, _ = loss_fn(query, pos, neg, *guide_embeddings)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Mode(step, live_guide, chunk, precision, _trainable(student))


def _st_mode(ctx: Context, matryoshka: bool = False) -> Mode:
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MatryoshkaLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import GISTEmbedLoss, MatryoshkaLoss

    model = SentenceTransformer(str(ctx.student_dir), device=str(ctx.device))
    if ctx.cfg.lora_r:
        from peft import LoraConfig, inject_adapter_in_model

        # What sentence-transformers' `add_adapter` does (through transformers, which asks for peft >= 0.22, not
        # released at the time of writing): peft's adapters injected into its transformers model, the base frozen.
        inject_adapter_in_model(LoraConfig(r=ctx.cfg.lora_r, lora_alpha=2 * ctx.cfg.lora_r, lora_dropout=0.0,
                                           target_modules=ctx.lora_targets), model.transformers_model)
    guide = SentenceTransformer(str(ctx.guide_dir), device=str(ctx.device))
    model.train()
    loss_fn = GISTEmbedLoss(model, guide)
    if matryoshka:
        loss_fn = MatryoshkaLoss(model, loss_fn, ctx.matryoshka_dims)
    optimizer = ctx.optimizer(model.parameters())

    def step(i: int) -> torch.Tensor:
        # Fresh dicts: sentence-transformers writes its outputs into the features it is given.
        features = [dict(ctx.batches[i][c]) for c in ("query", "pos", "neg")]
        with ctx.autocast():
            loss = loss_fn(features, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Mode(step, True, None, "bf16-autocast" if ctx.cuda else "fp32", _trainable(model))


def _deepspeed_mode(name: str, ctx: Context) -> Mode:
    import deepspeed  # heavy: only the DeepSpeed modes load it

    stage = 2 if name.startswith("zero2") else 3
    chunk = ctx.cfg.chunk_size if name.endswith("_chunked") else None
    if not distributed.is_distributed():
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if ctx.cuda else "gloo")
    batch = ctx.batches[0]["query"]["input_ids"].shape[0]
    config = {"train_micro_batch_size_per_gpu": batch, "train_batch_size": batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "bf16": {"enabled": ctx.cuda}, "fp16": {"enabled": False},
              "zero_allow_untested_optimizer": True, "zero_optimization": dict(ZERO_SETTINGS[stage])}
    student = ctx.embedder(ctx.student_dir, guide=False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=ctx.cfg.lr)
    trainable = _trainable(student)  # counted before ZeRO-3 partitions the parameters
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
    guide = ctx.embedder(ctx.guide_dir, guide=True)
    loss_fn = GISTLoss(check_finite=False)

    def step(i: int) -> torch.Tensor:
        guide_embeddings = ctx.guide_embeddings(guide, i, chunk is not None)
        query, pos, neg = encode.encode_columns(engine, ctx.side(i, chunk is not None), 1)
        loss, _ = loss_fn(query, pos, neg, *guide_embeddings)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return Mode(step, True, chunk, "bf16" if ctx.cuda else "fp32", trainable)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- measuring


def measure(name: str, ctx: Context, case: str, flops: dict) -> dict:
    """The mode's record, measured in this process or, with `--isolate`, in a fresh one."""
    if not ctx.cfg.isolate:
        return _measure(name, ctx, case, flops)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Spawned, not forked: a forked child would share the parent's pages (and OpenMP is not fork-safe).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_isolated, name, ctx, case, flops).result()


def _measure_isolated(name: str, ctx: Context, case: str, flops: dict) -> dict:
    if ctx.cfg.threads:
        torch.set_num_threads(ctx.cfg.threads)
    # Every mode's process imports the same libraries, so that their peaks differ by what the modes hold.
    for module in ("sentence_transformers", "peft", "deepspeed"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    record = _measure(name, ctx, case, flops, after_build=_reset_peak_rss)
    if ctx.device.type != "cuda" and not record["oom"]:
        record.update(peak_mem_gib=memory_status("VmHWM")["VmHWM"] / 2**30,
                      peak_mem_kind="process peak RSS over the steps")
    return record


def _reset_peak_rss() -> None:
    """Start `VmHWM` over from the current resident set (Linux >= 4.0), so the peak is the steps', not loading's
    (`from_pretrained` briefly holds the weights twice, plus the memory-mapped file). What loading freed goes back
    to the system first: glibc keeps freed heap pages resident until `malloc_trim`."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak may then include loading's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _measure(name: str, ctx: Context, case: str, flops: dict, after_build: Callable[[], None] | None = None) -> dict:
    """Build the mode, run warmup then timed steps, and return its record (`oom` when it did not fit)."""
    cfg, device = ctx.cfg, ctx.device
    batch = ctx.batches[0]["query"]["input_ids"].shape[0]
    record = {"case": case, "student": case.split("/")[0], "guide": case.split("/")[1], "mode": name, "batch": batch,
              "chunk_size": None, "steps": cfg.steps, "oom": False, "device": _device_name(device),
              "matryoshka_dims": ctx.matryoshka_dims if name in MATRYOSHKA_MODES else None, "lora_r": cfg.lora_r,
              "peak_mem_kind": "accelerator peak allocation" if device.type == "cuda" else None}
    _release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mode = None
    try:
        torch.manual_seed(cfg.seed)
        mode = build_mode(name, ctx)
        if after_build is not None:
            after_build()
        first_loss = float(mode.step(0))
        for i in range(1, cfg.warmup):
            mode.step(i % len(ctx.batches))
        _sync(device)
        used = [(cfg.warmup + i) % len(ctx.batches) for i in range(cfg.steps)]
        start = time.perf_counter()
        for index in used:
            mode.step(index)
        _sync(device)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        record.update(oom=True, **{key: None for key in RECORD_FIELDS if key not in record})
        return record
    finally:
        info = None if mode is None else (mode.guide_runs, mode.chunk_size, mode.precision, mode.trainable_params)
        del mode
        _release(device)
    guide_runs, chunk_size, precision, trainable = info
    real = sum(flops["real_tokens"][i] for i in used)
    processed = sum(flops["processed"][chunk_size][i] for i in used)
    model_flops = sum(3 * flops["student"][i] + (flops["guide"][i] if guide_runs else 0.0) for i in used)
    tflops = model_flops / elapsed / 1e12
    record.update(
        chunk_size=chunk_size, precision=precision, triplets_per_s=batch * cfg.steps / elapsed,
        real_tokens_per_s=real / elapsed, padding_fraction=1.0 - real / processed, model_tflops_per_s=tflops,
        mfu=tflops / cfg.peak_tflops if cfg.peak_tflops else None, first_loss=first_loss,
        seconds_per_step=elapsed / cfg.steps, peak_mem_gib=peak, trainable_params=trainable)
    return record


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_case(cfg: BenchConfig, student: str, guide: str, batch: int, root: Path) -> list[dict]:
    case = f"{student}/{guide}"
    student_dir = build_model_dir(student, root, cfg.dropout, cfg.seed, cfg.device)
    guide_dir = build_model_dir(guide, root, cfg.dropout, cfg.seed + 1, cfg.device)
    student_config, guide_config = AutoConfig.from_pretrained(student_dir), AutoConfig.from_pretrained(guide_dir)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = [synthetic_batch(generator, batch, cfg.query_len, cfg.doc_len, student_config.vocab_size,
                               decoder=student in DECODER_SIZES) for _ in range(DISTINCT_BATCHES)]
    ctx = Context(cfg, student_dir, guide_dir, batches, {student_dir: pooling_of(student), guide_dir: pooling_of(guide)},
                  student_config.hidden_size, lora_targets(student))
    flops = {
        "real_tokens": [_real_tokens(b) for b in batches],
        "student": [_batch_flops(student_config, b) for b in batches],
        "guide": [_batch_flops(guide_config, b) for b in batches],
        # Tokens the student's calls process, padding included: one call per column, or the step's chunks.
        "processed": {None: [sum(c["input_ids"].numel() for c in b.values()) for b in batches],
                      cfg.chunk_size: [chunked.processed_tokens for chunked in ctx.chunked]},
    }
    records = []
    for name in cfg.modes:
        console.print(f"[dim]{case} batch {batch}: {name}")
        records.append(measure(name, ctx, case, flops))
    reference = next((r for r in records if r["mode"] == "st" and r["triplets_per_s"]), None)
    for record in records:
        ok = reference is not None and record["triplets_per_s"]
        record["ratio_vs_st"] = record["triplets_per_s"] / reference["triplets_per_s"] if ok else None
    del ctx
    _release(cfg.device)
    return records


def _has_sentence_transformers() -> bool:
    try:  # optional: the reference implementation, not a dependency
        return importlib.import_module("sentence_transformers") is not None
    except ImportError:
        return False


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("torch", "transformers", "sentence-transformers", "deepspeed", "gist-scale"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def print_table(records: list[dict]) -> None:
    table = Table(title="gist-scale bench: training step throughput (higher is better)")
    for column in ("case", "batch", "mode", "triplets/s", "real tok/s", "padding", "TFLOP/s", "MFU", "peak GiB",
                   "x ST", "first loss", "trainable"):
        table.add_column(column, justify="left" if column in ("case", "mode") else "right")

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in records:
        if r["oom"]:
            table.add_row(r["case"], str(r["batch"]), r["mode"], "OOM", *["-"] * 8)
            continue
        table.add_row(r["case"], str(r["batch"]), r["mode"], fmt(r["triplets_per_s"], ".1f"),
                      fmt(r["real_tokens_per_s"], ".0f"), fmt(r["padding_fraction"], ".0%"),
                      fmt(r["model_tflops_per_s"], ".3g"), fmt(r["mfu"], ".1%"), fmt(r["peak_mem_gib"], ".2f"),
                      fmt(r["ratio_vs_st"], ".2f"), fmt(r["first_loss"], ".4f"),
                      _count(r["trainable_params"]))
    Console(highlight=False, width=max(130, Console().width)).print(table)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig) -> int:
    if "st" in cfg.modes and not _has_sentence_transformers():
        console.print("[yellow]sentence-transformers is not installed: the `st` reference is skipped, so no "
                      "ratio is reported (pip install sentence-transformers, or gist-scale[dev])")
        cfg.modes = [m for m in cfg.modes if m != "st"]
    meta = {"versions": versions(), "python": platform.python_version(), "query_len": list(cfg.query_len),
            "doc_len": list(cfg.doc_len), "warmup": cfg.warmup, "dropout": cfg.dropout,
            "peak_tflops": cfg.peak_tflops}
    console.print(f"device {_device_name(cfg.device)}  " + "  ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    records = []
    with tempfile.TemporaryDirectory(prefix="gist-bench-") as root:
        for student, guide in cfg.cases:
            for batch in cfg.batches:
                for record in run_case(cfg, student, guide, batch, Path(root)):
                    record.update(meta)
                    records.append(record)
    print_table(records)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(records, indent=1) + "\n")
        console.print(f"records: {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
