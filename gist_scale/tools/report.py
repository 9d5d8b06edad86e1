"""`gist-scale report RUN_DIR`: one PNG of a run's curves from its `metrics.jsonl`.

Panels, each against the optimizer step: loss, learning rate, masked share (the share of in-batch candidates
the guide flagged as false negatives: overall, and per block `masked_fraction/qp`, `/qn`, `/qq`, `/pp` when the run
logged them), throughput (triplets/s and tokens/s), gradient norm, and the eval metrics (`eval/ndcg@10`, ...) when
the run logged any. A Matryoshka run (`loss.matryoshka_dims`), whose evaluations hold every metric at each size
(`eval/ndcg@10@256`), gets one more panel: quality against embedding dimension, for the first and the last
evaluation. A mixture (`data.sources`) gets a last column: each source's realised share of the global batches (its
`source/NAME/batches` records) against the requested one (`mixture.json`), and each source's masked share over the
steps (`masked_fraction/source/NAME`). The command also prints a text summary of the same records
(`summary_lines`). matplotlib is an optional extra (`pip install 'gist-scale[report]'`), imported only here, and
drawn with the non-interactive Agg backend so the command works on headless nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from gist_scale.config import METRICS_FILE, MIXTURE_FILE

__all__ = ["MatplotlibMissing", "dimension_curves", "masked_share_keys", "read_metrics", "plot_run", "summary_lines",
           "main"]

EVAL_PREFIX = "eval/"
MASKED = "masked_fraction"
SOURCE_MASKED = f"{MASKED}/source/"


class MatplotlibMissing(ImportError):
    """matplotlib, the optional plotting dependency, is not installed."""


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training records and eval records of a `metrics.jsonl`, each sorted by step, one record per step.

    A run resumed from a checkpoint logs the steps after that checkpoint again; the later record of a step wins,
    so the curves show the run that actually continued. A truncated last line (the run is still writing) is
    skipped; any other malformed line is an error naming the line.
    """
    lines = Path(path).read_text().splitlines()
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        if any(key.startswith(EVAL_PREFIX) for key in record):
            evals.setdefault(record["step"], {}).update(record)
        else:
            train[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def dimension_curves(record: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per metric, `(dimension, value)` pairs by increasing dimension, from an eval record's `eval/METRIC@D` keys.

    A key is a per-dimension one when it ends in `@D` and `eval/METRIC` is in the record too; that tells
    `ndcg@10@256` (ndcg@10 at 256) from `ndcg@10` (a metric of its own) and keeps `spearman@256`.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in record.items():
        base, _, suffix = key.rpartition("@")
        if key.startswith(EVAL_PREFIX) and suffix.isdigit() and base in record:
            curves.setdefault(base.removeprefix(EVAL_PREFIX), []).append((int(suffix), float(value)))
    return {metric: sorted(points) for metric, points in curves.items()}


def masked_share_keys(records: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The per-block keys (`masked_fraction/qp`, ...) and the per-source keys (`masked_fraction/source/NAME`) the
    records hold, each in the order the run first logged them (the trainer logs the blocks in the loss's order)."""
    keys = dict.fromkeys(key for record in records for key in record if key.startswith(f"{MASKED}/"))
    sources = [key for key in keys if key.startswith(SOURCE_MASKED)]
    return [key for key in keys if key not in sources], sources


def summary_lines(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[str]:
    """The run in a few lines: the steps logged, the loss, the guide's masked share (overall, per block, per source:
    mean over the logged windows, and the last one) and the last evaluation."""
    lines = []
    steps, losses = _series(train, "loss")
    if steps:
        lines.append(f"steps {steps[0]}..{steps[-1]} ({len(steps)} logged): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    blocks, sources = masked_share_keys(train)

    def share(key: str, prefix: str) -> str:
        # A window without a source's batches may log no finite share for it.
        finite = [v for v in _series(train, key)[1] if math.isfinite(v)] or [math.nan]
        return f"{key.removeprefix(prefix)} {statistics.fmean(finite):.1%} (last {finite[-1]:.1%})"

    if _series(train, MASKED)[0]:
        lines.append(f"masked share (guide-flagged candidates, mean of the logged windows): {share(MASKED, '')}")
    if blocks:
        lines.append(f"  per block: {', '.join(share(key, f'{MASKED}/') for key in blocks)}")
    if sources:
        lines.append(f"  per source: {', '.join(share(key, SOURCE_MASKED) for key in sources)}")
    if evals:
        last = evals[-1]
        metrics = ", ".join(f"{key.removeprefix(EVAL_PREFIX)} {float(last[key]):.4f}"
                            for key in _full_dimension_keys([last]) if isinstance(last[key], (int, float)))
        lines.append(f"eval at step {last['step']}: {metrics}")
    return lines


def _full_dimension_keys(evals: list[dict[str, Any]]) -> list[str]:
    """The eval metrics at the full dimension, sorted: the per-dimension keys of a Matryoshka run (`ndcg@10@256`)
    left out."""
    per_dimension = {f"{EVAL_PREFIX}{metric}@{dim}" for r in evals for metric, points in dimension_curves(r).items()
                     for dim, _ in points}
    return sorted({k for r in evals for k in r if k.startswith(EVAL_PREFIX)} - per_dimension)


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _title(run_dir: Path) -> str:
    """The run directory, plus the student and guide from its config.yaml when it is readable."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        model = config["model"]["name"]
        guide = config.get("guide", {}).get("name") or "none"
        return f"{run_dir.name}: {model} (guide {guide})"
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return run_dir.name


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw `RUN_DIR/metrics.jsonl` into `out` (default `RUN_DIR/report.png`) and return its path.

    Raises `FileNotFoundError` without a metrics file, `ValueError` when it holds no records, and
    `MatplotlibMissing` without matplotlib.
    """
    run = Path(run_dir)
    metrics_path = run / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no such file; is {run} a gist-scale run directory "
                                "(train.output_dir)?")
    train, evals = read_metrics(metrics_path)
    if not train and not evals:
        raise ValueError(f"{metrics_path}: no records yet (the first is written at step train.log_every)")
    try:
        import matplotlib
    except ImportError as error:
        raise MatplotlibMissing("gist-scale report needs matplotlib, an optional extra: "
                                "pip install 'gist-scale[report]' (or pip install matplotlib)") from error
    matplotlib.use("Agg")  # no display on cluster nodes; must precede importing pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Markers make short runs (a handful of logged steps) readable; long runs are drawn as plain lines.
    style = {"marker": "o", "markersize": 3} if len(train) < 50 else {}
    mixture_path = run / MIXTURE_FILE
    mixture = json.loads(mixture_path.read_text()) if mixture_path.is_file() else None
    # One shared step axis, so eval points line up with the training curves; a Matryoshka run adds a column whose
    # axis is the embedding dimension instead, a mixture one for its shares of the batches and its masked shares.
    by_dimension = [(r["step"], dimension_curves(r)) for r in (evals[:1] + evals[1:][-1:])]
    by_dimension = [(step, curves) for step, curves in by_dimension if curves]
    blocks, sources = masked_share_keys(train)
    columns = 3 + bool(by_dimension) + bool(mixture or sources)
    figure, all_axes = plt.subplots(2, columns, figsize=(5 * columns, 8), constrained_layout=True, squeeze=False)
    axes = all_axes[:, :3]
    for ax in axes.flat[1:]:
        ax.sharex(axes[0, 0])
    figure.suptitle(_title(run))
    panels = {(0, 0): ("loss", "loss"), (0, 1): ("lr", "learning rate"),
              (1, 1): ("grad_norm", "gradient norm (before clipping)")}
    for position, (key, title) in panels.items():
        _plot_lines(axes[position], train, [key], "", title, style)
    axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _plot_masked(axes[0, 2], train, [MASKED, *blocks], f"{MASKED}/",
                 f"masked share{' per block' if blocks else ''} (guide-flagged false negatives)", style)

    # Throughput: two units on twin axes, so both curves keep a readable scale.
    axes[1, 0].set_title("throughput")
    for ax, unit, color in ((axes[1, 0], "triplets", "tab:blue"), (axes[1, 0].twinx(), "tokens", "tab:orange")):
        ax.plot(*_series(train, f"{unit}_per_s"), color=color, label=f"{unit}/s", **style)
        ax.set_ylabel(f"{unit}/s", color=color)

    # The per-dimension keys have their own panel; this one keeps the full-dimension metrics readable.
    _plot_lines(axes[1, 2], evals, _full_dimension_keys(evals), EVAL_PREFIX, "eval", {"marker": "o", "markersize": 3},
                "no eval records\n(set eval.every, or wait for the end of training)")
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared: the step axes have one ticker
    for ax in axes[-1]:  # the step axis is shared: label it once, under the bottom row
        ax.set_xlabel("step")
    if by_dimension:
        _plot_dimensions(all_axes[0, 3], by_dimension)
        all_axes[1, 3].axis("off")
    if mixture or sources:
        # The mixture's column, the last: its shares of the batches on top, each source's masked share over the steps
        # under them.
        top, bottom = all_axes[:, -1]
        if mixture:
            _plot_mixture(top, mixture, train)
        else:
            top.remove()
        if sources:
            bottom.sharex(axes[0, 0])
            _plot_masked(bottom, train, sources, SOURCE_MASKED, "masked share per source", style)
            bottom.set_xlabel("step")
        else:
            bottom.remove()
    for ax in all_axes.flat:
        ax.grid(alpha=0.3)

    target = Path(out) if out is not None else run / "report.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def _plot_lines(ax, records: list[dict[str, Any]], keys: list[str], prefix: str, title: str, style: dict[str, Any],
                empty: str | None = None) -> bool:
    """One line per key the records hold, against the step, labelled without `prefix` (the overall masked share
    `masked_fraction` solid and black, the parts in colour), a legend when there are several; where the records hold
    none of the keys, `empty` (default: no 'KEY' records) instead. Whether a line was drawn."""
    ax.set_title(title)
    every = [(key, *_series(records, key)) for key in keys]
    drawn = [(key, steps, values) for key, steps, values in every if steps]  # the keys the run logged
    for key, steps, values in drawn:
        overall = key == MASKED
        ax.plot(steps, values, label="all blocks" if overall else key.removeprefix(prefix),
                **({"color": "black", "linewidth": 2} if overall else {}), **style)
    if len(drawn) > 1:
        ax.legend(fontsize="small")
    if not drawn:
        ax.text(0.5, 0.5, empty or f"no '{keys[0]}' records", ha="center", va="center", transform=ax.transAxes)
    return bool(drawn)


def _plot_masked(ax, train: list[dict[str, Any]], keys: list[str], prefix: str, title: str,
                 style: dict[str, Any]) -> None:
    """`_plot_lines` for masked shares, the y axis in percent of the candidates the guide judged."""
    from matplotlib.ticker import PercentFormatter

    if _plot_lines(ax, train, keys, prefix, title, style):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _plot_mixture(ax, mixture: dict[str, dict[str, Any]], train: list[dict[str, Any]]) -> None:
    """Bars: each source's requested share of the global batches next to its realised share so far."""
    names = list(mixture)
    batches = [sum(float(r.get(f"source/{name}/batches", 0.0)) for r in train) for name in names]
    total = sum(batches) or 1.0
    positions = range(len(names))
    ax.barh([p + 0.2 for p in positions], [mixture[n]["requested"] for n in names], height=0.4, label="requested")
    ax.barh([p - 0.2 for p in positions], [b / total for b in batches], height=0.4,
            label=f"realised ({sum(batches):.0f} batches)")
    ax.set_yticks(list(positions), names, fontsize="small")
    ax.invert_yaxis()
    ax.set(title="mixture: requested vs realised", xlabel="share of global batches")
    ax.legend(fontsize="small")


def _plot_dimensions(ax, by_dimension: list[tuple[int, dict[str, list[tuple[int, float]]]]]) -> None:
    """Quality against embedding dimension (log scale): solid for the last evaluation, dashed for the first."""
    ax.set(title="eval against embedding dimension (Matryoshka)", xlabel="embedding dimension (truncate_dim)")
    colors = {}
    for index, (step, curves) in enumerate(reversed(by_dimension)):
        for metric, points in curves.items():
            color = colors.setdefault(metric, f"C{len(colors)}")
            ax.plot([d for d, _ in points], [v for _, v in points], marker="o", markersize=3, color=color,
                    linestyle="-" if index == 0 else "--", label=f"{metric} (step {step})")
    dims = sorted({d for _, curves in by_dimension for pts in curves.values() for d, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.legend(fontsize="x-small")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gist-scale report", description="Plot a run's metrics.jsonl (loss, lr, "
                                     "masked fraction, throughput, grad norm, eval metrics against step) into one PNG. "
                                     "Needs matplotlib: pip install 'gist-scale[report]'.")
    parser.add_argument("run_dir", help="the run directory (train.output_dir), holding metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/report.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except (MatplotlibMissing, FileNotFoundError, ValueError) as error:
        print(f"gist-scale report: error: {error}", file=sys.stderr)
        return 2
    print(f"report written to {path.resolve()}", *summary_lines(*read_metrics(Path(args.run_dir) / METRICS_FILE)),
          sep="\n")
    return 0
