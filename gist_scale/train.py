"""`gist-scale train`: the command line of the training loop (`gist_scale.trainer`), and its one-line errors."""

from __future__ import annotations

import dataclasses

import torch
from jsonargparse import ArgumentParser
from rich.markup import escape

from gist_scale import distributed
from gist_scale.checkpoint import CheckpointError
from gist_scale.config import ConfigError, JobConfig
from gist_scale.data import DataError
from gist_scale.options import job_parser, parse_job
from gist_scale.plan import launch_plan
from gist_scale.trainer import Trainer
from gist_scale.trainer.console import console

__all__ = ["Trainer", "apply_debug", "build_parser", "main"]


def apply_debug(cfg: JobConfig) -> JobConfig:
    """Debug mode: a handful of logged-every-step iterations (`main` adds autograd anomaly detection), as a new
    config derived from the loaded one."""
    if launch_plan().world_size > 1:
        raise ConfigError("--debug runs a single process: start it with `gist-scale train --debug` (or "
                          "launch/single_gpu_debug.sh), not under torchrun/accelerate launch with several processes")
    train = dataclasses.replace(cfg.train, max_steps=min(cfg.train.max_steps or 3, 3), log_every=1,
                                max_nonfinite_steps=1)
    return dataclasses.replace(cfg, train=train)


def build_parser() -> ArgumentParser:
    """`gist-scale train`'s options: every config field (`--section.field VALUE`), `--recipe`, `--config`,
    `--dry-run`."""
    parser = job_parser("gist-scale train", "Fine-tune an embedding model with GISTEmbed. With no arguments: the "
                        "offline quickstart (all-MiniLM-L6-v2 guiding itself on the shipped WordNet sample). Values "
                        "are YAML: --optim.betas [0.9,0.99], --train.max_steps null; `--debug` alone means true.")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything that needs no weights (config, places, launch, checkpoint to resume, "
                             "data rows and tokenization), print the plan and the per-rank memory of the student's "
                             "weights, gradients and optimizer state, and exit without training")
    return parser


def _error(exit_code: int, message: str) -> int:
    """Print the command's one `error:` line; returns `exit_code`."""
    console.print(f"[red]error:[/red] {escape(message)}")
    return exit_code


def _line(error: BaseException, last: bool = False) -> str:
    """The first (or last) line of an exception's message, for a one-line error."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1 if last else 0][:300]


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_job(build_parser(), argv)
        if args.dry_run:
            return Trainer(cfg, load_models=False).dry_run()
        if cfg.debug:
            cfg = apply_debug(cfg)
        # Scoped, not global: in-process callers (tests, notebooks) must not keep paying for anomaly detection.
        with torch.autograd.set_detect_anomaly(cfg.debug):
            return Trainer(cfg).train()
    except (ConfigError, DataError, CheckpointError) as error:
        return _error(2, str(error))
    except FloatingPointError as error:  # the run diverged (`gist_scale.trainer.optimizer.NonFiniteSteps`)
        return _error(1, str(error))
    except torch.OutOfMemoryError as error:
        return _error(1, f"out of memory ({_line(error)}): lower --train.batch_size (keep the global batch with "
                         "--train.global_batch_size), or encode in chunks (--train.chunk_size N, --train.grad_cache "
                         "true)")
    except RuntimeError as error:
        # A peer rank that died (gloo: connection reset/closed) or stalled past train.collective_timeout_s (timed
        # out) surfaces here on the surviving ranks: one clear line instead of a wall of tracebacks, and a non-zero
        # exit so the launcher ends the job. (NCCL's watchdog aborts the process itself, with its own message.)
        if not distributed.is_collective_failure(error):
            raise
        return _error(1, f"rank {distributed.rank()}: a collective failed: another rank died, or stalled longer "
                         f"than train.collective_timeout_s ({cfg.train.collective_timeout_s} s). The job stops here; "
                         "start it again with --resume auto to continue from the newest complete checkpoint. "
                         f"({_line(error, last=True)})")
