"""`gist-scale eval`: a model's retrieval (and STS) metrics on eval triplets, a BEIR folder or MTEB tasks.

The model is a sentence-transformers directory or hub name (`gist_scale.st_format.load_sentence_transformer_dir`)
or a training checkpoint (`gist_scale.checkpoint.load_checkpoint_embedder`), both built as the same `Embedder` as
training. Eval triplets and BEIR folders are scored by `gist_scale.evaluation.scoring`, sharded over the ranks of a
torchrun / accelerate launch job; `--mteb` tasks go to the mteb package through `gist_scale.evaluation.mteb`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Column, Table
from transformers import PreTrainedTokenizerBase

from gist_scale import distributed
from gist_scale.checkpoint import COMPLETE_MARKER, CheckpointError, load_checkpoint_embedder
from gist_scale.config import ConfigError
from gist_scale.data import DataError
from gist_scale.evaluation.beir import load_beir
from gist_scale.evaluation.data import EvalData, load_eval_data, read_sts
from gist_scale.evaluation.scoring import evaluate_embedder
from gist_scale.model import Embedder
from gist_scale.options import load_config
from gist_scale.places import require_writable_file
from gist_scale.st_format import load_sentence_transformer_dir

__all__ = ["build_parser", "load_model", "main"]


# ---------------------------------------------------------------------------------- model directories


def load_model(name: str, max_length: int | None = None, trust_remote_code: bool = False
               ) -> tuple[Embedder, PreTrainedTokenizerBase, int]:
    """A sentence-transformers directory or hub name, or a training checkpoint (RUN/checkpoints/step_N), as our
    `Embedder`, its tokenizer and its token limit (`max_length` overrides the model's).

    `trust_remote_code` lets a model directory or hub name run its own code (`auto_map`, as
    `SentenceTransformer(path, trust_remote_code=True)`); a checkpoint follows its run's `model.trust_remote_code`
    instead, recorded in the run's config.yaml."""
    path = Path(name).expanduser()
    if (path / COMPLETE_MARKER).is_file():
        return load_checkpoint_embedder(path, max_length)
    return load_sentence_transformer_dir(name, max_length, trust_remote_code)


# ------------------------------------------------------------------------------------------------ CLI


def _run_mteb(embedder: Embedder, tokenizer: PreTrainedTokenizerBase, length: int, name: str, tasks: list,
              out_dir: Path, batch_size: int, device: torch.device) -> dict[str, float]:
    """Run the `--mteb` tasks on one model; mteb's result JSON and `summary.json` go to `out_dir`."""
    from gist_scale.evaluation.mteb import EmbedderEncoder, run_mteb  # see `main`

    encoder = EmbedderEncoder(embedder, tokenizer, length, device, _mteb_model_name(name), embedder.prompts, batch_size)
    summary = run_mteb(encoder, tasks, out_dir, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # ours to write in, whatever mteb's cache did
    (out_dir / "summary.json").write_text(json.dumps({"model": name, "tasks": summary}, indent=2) + "\n")
    return {f"{task} ({result['main_score']})": result["value"] for task, result in summary.items()}


def _mteb_model_name(name: str) -> str:
    """mteb files results under `results/<org>__<name>/`: a local path becomes `local__<its last two parts>`."""
    path = Path(name).expanduser()
    if path.exists():
        return "local/" + "_".join(path.resolve().parts[-2:])
    return name if "/" in name else f"local/{name}"


def _table(model: str, metrics: dict[str, float], baseline: str | None, base: dict[str, float] | None):
    # Names go in the caption, where they may wrap, rather than in headers, where long ones would be cut.
    caption = f"model: {model}" + (f"\nbaseline: {baseline}" if base is not None else "")
    numbers = ["model"] + (["baseline", "delta (model - baseline)"] if base is not None else [])
    table = Table("metric", *(Column(name, justify="right") for name in numbers),
                  title="retrieval" + (" and STS" if "spearman" in metrics else ""), caption=caption)
    for key, value in metrics.items():
        cells = [key, f"{value:.4f}"]
        if base is not None:
            delta = value - base[key]
            color = "green" if delta > 0 else "red" if delta < 0 else "white"
            cells += [f"{base[key]:.4f}", f"[{color}]{delta:+.4f}[/{color}]"]
        table.add_row(*cells)
    return table


def _device(name: str) -> torch.device:
    """`--device NAME` as a torch device that exists here (torch's own errors only surface at the first tensor)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ConfigError(f"--device {name}: no such device on this machine; use --device cpu (or leave it out)")
    return device


def _dims(text: str) -> list[int]:
    """`--dims 256,128,64`: positive sizes, largest first."""
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive embedding sizes separated by commas, e.g. 256,128")
    return sorted(set(dims), reverse=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gist-scale eval",
        description="Retrieval (nDCG@10, MRR@10, Recall@1/@10/@100, MAP@100) and optional STS evaluation of a "
                    "sentence-transformers model or a training checkpoint, on eval triplets or a BEIR folder, or "
                    "MTEB tasks through the mteb package. Under torchrun every rank encodes a shard (not with --mteb).")
    parser.add_argument("model", help="sentence-transformers directory (e.g. RUN/final), hub name, or checkpoint "
                                      "(RUN/checkpoints/step_N)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="eval triplets: file, folder or hub dataset (default: the shipped WordNet "
                                       "sample's held-out eval split)")
    source.add_argument("--beir", metavar="DIR", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    source.add_argument("--mteb", metavar="TASK[,TASK...]", help="MTEB tasks or benchmarks, e.g. NanoBEIR,SciFact "
                                                                  "(needs pip install 'gist-scale[mteb]')")
    parser.add_argument("--split", help="split of a --data folder or hub dataset (default: eval), or qrels file of "
                                        "--beir (default: test)")
    parser.add_argument("--config", help="training config (e.g. RUN/config.yaml) whose data column mapping and "
                                         "instruction options apply to --data")
    parser.add_argument("--corpus", action="append", default=[], metavar="FILE",
                        help="extra corpus texts for --data (JSONL with 'text', or plain lines); repeatable")
    parser.add_argument("--sts", metavar="FILE", help="scored pairs (JSONL: sentence1, sentence2, score): adds "
                                                      "Spearman correlation")
    parser.add_argument("--baseline", metavar="MODEL", help="second model, shown side by side with deltas")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward (default: 64)")
    parser.add_argument("--max-length", type=int, help="token limit (default: each model's own max_seq_length)")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model and the baseline run their repository's own Python code (auto_map), as "
                             "SentenceTransformer(path, trust_remote_code=True); only for code you trust (a "
                             "checkpoint follows its run's model.trust_remote_code)")
    parser.add_argument("--dims", type=_dims, default=[],
                        metavar="D[,D...]", help="Matryoshka sizes: also report every metric on the embeddings "
                                                 "truncated to each (e.g. 256,128,64), as ndcg@10@256 ...")
    parser.add_argument("--out", metavar="PATH", help='write {"model": {...}, "baseline": {...} or null} as JSON to '
                                                      "this file; with --mteb, the folder for mteb's result files "
                                                      "and summary.json (default: mteb_results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # soft_wrap: paths and messages stay on one line (copyable) instead of being folded at the terminal width.
    console = Console(stderr=True, highlight=False, soft_wrap=True)

    def fail(message: str) -> int:
        console.print(f"[red]error:[/red] {message}")
        return 2

    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        return fail("--batch-size and --max-length must be positive")
    if args.corpus and (args.beir or args.mteb):  # --data, --beir and --mteb exclude each other
        return fail("--corpus adds distractors to eval triplets (--data); a BEIR folder or MTEB task has its own")
    if args.mteb and (args.sts or args.config or args.split):
        return fail("--sts, --config and --split do not apply to --mteb (each task brings its data and splits)")
    results: dict[str, dict[str, float] | None] = {"model": None, "baseline": None}
    try:
        state = distributed.launch_state()  # ConfigError: a launch that would not shard the encoding
        if args.mteb and state.use_distributed:
            return fail("--mteb runs in one process: start gist-scale eval without torchrun/accelerate launch")
        device = _device(args.device) if args.device else state.device
        # Checked before minutes of encoding, not after (with --mteb, --out is mteb's folder).
        out = require_writable_file(args.out, "--out") if args.out and not args.mteb else None
        if args.mteb:
            # mteb is an optional dependency (the [mteb] extra), heavy to import: only when --mteb asks for it.
            from gist_scale.evaluation.mteb import resolve_tasks

            tasks = resolve_tasks([task.strip() for task in args.mteb.split(",") if task.strip()])
        else:
            with state.main_process_first():  # the main process fills the datasets cache, the others read it
                data = _cli_eval_data(args)
            if state.is_main_process:
                console.print(data.describe())
        for key, name in (("model", args.model), ("baseline", args.baseline)):
            if name is None:
                continue
            embedder, tokenizer, length = load_model(name, args.max_length, args.trust_remote_code)
            embedder.to(device)
            if args.mteb:
                out_dir = Path(args.out or "mteb_results") / key
                results[key] = _run_mteb(embedder, tokenizer, length, name, tasks, out_dir, args.batch_size, device)
                console.print(f"{key} {name}: mteb results in {out_dir}")
                continue
            start = time.perf_counter()
            results[key] = evaluate_embedder(embedder, tokenizer, length, data, args.batch_size, device,
                                             dims=args.dims)
            if state.is_main_process:
                console.print(f"{key} {name}: encoded {len(data.texts)} texts in {time.perf_counter() - start:.1f} s")
    except (ConfigError, DataError, CheckpointError, OSError, ValueError) as error:
        return fail(str(error))
    except ImportError as error:  # only --mteb imports anything here: mteb itself
        return fail(f"{error}; --mteb needs the mteb package: pip install 'gist-scale[mteb]'")
    if state.is_main_process:
        Console(highlight=False).print(_table(args.model, results["model"], args.baseline, results["baseline"]))
        if out is not None:
            out.write_text(json.dumps(results, indent=2) + "\n")
            console.print(f"metrics written to {out}")
    if state.use_distributed:
        # Leave together: a rank that tears gloo down while a peer is still in a collective aborts it.
        state.wait_for_everyone()
        state.destroy_process_group()
    return 0


def _cli_eval_data(args: argparse.Namespace) -> EvalData:
    """The eval data `gist-scale eval` was given: a BEIR folder, or eval triplets (the shipped sample by default)."""
    if args.beir:
        return load_beir(args.beir, args.split or "test", read_sts(args.sts) if args.sts else None)
    data_cfg = load_config([], args.config).data if args.config else None
    return load_eval_data(args.data, data_cfg, args.corpus, sts=args.sts, split=args.split or "eval")


if __name__ == "__main__":
    sys.exit(main())
