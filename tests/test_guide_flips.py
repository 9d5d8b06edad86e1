"""The measured side of the exactness contract (`gist_scale.tools.guide_flips`): a guide's mask decisions across
two layouts (micro-batch sizes, so paddings differ) never change in fp32, and change in bf16 only for candidates
within bf16 rounding of their row's threshold."""

from __future__ import annotations

import json

import torch

from gist_scale.config import GuideConfig
from gist_scale.data import sample_data_path
from gist_scale.model import load_guide, load_tokenizer
from gist_scale.tools.guide_flips import global_batches, main, measure_flips

BF16_ROUNDING = 2.0 ** -7  # two bf16 ulps at 1.0: the most a cosine of bf16 embeddings moves with the padding


def _batches(rows: int = 256, size: int = 16):
    lines = sample_data_path("train").read_text().splitlines()[:rows]
    return global_batches([json.loads(line) for line in lines], size)[:4]  # bf16 on a CPU is slow: 4 batches


def test_fp32_never_flips_and_bf16_flips_only_near_the_threshold(tiny_model_dir):
    batches = _batches()
    assert len(batches) == 4 and all(len({r["task_name"] for r in b}) == 1 for b in batches)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    reports = {dtype: measure_flips(load_guide(GuideConfig(name=str(tiny_model_dir), dtype=dtype),
                                               torch.device("cpu")), tokenizer, batches, (8, 4))
               for dtype in ("fp32", "bf16")}
    assert reports["fp32"].flips == 0 and reports["fp32"].candidates == reports["bf16"].candidates > 3_000
    assert reports["bf16"].max_gap <= BF16_ROUNDING


def test_the_command_prints_the_rate(tiny_model_dir, capsys):
    assert main(["--guide.name", str(tiny_model_dir), "--guide.dtype", "fp32", "--rows", "64", "--global-batch", "8",
                 "--micro-batches", "8", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("guide fp32, micro-batches 8 vs 3: 0 of ") and "(0.00e+00)" in out


def test_bad_input_is_one_line_naming_the_file_and_row(tmp_path, capsys):
    import pytest

    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"query": "q", "pos": "p", "neg": "n", "task_name": "t"}\n{"query": "q"}\n')
    for argv, message in (([], f"{bad}:2: not a JSON object with query, pos, neg and task_name"),
                          (["--data.path", str(tmp_path / "none.jsonl")], "none.jsonl: no such file")):
        with pytest.raises(SystemExit) as exit_:
            main(["--data.path", str(bad), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
