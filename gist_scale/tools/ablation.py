"""The table of `launch/ablation.sh` (docs/ablation.md): each arm's held-out scores, mean and std over seeds.

    python -m gist_scale.tools.ablation OUT_DIR

`launch/ablation.sh` leaves, under OUT_DIR,

- `models/NAME/{in_domain,ood}.json`: untrained models scored by `gist-scale eval --out` (the student's base model,
  and the stronger guide for reference);
- `runs/NN-ARM/seedS/`: one training run per arm and seed (`NN-` orders the arms), with the run's `config.yaml`,
  `in_domain.json` and `ood.json` (`gist-scale eval --out` of its `final/` model) and `wall.json` (seconds, written
  last: runs without it are unfinished and left out, so the table of a matrix still running shows what is done).

Each arm's guide and loss are read back from the runs' `config.yaml`, not from the arm's name, and runs that differ
in anything but the arm's own options (data, steps, batch, learning rate...) are refused: the table then compares
like with like. "vs base" is the arm's mean minus the student's base model (the `models/` entry named like
`model.name`), "vs InfoNCE" minus the mean of the arm trained without a guide.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from gist_scale.metrics import METRICS

SPLITS = ("in_domain", "ood")
ARM_OPTIONS = ("guide.", "loss.false_negatives", "loss.contrastive_weight", "loss.distill_weight",
               "loss.distill_temperature", "train.seed", "train.output_dir")
"""Config entries an arm or a seed may set; every other one must be the same in all runs."""
HEADLINE = "ndcg@10"


@dataclass(frozen=True)
class Arm:
    """The runs of one arm: their scores per split and metric, one value per seed."""

    name: str
    guide: str
    loss: str
    seeds: list[int]
    scores: dict[str, dict[str, list[float]]]
    wall_s: list[float]

    def mean(self, split: str, metric: str = HEADLINE) -> float:
        return statistics.fmean(self.scores[split][metric])

    def cell(self, split: str, metric: str = HEADLINE) -> str:
        values = self.scores[split][metric]
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.4f}{spread}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _scores(folder: Path) -> dict[str, dict[str, float]]:
    """`gist-scale eval --out` files of both splits in `folder`: split -> metric -> value."""
    return {split: _read_json(folder / f"{split}.json")["model"] for split in SPLITS}


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        flat.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def _loss(config: dict) -> str:
    """The loss options that differ between the arms, as they were run."""
    loss = config["loss"]
    if config["guide"]["name"] is None:
        return "InfoNCE"
    weight = loss["contrastive_weight"]
    parts = [f"GIST {loss['false_negatives']}" + (f" x{weight:g}" if weight != 1 else "")] if weight else []
    if loss["distill_weight"] > 0:
        parts.append(f"KL x{loss['distill_weight']:g} at T {loss['distill_temperature']:g}")
    return " + ".join(parts)


def load_arms(out_dir: Path) -> list[Arm]:
    """Every arm under `out_dir/runs/`, in the order of their `NN-` prefixes; raises `ValueError` on a missing file
    or on runs that differ in more than their arm's options."""
    arms, shared, first = [], None, None
    for arm_dir in sorted(p for p in (out_dir / "runs").iterdir() if p.is_dir()):
        runs = sorted(p.parent for p in arm_dir.glob("*/wall.json"))
        if not runs:
            continue
        configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in runs]
        for run, config in zip(runs, configs):
            fixed = {k: v for k, v in _flat(config).items() if not k.startswith(ARM_OPTIONS)}
            if shared is None:
                shared, first = fixed, run
            differ = sorted(k for k in shared.keys() | fixed.keys() if shared.get(k) != fixed.get(k))
            if differ:
                raise ValueError(f"{run}: differs from {first} in {', '.join(differ)}; every arm must share them")
            if (_loss(config), config["guide"]) != (_loss(configs[0]), configs[0]["guide"]):
                raise ValueError(f"{run}: another guide or loss than {runs[0]} of the same arm")
        per_run = [_scores(run) for run in runs]
        scores = {split: {m: [s[split][m] for s in per_run] for m in per_run[0][split]} for split in SPLITS}
        wall = [sum(_read_json(run / "wall.json").values()) for run in runs]
        # The guide by its folder's name ("none": trained without a guide).
        arms.append(Arm(arm_dir.name.split("-", 1)[-1], Path(configs[0]["guide"]["name"] or "none").name,
                        _loss(configs[0]), [c["train"]["seed"] for c in configs], scores, wall))
    if not arms:
        raise ValueError(f"{out_dir / 'runs'}: no finished runs")
    return arms


def _delta(value: float, reference: float | None) -> str:
    return "" if reference is None else f"{value - reference:+.4f}"


def tables(out_dir: Path) -> str:
    """The ablation as Markdown: the headline table, then every metric per split."""
    arms = load_arms(out_dir)
    models = {p.name: _scores(p) for p in sorted((out_dir / "models").iterdir()) if p.is_dir()}
    config = yaml.safe_load(next((out_dir / "runs").glob("*/*/config.yaml")).read_text())
    student = Path(config["model"]["name"]).name
    if student not in models:
        raise ValueError(f"{out_dir / 'models'}: no scores of the base model {student} (models/{student}/)")
    base = models[student]
    infonce = next((a for a in arms if a.guide == "none"), None)
    lines = ["nDCG@10, mean ± sample std over the seeds; deltas are of the means.", "",
             "| arm | guide | loss | seeds | in-domain nDCG@10 | OOD nDCG@10 | in-domain vs base | OOD vs base "
             "| in-domain vs InfoNCE | OOD vs InfoNCE | wall s per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, scores in models.items():
        role, reference = ("base model, not trained", None) if name == student else ("not trained (reference)", base)
        lines.append(f"| {name} | | {role} | | {scores['in_domain'][HEADLINE]:.4f} | {scores['ood'][HEADLINE]:.4f} "
                     + "".join(f"| {_delta(scores[s][HEADLINE], reference and reference[s][HEADLINE])} "
                               for s in SPLITS) + "| | | |")
    for arm in arms:
        vs_base = [_delta(arm.mean(s), base[s][HEADLINE]) for s in SPLITS]
        vs_infonce = [_delta(arm.mean(s), None if infonce is None or arm is infonce else infonce.mean(s))
                      for s in SPLITS]
        lines.append(f"| {arm.name} | {arm.guide} | {arm.loss} | {','.join(map(str, arm.seeds))} "
                     f"| {arm.cell('in_domain')} | {arm.cell('ood')} | {vs_base[0]} | {vs_base[1]} | {vs_infonce[0]} "
                     f"| {vs_infonce[1]} | {statistics.fmean(arm.wall_s):.0f} |")
    for split, title in (("in_domain", "in-domain (eval.jsonl)"), ("ood", "out-of-distribution (ood.jsonl)")):
        metrics = [m for m in METRICS if m in base[split]]
        lines += ["", f"Every metric, {title}, mean ± sample std:", "",
                  "| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {name} | " + " | ".join(f"{scores[split][m]:.4f}" for m in metrics) + " |"
                  for name, scores in models.items()]
        lines += [f"| {arm.name} | " + " | ".join(arm.cell(split, m) for m in metrics) + " |" for arm in arms]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gist_scale.tools.ablation",
                                     description="Print the table of launch/ablation.sh's runs (Markdown).")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the OUT_DIR given to launch/ablation.sh")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(tables(args.out_dir), end="")
    except (OSError, ValueError) as error:
        print(f"ablation: {error}", file=sys.stderr)
        return 1
    except KeyError as error:  # a config.yaml or eval file of another shape than gist-scale writes
        print(f"ablation: {args.out_dir}: a run's config.yaml or eval JSON lacks {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
