"""`gist-scale eval --mteb`: our Embedder as an mteb encoder, proven offline on a local mteb retrieval task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import mteb  # the [mteb] extra, also in [dev]
import pytest
import torch
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from test_beir import write_beir_folder

from gist_scale.config import MINILM
from gist_scale.evaluation import evaluate_embedder, load_beir
from gist_scale.evaluation.cli import main
from gist_scale.evaluation.mteb import EmbedderEncoder, resolve_tasks, run_mteb
from gist_scale.inference import encode_texts
from gist_scale.st_format import load_sentence_transformer_dir

REPO = Path(__file__).resolve().parents[1]


def local_retrieval_task(folder: Path) -> AbsTaskRetrieval:
    """An mteb retrieval task whose data are a local BEIR folder (mteb's custom-task API: metadata + load_data)."""

    class WordNetSampleRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="WordNetSampleRetrieval", description="gloss -> example sentence, gist-scale's shipped sample",
            reference="https://wordnet.princeton.edu", dataset={"path": str(folder), "revision": "local"},
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="ndcg_at_10", date=("2006-01-01", "2006-12-31"), domains=["Written"], task_subtypes=[],
            license="not specified", annotations_creators="derived", dialect=[], sample_creation="found",
            bibtex_citation="")

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            def rows(name: str) -> datasets.Dataset:
                table = datasets.load_dataset("json", data_files=str(folder / name), split="train")
                return table.rename_column("_id", "id")

            qrels: dict[str, dict[str, int]] = {}
            for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
                qid, doc_id, grade = line.split("\t")
                qrels.setdefault(qid, {})[doc_id] = int(grade)
            self.dataset = {"default": {"test": RetrievalSplitData(
                corpus=rows("corpus.jsonl"), queries=rows("queries.jsonl"), relevant_docs=qrels, top_ranked=None)}}
            self.data_loaded = True

    return WordNetSampleRetrieval()


def test_mteb_ndcg_on_a_local_task_equals_ours(tmp_path: Path):
    folder = write_beir_folder(tmp_path / "wordnet")
    embedder, tokenizer, max_length = load_sentence_transformer_dir(MINILM)
    ours = evaluate_embedder(embedder, tokenizer, max_length, load_beir(folder), 64, "cpu")

    encoder = EmbedderEncoder(embedder, tokenizer, max_length, "cpu", "local/minilm")
    summary = run_mteb(encoder, [local_retrieval_task(folder)], tmp_path / "out", batch_size=64)
    result = summary["WordNetSampleRetrieval"]
    assert result["main_score"] == "ndcg_at_10"
    # mteb rounds its scores to 5 decimals; it scores the same graded qrels with pytrec_eval.
    assert result["value"] == pytest.approx(ours["ndcg@10"], abs=1e-4)
    written = json.loads(Path(result["result_file"]).read_text())
    scores = written["scores"]["test"][0]
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-4)
    assert scores["map_at_100"] == pytest.approx(ours["map@100"], abs=1e-4)
    assert scores["recall_at_100"] == pytest.approx(ours["recall@100"], abs=1e-4)


def test_prompts_are_prepended_by_query_or_document():
    embedder, tokenizer, max_length = load_sentence_transformer_dir(MINILM)
    encoder = EmbedderEncoder(embedder, tokenizer, max_length, "cpu", "local/minilm",
                              prompts={"query": "query: ", "passage": "passage: "}, batch_size=4)
    task = mteb.get_task("SciFact")  # its metadata only; nothing is downloaded
    texts = ["a gloss about cats", "an example sentence"]
    batches = torch.utils.data.DataLoader(datasets.Dataset.from_dict({"text": texts}), batch_size=1)
    for prompt_type, prefix in ((mteb.types.PromptType.query, "query: "), (mteb.types.PromptType.document,
                                                                            "passage: "), (None, "")):
        got = encoder.encode(batches, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                             prompt_type=prompt_type)
        expected = encode_texts(embedder, tokenizer, [prefix + t for t in texts], max_length, 4, "cpu")
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-6, rtol=0)


def test_task_names_resolve_and_unknown_names_list_close_matches(capsys: pytest.CaptureFixture[str]):
    names = [task.metadata.name for task in resolve_tasks(["SciFact", "NanoBEIR"])]
    assert names[0] == "SciFact" and "NanoSciFactRetrieval" in names and len(names) == 14
    assert main([MINILM, "--mteb", "SciFakt"]) == 2
    err = capsys.readouterr().err
    assert "--mteb SciFakt: mteb" in err and "close matches: SciFact" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_offline_without_cache_names_the_dataset(tmp_path: Path):
    """A fresh process, offline, with an empty HF cache: one line naming the dataset, exit 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gist_scale", "eval", MINILM, "--mteb", "SciFact",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--mteb SciFact: could not reach its dataset mteb/scifact" in errors[0]
