"""`gist-scale report`: a PNG from a real training run's metrics.jsonl, with and without eval records; the masked
shares per block and per source from a hand-written one."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gist_scale.tools.report import dimension_curves, main, masked_share_keys, plot_run, read_metrics, summary_lines

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_KEYS = {"step", "epoch", "loss", "lr", "masked_fraction", "candidates_per_anchor", "triplets_per_s",
              "tokens_per_s", "grad_norm"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Path]:
    """A real 4-step run on the shipped sample (the tiny BERT guiding itself: the report needs a run's records,
    not a good model), logged at every step and evaluated before and after."""
    from gist_scale.train import main as train

    root = tmp_path_factory.mktemp("report")
    # `datasets`' cache is already redirected into the test's temporary directory (conftest's autouse `hf_cache`).
    assert train(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--train.max_steps", "4",
                  "--train.log_every", "1", "--train.output_dir", str(root / "run"), "--train.batch_size", "8"]) == 0
    yield root / "run"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"


def test_report_from_a_real_run(run_dir: Path, capsys: pytest.CaptureFixture[str]):
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    # Training on the shipped sample evaluates the starting model (step 0) and the final one.
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 4]
    assert TRAIN_KEYS <= set(train[0])

    assert main([str(run_dir)]) == 0
    png = run_dir / "report.png"
    _assert_png(png)
    assert str(png.resolve()) in capsys.readouterr().out


def test_report_with_eval_records_resumed_steps_and_a_partial_line(run_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("final", "report.png"))
    records = run / "metrics.jsonl"
    lines = [line for line in records.read_text().splitlines() if '"loss"' in line]  # the training records
    evals = [{"step": step, "eval/ndcg@10": 0.30 + step / 100, "eval/mrr@10": 0.25 + step / 100,
              "eval/recall@1": 0.20 + step / 100, "eval/recall@10": 0.45 + step / 100} for step in (2, 4)]
    resumed = dict(json.loads(lines[-1]), loss=0.123)  # a resumed run logs step 4 again: the later one wins
    records.write_text("\n".join([*lines, *map(json.dumps, evals), json.dumps(resumed)]) + '\n{"step": 5, "lo')
    train, parsed_evals = read_metrics(records)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[-1]["loss"] == 0.123
    assert [r["step"] for r in parsed_evals] == [2, 4] and parsed_evals[1]["eval/ndcg@10"] == pytest.approx(0.34)

    out = plot_run(run, tmp_path / "pictures" / "custom.png")
    assert out == tmp_path / "pictures" / "custom.png"
    _assert_png(out)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_matryoshka_run_gets_a_quality_against_dimension_panel(run_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("final", "report.png"))
    records = run / "metrics.jsonl"
    evals = [{"step": step, "eval/ndcg@10": 0.4 + step / 100, "eval/spearman": 0.7,
              **{f"eval/ndcg@10@{d}": 0.4 + step / 100 - 0.1 / d for d in (384, 128, 64)},
              **{f"eval/spearman@{d}": 0.7 - 1 / d for d in (384, 128, 64)}} for step in (0, 2, 4)]
    lines = [line for line in records.read_text().splitlines() if '"loss"' in line]
    records.write_text("\n".join([*lines, *map(json.dumps, evals)]) + "\n")
    assert dimension_curves(evals[2]) == {
        "ndcg@10": [(64, pytest.approx(0.44 - 0.1 / 64)), (128, pytest.approx(0.44 - 0.1 / 128)),
                    (384, pytest.approx(0.44 - 0.1 / 384))],
        "spearman": [(64, 0.7 - 1 / 64), (128, 0.7 - 1 / 128), (384, 0.7 - 1 / 384)]}
    assert dimension_curves({"step": 4, "eval/ndcg@10": 0.5, "eval/recall@1": 0.3}) == {}

    plain = plot_run(run_dir, tmp_path / "plain.png")
    matryoshka = plot_run(run)
    _assert_png(matryoshka)
    # One more column of panels (5 inches at 100 dpi each) than the plain run's report.
    assert _png_size(matryoshka)[0] == _png_size(plain)[0] + 500


def test_report_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main([str(tmp_path)]) == 2
    assert "pip install 'gist-scale[report]'" in capsys.readouterr().err


def _mask_run(run: Path) -> list[dict]:
    """A hand-written mixture run: per-block and per-source masked shares at 4 log steps (source `pairs` had no
    batch in the window of step 3, so that record has no share for it), an eval at step 4."""
    blocks = {"qp": 0.01, "qn": 0.30, "qq": 0.02, "pp": 0.05}
    records = []
    for step in (1, 2, 3, 4):
        record = {"step": step, "loss": 2.0 - step / 10, "lr": 1e-5, "masked_fraction": 0.1 + step / 100,
                  **{f"masked_fraction/{b}": share + step / 100 for b, share in blocks.items()},
                  "masked_fraction/source/wordnet": 0.2 + step / 100, "source/wordnet/batches": 2}
        if step != 3:
            record.update({"masked_fraction/source/pairs": 0.05 * step, "source/pairs/batches": 1})
        records.append(record)
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, [
        *records, {"step": 4, "eval/ndcg@10": 0.41, "eval/mrr@10": 0.35}])) + "\n")
    (run / "mixture.json").write_text(json.dumps({"wordnet": {"requested": 0.6}, "pairs": {"requested": 0.4}}))
    return records


def test_masked_shares_per_block_and_per_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gist_scale.tools import report

    run = tmp_path / "run"
    records = _mask_run(run)
    train, evals = read_metrics(run / "metrics.jsonl")
    blocks, sources = masked_share_keys(train)
    assert blocks == [f"masked_fraction/{b}" for b in ("qp", "qn", "qq", "pp")]  # the order the run logged
    assert sources == ["masked_fraction/source/wordnet", "masked_fraction/source/pairs"]

    # The panels: one line per block beside the overall share; per source, only the steps that logged it.
    figure, (by_block, by_source) = plt.subplots(1, 2)
    report._plot_masked(by_block, train, ["masked_fraction", *blocks], "masked_fraction/", "t", {})
    report._plot_masked(by_source, train, sources, "masked_fraction/source/", "t", {})
    lines = {line.get_label(): line for line in by_block.get_lines()}
    assert list(lines) == ["all blocks", "qp", "qn", "qq", "pp"]
    assert list(lines["qn"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["qn"].get_ydata()) == pytest.approx([r["masked_fraction/qn"] for r in records])
    pairs = next(line for line in by_source.get_lines() if line.get_label() == "pairs")
    assert list(pairs.get_xdata()) == [1, 2, 4] and list(pairs.get_ydata()) == pytest.approx([0.05, 0.1, 0.2])
    plt.close(figure)

    # The picture: the mixture's column (4 columns) holds the per-source panel under the requested/realised bars.
    assert main([str(run)]) == 0
    _assert_png(run / "report.png")
    assert _png_size(run / "report.png")[0] == 4 * 500
    out = capsys.readouterr().out
    assert "steps 1..4 (4 logged): loss 1.9000 -> 1.6000" in out
    assert "masked share (guide-flagged candidates, mean of the logged windows): masked_fraction 12.5% (last 14.0%)" \
        in out
    assert "  per block: qp 3.5% (last 5.0%), qn 32.5% (last 34.0%), qq 4.5% (last 6.0%), pp 7.5% (last 9.0%)" in out
    assert "  per source: wordnet 22.5% (last 24.0%), pairs 11.7% (last 20.0%)" in out
    assert "eval at step 4: mrr@10 0.3500, ndcg@10 0.4100" in out


def test_a_run_without_block_shares_keeps_its_picture(tmp_path: Path):
    """A run that logged only the overall masked share (no mixture, no per-block keys): three columns, and the
    summary has no per-block or per-source line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "masked_fraction": 0.1}) + "\n"
                                               for s in (1, 2)))
    _assert_png(plot_run(run))
    assert _png_size(run / "report.png")[0] == 3 * 500
    train, evals = read_metrics(run / "metrics.jsonl")
    assert masked_share_keys(train) == ([], [])
    assert not any("per block" in line or "per source" in line for line in summary_lines(train, evals))
