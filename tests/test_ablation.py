"""The ablation's summariser (`gist_scale.tools.ablation`) on a folder laid out as `launch/ablation.sh` leaves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gist_scale.config import JobConfig, LossConfig
from gist_scale.metrics import METRICS
from gist_scale.tools.ablation import main, tables

MPNET = "/models/all-mpnet-base-v2"


def scores(folder: Path, in_domain: float, ood: float) -> None:
    """`gist-scale eval --out` files of both splits, every metric at the split's value."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, value in (("in_domain", in_domain), ("ood", ood)):
        (folder / f"{split}.json").write_text(json.dumps({"model": dict.fromkeys(METRICS, value), "baseline": None}))


def finished_run(run: Path, seed: int, in_domain: float, ood: float, guide: str | None, **loss: object) -> None:
    config = JobConfig(loss=LossConfig(**loss)).to_dict()
    config["guide"]["name"] = guide
    config["train"].update(seed=seed, output_dir=str(run))
    scores(run, in_domain, ood)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "wall.json").write_text(json.dumps({"train_s": 100, "eval_s": 20}))


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    scores(tmp_path / "models" / "all-MiniLM-L6-v2", 0.30, 0.50)
    scores(tmp_path / "models" / "all-mpnet-base-v2", 0.40, 0.60)
    for seed, (in_domain, ood) in enumerate([(0.32, 0.44), (0.34, 0.46)], 1):
        finished_run(tmp_path / "runs" / "01-infonce" / f"seed{seed}", seed, in_domain, ood, None)
    for seed, (in_domain, ood) in enumerate([(0.35, 0.51), (0.37, 0.53)], 1):
        finished_run(tmp_path / "runs" / "02-distill-mpnet" / f"seed{seed}", seed, in_domain, ood, MPNET,
                     distill_weight=10.0)
    (tmp_path / "runs" / "02-distill-mpnet" / "seed3").mkdir()  # still running: no wall.json, left out
    return tmp_path


def test_table_has_means_stds_and_deltas_read_from_the_runs(out_dir: Path) -> None:
    lines = tables(out_dir).splitlines()
    row: dict[str, str] = {}
    for line in lines:  # the headline table's row of each name (the metric tables come after it)
        if line.startswith("| "):
            row.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert row["all-MiniLM-L6-v2"] == "| all-MiniLM-L6-v2 | | base model, not trained | | 0.3000 | 0.5000 |  |  | | | |"
    assert "| 0.4000 | 0.6000 | +0.1000 | +0.1000 |" in row["all-mpnet-base-v2"]
    # InfoNCE: means 0.33 / 0.45, sample std 0.0141; vs base -0.05 out of distribution; no delta to itself.
    assert row["infonce"] == ("| infonce | none | InfoNCE | 1,2 | 0.3300 ± 0.0141 | 0.4500 ± 0.0141 | +0.0300 "
                              "| -0.0500 |  |  | 120 |")
    assert row["distill-mpnet"] == ("| distill-mpnet | all-mpnet-base-v2 | GIST mask + KL x10 at T 0.05 | 1,2 "
                                    "| 0.3600 ± 0.0141 | 0.5200 ± 0.0141 | +0.0600 | +0.0200 | +0.0300 | +0.0700 "
                                    "| 120 |")
    assert sum(line.startswith("| infonce |") for line in lines) == 3  # the headline and both metric tables


def test_runs_that_differ_beyond_their_arm_are_refused(out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = out_dir / "runs" / "02-distill-mpnet" / "seed2" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["optim"]["lr"] = 1e-4
    config_file.write_text(yaml.safe_dump(config))
    assert main([str(out_dir)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"ablation: {config_file.parent}: differs from ")
    assert error.endswith(" in optim.lr; every arm must share them\n")
