"""The data-path memory tool (`python -m gist_scale.tools.data_memory`) on a few hundred rows."""

from __future__ import annotations

import json
from pathlib import Path

from gist_scale.tools.data_memory import main, write_rows


def test_synthetic_rows_are_valid_triplets(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_rows(path, 25, tasks=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 25 and {r["task_name"] for r in rows} == {"task0", "task1", "task2", "task3"}
    assert [len(rows[3][c].split()) for c in ("query", "pos", "neg")] == [7, 16, 16]


def test_measures_every_phase_and_counts_one_epoch(tmp_path: Path, capsys) -> None:
    assert main(["--rows", "600", "--batch-size", "16", "--work-dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["phases"]) == ["load_validate", "tokenize", "sampler", "epoch"]
    # 8 tasks of 75 rows: 4 full batches of 16 each, the tails dropped.
    assert result["batches"] == 8 * (75 // 16)
    assert all(p["peak_anon_mb"] > 0 and p["cpu_s"] >= 0 for p in result["phases"].values())
    assert main(["--rows", "600", "--batch-size", "16", "--work-dir", str(tmp_path), "--no-tokenize"]) == 0
    assert list(json.loads(capsys.readouterr().out)["phases"]) == ["load_validate", "sampler", "epoch_plan"]


def test_streaming_measures_one_pass_of_streamed_batches(tmp_path: Path, capsys) -> None:
    assert main(["--rows", "600", "--batch-size", "16", "--work-dir", str(tmp_path), "--streaming"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["phases"]) == ["stream"] and result["batches"] == 600 // 16
    # At most 8 tasks x 15 rows wait in the buffers: the checkpoint state stays small.
    assert 0 < result["state_kb"] < 50
