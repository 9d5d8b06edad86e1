"""The model card of every export, from a real (tiny) training run, and the startup checks of Matryoshka and the
Hub upload."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gist_scale.config import MINILM
from gist_scale.data import sample_data_path
from gist_scale.train import main


def _front_matter(card: Path) -> tuple[dict, str]:
    text = card.read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _eval_file(tmp_path: Path, rows: int = 48) -> str:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(sample_data_path("eval").read_text().splitlines()[:rows]) + "\n")
    return str(path)


def test_cards_of_final_and_best_hold_the_runs_config_and_metrics(tmp_path, tiny_model_dir):
    """MiniLM (a hub name, so base_model and its license are known) guided by the tiny BERT, trained as Matryoshka
    for 3 steps: final/ and best/ get a card made of this run's settings and its measured metrics."""
    from sentence_transformers import SentenceTransformer

    run = tmp_path / "card-run"
    args = ["--model.name", MINILM, "--guide.name", str(tiny_model_dir), "--train.output_dir", str(run),
            "--train.batch_size", "8", "--train.max_steps", "3", "--train.log_every", "1",
            "--data.path", str(sample_data_path("train")), "--data.max_rows", "256",
            "--eval.path", _eval_file(tmp_path),
            "--eval.every", "2", "--checkpoint.keep_best", "ndcg@10@128",
            "--loss.matryoshka_dims", "[384, 128, 32]", "--loss.matryoshka_weights", "[1, 0.5, 0.25]",
            "--loss.margin", "0.05", "--optim.lr", "3e-5"]
    assert main(args) == 0

    meta, body = _front_matter(run / "final" / "README.md")
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == MINILM
    assert meta["license"] == "apache-2.0"  # from all-MiniLM-L6-v2's own card
    assert {"sentence-transformers", "sentence-similarity", "feature-extraction", "gist-embed",
            "matryoshka", "dataset_size:256"} <= set(meta["tags"])
    assert "datasets" not in meta  # a local file is not a hub dataset

    config = yaml.safe_load((run / "config.yaml").read_text())
    evals = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval/ndcg@10" in r}
    baseline = json.loads((run / "eval_baseline.json").read_text())
    assert set(baseline) >= {"ndcg@10@384", "ndcg@10@128", "ndcg@10@32"}
    for name, value in baseline.items():  # the table: before, after, delta, from the run's own evaluations
        after = evals[3][f"eval/{name}"]
        assert f"| {name} | {value:.4f} | {after:.4f} | {after - value:+.4f} |" in body, name
    assert "| loss | temperature=0.01, margin_strategy=absolute, margin=0.05," in body
    assert "matryoshka_dims=[384, 128, 32], matryoshka_weights=[1.0, 0.5, 0.25]" in body
    assert f"lr={config['optim']['lr']}" in body and "| global batch | 8 triplets (8 per device x 1 x 1" in body
    assert "| layout | 1 process(es), no ZeRO, precision no |" in body and "| steps | 3 of 3 |" in body
    assert f"{sample_data_path('train')}: 256 rows, 1 hard negative(s) per row" in body
    assert f"`{tiny_model_dir}`, bf16, mean pooling" in body  # the guide
    assert "48 queries" in body
    assert f'SentenceTransformer("{run / "final"}", truncate_dim=128)' in body
    assert "arXiv" in body and "2402.16829" in body and "@misc{solatorio2024gistembed" in body
    assert "@misc{kusupati2024matryoshka" in body

    best = json.loads((run / "best" / "best.json").read_text())
    best_meta, best_body = _front_matter(run / "best" / "README.md")
    assert best_meta == meta
    assert f"(step {best['step']})" in best_body and f"| steps | {best['step']} of 3 |" in best_body
    assert f"| ndcg@10@128 | {baseline['ndcg@10@128']:.4f} | {best['ndcg@10@128']:.4f} |" in best_body

    # The card does not get in sentence-transformers' way, and the usage it shows works.
    model = SentenceTransformer(str(run / "final"), device="cpu", truncate_dim=128)
    assert model.encode(["a sentence"]).shape == (1, 128)


def test_card_without_eval_data_or_guide(tmp_path, tiny_model_dir):
    run = tmp_path / "plain"
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", "null", "--train.output_dir", str(run),
                 "--train.batch_size", "8", "--train.max_steps", "1", "--export.license", "mit",
                 "--data.path", str(sample_data_path("train")), "--data.max_rows", "64"]) == 0
    meta, body = _front_matter(run / "final" / "README.md")
    assert "base_model" not in meta and meta["license"] == "mit" and "matryoshka" not in meta["tags"]
    assert "| guide | none: plain in-batch InfoNCE |" in body
    assert "No held-out evaluation was configured" in body and "truncate_dim" not in body
    assert "32-dimensional normalized embeddings" in body


def test_push_to_hub_without_a_token_fails_before_training(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    run = tmp_path / "push"
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--train.output_dir",
                 str(run), "--export.push_to_hub", "someone/gist-model"]) == 2
    assert "export.push_to_hub=someone/gist-model: no Hugging Face token; set HF_TOKEN" in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists()
    assert main(["--export.push_to_hub", "not a repo id"]) == 2
    assert "give a hub repo id like your-name/my-gist-model" in capsys.readouterr().err


def test_matryoshka_size_larger_than_the_student_fails_at_startup(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "too-large"
    assert main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir), "--train.output_dir",
                 str(run), "--loss.matryoshka_dims", "[64, 16]"]) == 2
    err = capsys.readouterr().err
    assert f"loss.matryoshka_dims=[64, 16]: 64 larger than the embedding dimension 32 of {tiny_model_dir}" in err
    assert not (run / "metrics.jsonl").exists()
    assert main(["--loss.matryoshka_dims", "[64, 16]", "--loss.matryoshka_weights", "[1]"]) == 2
    assert "give one weight per size" in capsys.readouterr().err
