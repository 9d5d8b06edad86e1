"""`gist-scale bench`: training-step throughput of the trainer and of sentence-transformers' GISTEmbedLoss.

Every mode of ours is a configuration of `gist_scale.trainer.Trainer`, built as `gist-scale train` builds it (the
same components, Accelerate and, for ZeRO, DeepSpeed through the launcher's environment), and what is timed is
`Trainer.train_step` on the micro-batches of `Trainer.optimizer_steps()`: the trainer's own sampler, collator and
device transfer over a JSONL file of synthetic triplets. Every mode trains the same initial weights on the same rows:

* `st`: the reference. `SentenceTransformer` + `GISTEmbedLoss` with `torch.optim.AdamW` (fused on CUDA), bf16
  autocast on CUDA and the gradient clipped as ours (1.0, the default of both trainers); the guide is a second
  `SentenceTransformer`. It steps on the micro-batches of the `plain` mode (the student's features, padded per
  column), which a Trainer collates for it first.
* ours, cumulative, so each mode adds one option to the previous one: `plain` (the trainer's defaults: one forward
  per column, the guide frozen, in bf16 on CUDA), `chunked` (+ `train.chunk_size`: length-sorted chunks with
  per-chunk padding), `guide_cache` (+ `guide.cache`, built by `gist-scale cache-guide`'s own code: no guide
  forward), `grad_cache` (+ `train.grad_cache`: activation memory independent of the batch).
* DeepSpeed, one process (the ZeRO settings of `ds_configs/zero{2,3}.json`, carried in code so that a pip-installed
  package has them, set through `ACCELERATE_USE_DEEPSPEED` and `ACCELERATE_DEEPSPEED_CONFIG_FILE` as the launchers
  do): `zero2`, `zero3` (one forward per column), `zero2_chunked`, `zero3_chunked` (+ `train.chunk_size`, so
  `--chunk-size` at least the step's texts makes one call per step: fewer ZeRO-3 parameter gathers). Not in the
  default modes; they need `deepspeed`, and they run in a process of their own, one per stage.
* Matryoshka GIST: `matryoshka` (`plain` with `loss.matryoshka_dims`) and `st_matryoshka` (sentence-transformers'
  `MatryoshkaLoss(GISTEmbedLoss)`), at `--matryoshka-dims` (default: the student's width, 1/2, 1/4, 1/8). Not in
  the default modes; `--modes plain,matryoshka` measures the overhead of the sizes over plain GIST.

LoRA (`--lora-r R`): every mode trains rank-R adapters (alpha 2R, peft) on the attention and MLP linear layers of a
frozen student, ours through `model.lora_r` as training does, sentence-transformers through peft's adapters injected
into its model with the same target names (on BERT they also put an adapter on sentence-transformers' unused pooler,
which gets no gradient). `trainable_params` tells what each mode optimises.

Memory: on CUDA `peak_mem_gib` is the accelerator's peak allocation over the steps. On a CPU, `--isolate` runs every
mode in a fresh process (spawned, so no mode inherits another's memory) and `peak_mem_gib` is that process's peak
resident set (`VmHWM`) during the steps, counted from the moment the mode is built (loading's transient peak left
out): the resident model, optimizer state and activations, plus what is the same for every mode (the interpreter,
the libraries, since each process imports sentence-transformers, peft and deepspeed whatever its mode, and the
batches).

Sizes are BERT configs (`tiny`, `small`, `base`, `large`) and Qwen3 decoders (`qwen3-tiny`, and the shapes of
Qwen3-Embedding-0.6B and -8B: `qwen3-0.6b`, `qwen3-8b`), built locally (`gist_scale.tools.bench.inputs`). A case is
`STUDENT/GUIDE` (`small/large`) or one size for both. Data: `3 x batch` rows of random words, each text's token length
uniform in `--query-len` (queries) or `--doc-len` (positive, one negative), special tokens included.

Reported per mode: triplets/s, real (non-padding) student tokens/s, the padding share of the student's processed
tokens, model TFLOP/s on real tokens (student 3x forward, plus the guide's forward where it runs; GradCache's
recomputation is not counted) and MFU against `--peak-tflops` (known for H100/H200/A100), peak memory and the ratio
to `st` in the same case. `first_loss` is the loss of the first step, identical across modes with `--dropout 0` (a
check that all modes train the same model on the same batch).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig

from gist_scale.flops import peak_tflops
from gist_scale.tools.bench.inputs import (DECODER_SIZES, MAX_LENGTH, SIZES, ZERO_SETTINGS, build_model_dir,
                                           deepspeed_config, write_rows)
from gist_scale.tools.bench.modes import ALL_MODES, MODES, BenchConfig, CaseSetup
from gist_scale.tools.bench.timing import RECORD_FIELDS, device_name, measure
from gist_scale.trainer.console import console

__all__ = ["BenchConfig", "RECORD_FIELDS", "build_parser", "main", "parse_args"]

DISTINCT_BATCHES = 3
"""Global batches in the synthetic data (the sampler reshuffles them every epoch, so no mode benefits from one fixed
shape)."""


# ---------------------------------------------------------------------------------------------- arguments


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    high = high or low  # one number: MIN = MAX
    # Not two whole numbers gets the same message as a range out of bounds.
    if not (low.isdecimal() and high.isdecimal() and 3 <= int(low) <= int(high) <= MAX_LENGTH):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN-MAX token lengths with 3 <= MIN <= MAX <= "
                                         f"{MAX_LENGTH} (a word and the special tokens at least)")
    return int(low), int(high)


def _case(text: str) -> tuple[str, str]:
    student, _, guide = text.partition("/")
    for size in (student, guide or student):
        if size not in SIZES and size not in DECODER_SIZES:
            raise argparse.ArgumentTypeError(f"unknown size {size!r} in case {text!r}: use "
                                             f"{', '.join([*SIZES, *DECODER_SIZES])}")
    return student, guide or student


def _mode(name: str) -> str:
    if name not in ALL_MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {name!r}: use {', '.join(ALL_MODES)}")
    return name


def _at_least(low: int, what: str) -> Callable[[str], int]:
    def number(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
        return int(text)
    return number


def _comma_separated(item: Callable[[str], Any]) -> Callable[[str], list]:
    """A comma-separated list of `item`s, at least one."""
    def items(text: str) -> list:
        if not text.strip(","):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
        return [item(part) for part in text.split(",") if part]
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gist-scale bench", description=__doc__.split("\n\n")[0],
                                     epilog="Example (one H100/H200): gist-scale bench --cases base/base,small/large "
                                            "--batch 32,256 --out bench.json.  CPU smoke test: gist-scale bench "
                                            "--cases tiny --batch 8 --query-len 8-16 --doc-len 16-32 --steps 2")
    parser.add_argument("--cases", type=_comma_separated(_case), default="base/base,small/large",
                        help="comma-separated STUDENT/GUIDE sizes (tiny, small, base, large, qwen3-tiny, qwen3-0.6b, "
                             "qwen3-8b); one size = both")
    parser.add_argument("--batch", dest="batches", default="32,256", help="comma-separated triplets per step",
                        type=_comma_separated(_at_least(2, "triplets per step >= 2 (in-batch negatives)")))
    parser.add_argument("--modes", type=_comma_separated(_mode), default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(ALL_MODES)} (st is the reference)")
    positive = _at_least(1, "a whole number >= 1")
    parser.add_argument("--steps", type=positive, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=positive, default=3, help="untimed steps per mode first")
    parser.add_argument("--chunk-size", type=positive, default=128, help="texts per encoder call in the chunked modes")
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
    parser.add_argument("--matryoshka-dims", type=_comma_separated(positive), default=None, metavar="D,D,...",
                        help="sizes of the matryoshka modes (default: the student's width, 1/2, 1/4, 1/8)")
    parser.add_argument("--lora-r", type=_at_least(0, "a rank >= 0 (0: full fine-tuning)"), default=0,
                        help="train LoRA adapters of this rank (alpha 2r) on the student in every mode, "
                             "sentence-transformers included (0: full fine-tuning)")
    parser.add_argument("--isolate", action="store_true",
                        help="run each mode in a fresh process: on a CPU, peak GiB is then its peak resident memory")
    parser.add_argument("--out", type=Path, help="write the records as a JSON list to this file")
    return parser


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    auto = args.device == "auto"
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else args.device)
    if args.isolate and args.device.type == "cuda":
        parser.error("--isolate measures CPU memory; on CUDA peak GiB is the accelerator's own peak already")
    if args.peak_tflops is None:
        args.peak_tflops = peak_tflops(args.device)
    return BenchConfig(**vars(args))


# ------------------------------------------------------------------------------------------------- running


def run_case(cfg: BenchConfig, student: str, guide: str, batch: int, root: Path) -> list[dict]:
    """Every mode of a case: the models (built once per size), the training file and the settings they share."""
    student_dir = build_model_dir(student, root, cfg.dropout, cfg.seed, cfg.device)
    guide_dir = build_model_dir(guide, root, cfg.dropout, cfg.seed + 1, cfg.device)
    work_dir = root / f"{student}-{guide}-{batch}"
    work_dir.mkdir()
    for stage in ZERO_SETTINGS:  # zero2.json and zero3.json, the shipped ZeRO configs, for the DeepSpeed modes
        (work_dir / f"zero{stage}.json").write_text(json.dumps(deepspeed_config(stage), indent=2) + "\n")
    rows = write_rows(work_dir / "rows.jsonl", DISTINCT_BATCHES * batch, cfg.query_len, cfg.doc_len,
                      student in DECODER_SIZES, cfg.seed)
    width = AutoConfig.from_pretrained(student_dir).hidden_size
    dims = cfg.matryoshka_dims or [width // 2**i for i in range(4) if width // 2**i]
    setup = CaseSetup(cfg, student, guide, batch, student_dir, guide_dir, rows, work_dir, tuple(dims))
    records = measure(cfg.modes, setup)
    reference = next((r for r in records if r["mode"] == "st" and r["triplets_per_s"]), None)
    for record in records:
        ok = reference is not None and record["triplets_per_s"]
        record["ratio_vs_st"] = record["triplets_per_s"] / reference["triplets_per_s"] if ok else None
    return records


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("torch", "transformers", "sentence-transformers", "deepspeed", "gist-scale"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


_COLUMNS = (("case", "case", None), ("batch", "batch", "d"), ("mode", "mode", None),
            ("triplets/s", "triplets_per_s", ".1f"), ("real tok/s", "real_tokens_per_s", ".0f"),
            ("padding", "padding_fraction", ".0%"), ("TFLOP/s", "model_tflops_per_s", ".3g"), ("MFU", "mfu", ".1%"),
            ("peak GiB", "peak_mem_gib", ".2f"), ("x ST", "ratio_vs_st", ".2f"), ("first loss", "first_loss", ".4f"),
            ("trainable", "trainable_params", None))
"""The table's columns: header, record field, format (None: as text; `trainable` in K or M)."""


def print_table(records: list[dict]) -> None:
    table = Table(title="gist-scale bench: training step throughput (higher is better)")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="left" if header in ("case", "mode") else "right")
    for r in records:
        cells = ["-" if r[key] is None else format(r[key], spec) if spec else str(r[key]) for _, key, spec in _COLUMNS]
        n = r["trainable_params"]
        cells[-1] = "-" if n is None else f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"
        if r["oom"]:
            cells[3] = "OOM"  # every other measured cell is "-"
        table.add_row(*cells)
    Console(highlight=False, width=max(130, Console().width)).print(table)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if "st" in cfg.modes and importlib.util.find_spec("sentence_transformers") is None:
        # optional: the reference implementation, not a dependency
        console.print("[yellow]sentence-transformers is not installed: the `st` reference is skipped, so no "
                      "ratio is reported (pip install sentence-transformers, or gist-scale[dev])")
        cfg.modes = [m for m in cfg.modes if m != "st"]
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = {"versions": versions(), "python": platform.python_version(), "query_len": list(cfg.query_len),
            "doc_len": list(cfg.doc_len), "warmup": cfg.warmup, "dropout": cfg.dropout, "peak_tflops": cfg.peak_tflops}
    console.print(f"device {device_name(cfg.device)}  " + "  ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    try:
        with tempfile.TemporaryDirectory(prefix="gist-bench-") as root:
            # Every case at every batch size, in that order; each record with the settings and versions of the run.
            records = [{**record, **meta} for student, guide in cfg.cases for batch in cfg.batches
                       for record in run_case(cfg, student, guide, batch, Path(root))]
    except FloatingPointError as error:
        console.print(f"[red]error:[/red] {error}")
        return 1
    finally:
        torch.set_num_threads(threads)
    print_table(records)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(records, indent=1) + "\n")
        console.print(f"records: {cfg.out}")
    return 0
