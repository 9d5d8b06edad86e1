"""The `gist-scale` command: a thin dispatcher to each subcommand's `main(argv)`.

Each subcommand's module is imported only when it runs, so `gist-scale --help` stays fast and a data command does
not import DeepSpeed. Every `main(argv)` is also callable in-process from tests.
"""

from __future__ import annotations

import importlib
import os
import sys

from gist_scale.plan import launched_world_size

COMMANDS = {
    "train": ("gist_scale.train", "fine-tune a student with GISTEmbed (no arguments: the offline quickstart)"),
    "data": ("gist_scale.tools.wordnet", "build datasets: `data wordnet OUT_DIR` writes WordNet triplets"),
    "bench": ("gist_scale.tools.bench", "training-step throughput vs sentence-transformers' GISTEmbedLoss (JSON, table)"),
    "cache-guide": ("gist_scale.guide_cache", "embed the training data with the guide once: `cache-guide OUT_DIR`"),
    "mine": ("gist_scale.tools.mine", "hard negatives for (query, positive) pairs, filtered by the guide's GIST rule"),
    "calibrate": ("gist_scale.tools.calibrate", "the guide's masked share per margin, on the run's global batches"),
    "eval": ("gist_scale.evaluation.cli", "retrieval metrics of a model on eval triplets, a BEIR folder or MTEB tasks"),
    "report": ("gist_scale.tools.report", "plot a run's metrics.jsonl (loss, lr, masking, throughput, eval) to a PNG"),
    "recipes": ("gist_scale.recipes", "list the shipped training recipes (`train --recipe NAME`), or print one"),
}

USAGE = "usage: gist-scale COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\n`gist-scale COMMAND --help` describes each command."


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"gist-scale: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[command][0]).main(rest) or 0)


def run() -> int:
    """The entry point of `gist-scale` and `python -m gist_scale`: `main`, and then, on a rank of a multi-process job
    (`WORLD_SIZE` > 1, set by torchrun and accelerate launch), the process ends at once with `main`'s exit code.

    Everything a command writes is on disk when `main` returns. What an ordinary exit adds is interpreter
    finalization, where torch's gloo worker threads can still hold work that references Python objects. Their
    destruction then aborts the process (SIGABRT, "terminate called without an active exception") or leaves it
    spinning. Seen here on CPU ranks: after a peer stalled past the collective timeout, and at the end of a ZeRO-3
    run. A rank that has finished has nothing left to lose, so it skips that stage.
    """
    code = main()
    if launched_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
