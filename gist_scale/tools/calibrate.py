"""`gist-scale calibrate`: what the guide would mask at each margin, on the global batches the run would train on.

    gist-scale calibrate --config my_run.yaml --guide.cache runs/guide-cache --margins 0,0.02,0.05 \\
        --margin-strategies absolute,relative --steps 32 --world-size 8 --json calibration.json

Nothing is trained and the student is not loaded (its tokenizer is: the duplicate rule compares the token ids the
student would see). With the run's options (`--config`, `--data.*`, `--guide.*`, `--loss.*`, `--train.*`), the
command builds what each of the run's ranks would read at `--world-size`, the same way training does: the same rows
and tokenization, the same sampler or stream seeded by `train.seed`, every global batch cut into the ranks'
micro-batches by `gist_scale.data.rank_micro_batches`, and each micro-batch collated (and, with a live guide,
padded and embedded) as that rank would. A micro-step's candidates are every rank's micro-batch, concatenated in
rank order: the global batch the loss gathers.

For each margin strategy and margin of the grid, the real `GISTLoss` is called on those candidates with the guide's
embeddings standing in for the student's (the mask reads only the guide's scores, the text identities and the
policy), so the counts are the mask training would apply, from the same code. Each batch keeps its source's
policy (`data.sources`: contrasted blocks, in-batch negatives, protected hard negatives), with the grid's margin
and strategy. Printed per setting: the masked share of the candidates the guide judged, per block and over all of
them, per source for a mixture, the negatives left per anchor after masking (mean and minimum) and the rows left
with none. `--json PATH` writes the same numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from rich import box
from rich.table import Table

from gist_scale import distributed, encode
from gist_scale.config import MARGIN_STRATEGIES, ConfigError, JobConfig
from gist_scale.data import (DataError, TripletCollator, build_dataloader, build_sampler, count_tokens, load_triplets,
                             tokenize_triplets)
from gist_scale.guide_cache import open_guide_cache
from gist_scale.loss import BLOCKS, GISTLoss, LossPolicy
from gist_scale.model import load_guide, load_tokenizer
from gist_scale.model.prompts import Prompts, load_task_instructions
from gist_scale.options import job_parser, parse_job
from gist_scale.plan import RunPlan, launched_world_size
from gist_scale.resume import ResumePlan
from gist_scale.trainer.batches import BatchSource, ChunkPlan, PreparedBatches, StreamedBatches
from gist_scale.trainer.console import console

__all__ = ["Calibration", "CalibrationRun", "Setting", "calibrate", "main", "parse_grid", "summary", "tables"]

DEFAULT_MARGINS = (0.0, 0.01, 0.02, 0.05, 0.1)
"""The margins tried unless `--margins` says otherwise (the configured `loss.margin` is always added)."""
DEFAULT_STEPS = 32
"""Global batches looked at unless `--steps` says otherwise (fewer when an epoch or the run is shorter)."""


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    margin_strategy: str
    margin: float


def parse_grid(margins: str | None, strategies: str, configured: Setting) -> list[Setting]:
    """The grid from `--margins` (comma-separated numbers; default `DEFAULT_MARGINS`) and `--margin-strategies`,
    strategy by strategy, margins increasing, the configured setting included."""
    try:
        values = DEFAULT_MARGINS if margins is None else tuple(float(m) for m in margins.split(","))
    except ValueError:
        raise ConfigError(f"--margins {margins}: expected comma-separated numbers, e.g. 0,0.01,0.05") from None
    names = [s.strip() for s in strategies.split(",")]
    for name in names:
        if name not in MARGIN_STRATEGIES:
            raise ConfigError(f"--margin-strategies {strategies}: {name!r} is not one of "
                              f"{', '.join(MARGIN_STRATEGIES)}")
    grid = {Setting(name, value) for name in names for value in values} | {configured}
    return sorted(grid, key=lambda s: (MARGIN_STRATEGIES.index(s.margin_strategy), s.margin))


@dataclass(frozen=True)
class Calibration:
    """What the mask does at one setting, over every row of the global batches looked at."""

    margin_strategy: str
    margin: float
    configured: bool
    """The loss section's own `margin_strategy` and `margin`."""
    masked: dict[str, float | None]
    """Per block (`qp`, `qn`, `qq`, `pp`), the share of the judged candidates the guide flagged; None for a block
    nothing was judged in (left out by the policy, or no hard negatives)."""
    masked_all: float
    """Flagged over judged, all blocks together (the denominator differs from the trainer's `masked_fraction`,
    which counts the candidates the duplicate rule removed too)."""
    masked_by_source: dict[str, float]
    """For a mixture, each source's flagged over judged, all blocks together."""
    negatives_left_mean: float
    negatives_left_min: int
    """Negatives left in an anchor's softmax after masking (candidates that are not its positives)."""
    rows_without_negatives: int
    rows: int


class _Counts:
    """One setting's running counts per source, on the device (read once, at the end)."""

    def __init__(self, sources: int, device: torch.device) -> None:
        self.flagged = torch.zeros(sources, len(BLOCKS), dtype=torch.float64, device=device)
        self.judged = torch.zeros_like(self.flagged)
        self.left: list[torch.Tensor] = []

    def add(self, source: int, flagged: torch.Tensor, judged: torch.Tensor, left: torch.Tensor) -> None:
        self.flagged[source] += flagged.double()
        self.judged[source] += judged.double()
        self.left.append(left)

    def result(self, setting: Setting, configured: Setting, source_names: Sequence[str]) -> Calibration:
        flagged, judged = self.flagged.sum(0).tolist(), self.judged.sum(0).tolist()
        left = torch.cat(self.left)
        per_source = zip(source_names, self.flagged.sum(1).tolist(), self.judged.sum(1).tolist())
        by_source = {name: f / j for name, f, j in per_source if j} if len(source_names) > 1 else {}
        return Calibration(
            margin_strategy=setting.margin_strategy, margin=setting.margin, configured=setting == configured,
            masked={block: f / j if j else None for block, f, j in zip(BLOCKS, flagged, judged)},
            masked_all=sum(flagged) / max(sum(judged), 1.0), masked_by_source=by_source,
            negatives_left_mean=float(left.mean()), negatives_left_min=int(left.min()),
            rows_without_negatives=int((left == 0).sum()), rows=left.numel())


@dataclass(frozen=True)
class CalibrationRun:
    """A calibration: what was looked at, and the result per setting."""

    guide: str
    guide_cache: str | None
    world_size: int
    grad_accum_steps: int
    global_batch: int
    steps: int
    rows: int
    seconds: float
    settings: list[Calibration]


def _rank_sources(cfg: JobConfig, world_size: int, live_guide: bool) -> list[BatchSource]:
    """Every rank's batch source at `world_size`, built as training builds it (one data load for all of them)."""
    plans = [RunPlan.create(cfg, world_size, rank) for rank in range(world_size)]
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    guide_tokenizer = (load_tokenizer(cfg.guide.name, cfg.guide.revision, cfg.guide.trust_remote_code,
                                      "--guide.trust_remote_code true") if live_guide else None)
    instructions = load_task_instructions(cfg.data.task_instructions)
    chunks = None if cfg.train.chunk_size is None else ChunkPlan(plans[0].per_device_batch, cfg.train.chunk_size)
    collator = TripletCollator(tokenizer, guide_tokenizer, cfg.data.pad_to_multiple_of, chunks=chunks)
    if cfg.data.streaming:  # a stream per rank, as training builds it (no checkpoint to resume)
        return [StreamedBatches.build(cfg, p, ResumePlan(cfg, p), collator, tokenizer, guide_tokenizer, instructions)
                for p in plans]
    dataset, report = load_triplets(cfg.data)
    guide_cache = None if live_guide else open_guide_cache(cfg.guide, dataset, report.num_negatives, instructions)
    dataset, truncation = tokenize_triplets(
        dataset, tokenizer, cfg.model.max_length, guide_tokenizer, cfg.guide.max_length, num_proc=cfg.data.num_proc,
        student_prompts=Prompts.from_config(cfg.model, instructions),
        guide_prompts=Prompts.from_config(cfg.guide, instructions))
    tokens = count_tokens(dataset, "student")
    samplers = [build_sampler(dataset, cfg.data, p.per_device_batch, world_size, p.rank, p.grad_accum_steps,
                              cfg.train.seed) for p in plans]
    if not live_guide:
        dataset, collator = guide_cache.attach(dataset, collator)
    return [PreparedBatches(build_dataloader(dataset, sampler, collator), sampler, report, truncation, tokens)
            for sampler in samplers]


def calibrate(cfg: JobConfig, grid: Sequence[Setting], world_size: int, steps: int | None,
              device: torch.device) -> CalibrationRun:
    """Count, for each setting of `grid`, what the guide masks on the first `steps` global batches (default: the
    smallest of `DEFAULT_STEPS`, an epoch and the run) that a run of `cfg` on `world_size` processes would train on."""
    if cfg.guide.name is None:
        raise ConfigError("calibrate needs a guide: set --guide.name (and --guide.cache to use its cached embeddings)")
    start = time.perf_counter()
    live_guide = cfg.guide.cache is None
    sources = _rank_sources(cfg, world_size, live_guide)
    plan = RunPlan.create(cfg, world_size)
    if steps is None:
        run_steps = plan.total_steps(sources[0].steps_per_epoch)
        steps = min(DEFAULT_STEPS, run_steps, sources[0].steps_per_epoch or run_steps)
    console.print(*sources[0].lines(), sep="\n")
    guide = load_guide(cfg.guide, device) if live_guide else None
    # The mask depends on the policy, the guide's scores and the text identities: the student's Matryoshka sizes
    # and the distillation term (which the guide's embeddings standing in for the student's would only slow) are off.
    loss_fn = GISTLoss(**{**asdict(cfg.loss), "matryoshka_dims": None, "matryoshka_weights": None,
                          "contrastive_weight": 1.0, "distill_weight": 0.0}, gather_across_ranks=False)
    policies = [LossPolicy.of(cfg.loss, source) for source in cfg.data.sources] or [LossPolicy.of(cfg.loss)]
    counts = {setting: _Counts(len(policies), device) for setting in grid}
    # The first `steps` global batches' micro-steps, each as every rank's micro-batch in rank order.
    for micro_batches in islice(zip(*sources), steps * plan.grad_accum_steps):
        micro_batches = [batch.to(device) for batch in micro_batches]
        first = micro_batches[0]
        k, source = first.num_negatives, first.source or 0
        # The guide's embeddings of each rank's micro-batch: embedded as that rank would, or from the cache.
        columns = [encode.embed_frozen(guide, batch.guide, k) if live_guide
                   else tuple(batch.guide_embeddings.get(name) for name in ("query", "pos", "neg"))
                   for batch in micro_batches]
        query, pos, neg = (None if columns[0][i] is None else torch.cat([c[i] for c in columns]) for i in range(3))
        text_ids = tuple(torch.cat([batch.text_ids[name] for batch in micro_batches]) if name in first.text_ids
                         else None for name in ("query", "pos", "neg"))
        # Several positives: the ranks' slot roles, concatenated like their rows.
        slot_roles = None if first.slot_roles is None else torch.cat([batch.slot_roles for batch in micro_batches])
        with torch.no_grad():
            for setting in grid:
                # The source's policy at the grid's margin and strategy.
                _, stats = loss_fn(query, pos, neg, query, pos, neg, text_ids=text_ids, slot_roles=slot_roles,
                                   policy=replace(policies[source], **asdict(setting)))
                counts[setting].add(source, stats.flagged_by_block, stats.judged_by_block, stats.negatives_left)
    configured = Setting(cfg.loss.margin_strategy, cfg.loss.margin)
    results = [counts[setting].result(setting, configured, sources[0].source_names) for setting in grid]
    return CalibrationRun(guide=cfg.guide.name, guide_cache=cfg.guide.cache, world_size=world_size,
                          grad_accum_steps=plan.grad_accum_steps, global_batch=plan.global_batch, steps=steps,
                          rows=results[0].rows, seconds=time.perf_counter() - start, settings=results)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def tables(run: CalibrationRun) -> list[Table]:
    """The printed tables, one per margin strategy: a row per margin, the configured one marked."""
    sources = list(run.settings[0].masked_by_source)
    views = []
    for strategy in dict.fromkeys(row.margin_strategy for row in run.settings):
        view = Table(title=f"{strategy} margin: masked share of the candidates the guide judged", box=box.SIMPLE_HEAD,
                     title_justify="left")
        for column in ("margin", *BLOCKS, "all", *sources, "negatives left", "no negative"):
            view.add_column(column, justify="right")
        for row in [row for row in run.settings if row.margin_strategy == strategy]:
            view.add_row(f"{'-> ' if row.configured else ''}{row.margin:g}",
                         *(_share(row.masked[block]) for block in BLOCKS), _share(row.masked_all),
                         *(_share(row.masked_by_source.get(name)) for name in sources),
                         f"{row.negatives_left_mean:.1f} (min {row.negatives_left_min})",
                         f"{row.rows_without_negatives:,} ({row.rows_without_negatives / max(row.rows, 1):.1%})",
                         style="bold" if row.configured else None)
        views.append(view)
    return views


def summary(run: CalibrationRun) -> str:
    """What the tables were counted on."""
    return (f"calibrate: guide {run.guide}{f' (cache {run.guide_cache})' if run.guide_cache else ''}, "
            f"{run.steps} global batches of {run.global_batch} at world size {run.world_size} "
            f"(grad_accum_steps {run.grad_accum_steps}), {run.rows:,} anchors, {run.seconds:.1f} s")


def build_parser() -> ArgumentParser:
    """`gist-scale calibrate`: the training config's options (the run to calibrate), and the grid's."""
    parser = job_parser("gist-scale calibrate", __doc__.split("\n\n")[0] + " Give it the run's options (--config, "
                        "--data.*, --guide.*, --loss.*, --train.*); nothing is trained and the student's weights are "
                        "not loaded. Seconds with --guide.cache.")
    parser.add_argument("--margins", help="comma-separated margins to try (default: "
                                          f"{','.join(f'{m:g}' for m in DEFAULT_MARGINS)}; loss.margin is added)")
    parser.add_argument("--margin-strategies", default=",".join(MARGIN_STRATEGIES),
                        help="comma-separated strategies to try (default %(default)s)")
    parser.add_argument("--steps", type=int, help=f"global batches to look at (default: {DEFAULT_STEPS}, or one epoch "
                                                   "or the whole run when shorter)")
    parser.add_argument("--world-size", type=int, help="processes the run will use: each micro-step contrasts every "
                                                       "rank's micro-batch (default: this launch's, 1 without one)")
    parser.add_argument("--json", metavar="PATH", help="also write the table's numbers as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_job(build_parser(), argv)
        world_size = launched_world_size() if args.world_size is None else args.world_size
        if world_size < 1:
            raise ConfigError(f"--world-size {world_size}: must be at least 1")
        if args.steps is not None and args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: must be at least 1")
        grid = parse_grid(args.margins, args.margin_strategies, Setting(cfg.loss.margin_strategy, cfg.loss.margin))
        # Under a launcher the main process calibrates alone (every rank would compute the same table).
        state = distributed.launch_state(cfg.train.collective_timeout_s)
        if state.is_main_process:
            run = calibrate(cfg, grid, world_size, args.steps, state.device)
            console.print(summary(run), *tables(run), sep="\n")
            if args.json is not None:
                Path(args.json).write_text(json.dumps(asdict(run), indent=2) + "\n")
        state.wait_for_everyone()
    except (ConfigError, DataError, OSError) as error:  # GuideCacheError is a ConfigError
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0
