"""The guide's policy per source, several positives and distillation in real training runs: the trainer gives each
step its source's policy and slot roles, and logs the masked share per block and per source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gist_scale.data import sample_data_path
from gist_scale.loss import BLOCKS
from gist_scale.options import load_config
from gist_scale.tools.calibrate import Setting, calibrate
from gist_scale.train import main


def _sources(tmp_path: Path, margins: bool = True) -> str:
    """Two sources of real WordNet rows: `guided`, whose rows hold 1 to 3 positives (the row's own, then other rows'
    example sentences) and whose margin lets the guide flag nearly everything; `unguided`, whose margin no cosine
    reaches and whose rows see no in-batch negatives. `margins=False`: both keep the loss section's margin."""
    rows = [json.loads(line) for line in sample_data_path("train").read_text().splitlines()[:96]]
    guided = [{**row, "pos": [row["pos"], *(rows[(i + j) % 48]["pos"] for j in range(1, 1 + i % 3))]}
              for i, row in enumerate(rows[:48])]
    (tmp_path / "guided.jsonl").write_text("".join(json.dumps(row) + "\n" for row in guided))
    (tmp_path / "unguided.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[48:]))
    guided_margin, unguided_margin = (", margin: 1.0", ", margin: -2.5") if margins else ("", "")
    return (f"[{{path: {tmp_path / 'guided.jsonl'}, weight: 1, num_positives: 3{guided_margin}}}, "
            f"{{path: {tmp_path / 'unguided.jsonl'}, weight: 1, in_batch_negatives: false{unguided_margin}}}]")


def test_each_source_trains_under_its_own_policy_and_is_logged_apart(tmp_path, tiny_model_dir):
    """With distillation and relabel on too: the run trains through every new path of the loss (the plain policies'
    run is the calibrate test's below)."""
    run = tmp_path / "run"
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir),
                 "--data.sources", _sources(tmp_path), "--train.batch_size", "4", "--train.max_steps", "8",
                 "--train.log_every", "1", "--train.output_dir", str(run), "--loss.distill_weight", "1.0",
                 "--loss.false_negatives", "relabel"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    guided = [r["masked_fraction/source/guided"] for r in train if "masked_fraction/source/guided" in r]
    unguided = [r["masked_fraction/source/unguided"] for r in train if "masked_fraction/source/unguided" in r]
    assert guided and unguided  # both sources were drawn
    assert min(guided) > 0.5  # a margin of 1 flags most of what the guide judges
    assert max(unguided) == 0.0  # a margin no cosine reaches flags nothing
    # A step draws one source: its record has that source's share only, and the per-block shares beside it.
    assert all(("masked_fraction/source/guided" in r) != ("masked_fraction/source/unguided" in r) for r in train)
    # Without in-batch negatives a row's only judged candidates are its own hard negatives: no other block is judged.
    for r in train:
        blocks = {b for b in ("qp", "qn", "qq", "pp") if f"masked_fraction/{b}" in r}
        assert blocks == ({"qp", "qn", "qq", "pp"} if "masked_fraction/source/guided" in r else {"qn"})


def test_calibrate_counts_what_training_masks_with_several_positives(tmp_path, tiny_model_dir):
    """`gist-scale calibrate` on the same run (several positives, a policy per source) gives the per-block shares the
    run logged over the same steps (calibrate's grid sets every source's margin: the sources leave theirs unset)."""
    options = ["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--guide.dtype", "fp32",
               "--data.sources", _sources(tmp_path, margins=False), "--train.batch_size", "4", "--train.max_steps", "6",
               "--loss.margin", "0.02"]
    run = tmp_path / "run"
    assert main([*options, "--train.log_every", "6", "--train.output_dir", str(run)]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in logged if "loss" in r)
    result = calibrate(load_config(options), [Setting("absolute", 0.02)], world_size=1, steps=None,
                       device=torch.device("cpu"))
    shares = result.settings[0].masked
    assert {b: shares[b] for b in BLOCKS if shares[b] is not None} == {
        b: pytest.approx(logged[f"masked_fraction/{b}"], abs=1e-12) for b in BLOCKS if f"masked_fraction/{b}" in logged}
    for name in ("guided", "unguided"):
        key = f"masked_fraction/source/{name}"
        if key in logged:
            assert result.settings[0].masked_by_source[name] == pytest.approx(logged[key], abs=1e-12)
