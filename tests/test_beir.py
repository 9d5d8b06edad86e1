"""BEIR-format evaluation: graded metrics against sentence-transformers and pytrec_eval, the folder reader, the CLI,
in-training eval on a BEIR folder and evaluating a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from gist_scale.config import MINILM, ConfigError, EvalConfig
from gist_scale.data import DataError, sample_data_path
from gist_scale.evaluation import evaluate_embedder, load_beir
from gist_scale.evaluation.cli import main
from gist_scale.inference import encode_texts
from gist_scale.metrics import METRICS, retrieval_metrics
from gist_scale.st_format import load_sentence_transformer_dir

datasets.disable_progress_bars()

ROWS = 200
"""Eval rows of the shipped sample that make the test folder."""


def write_beir_folder(root: Path, rows: int = ROWS) -> Path:
    """A BEIR folder from the shipped sample's eval split, with graded qrels and the usual irregularities.

    Per query: its positive(s) grade 2; every third query's hard negative grade 1 (partly relevant), every other
    negative grade 0 (judged non-relevant). Every second document has a title (its WordNet lexicographer file).
    queries.jsonl also holds a query without judgments and one judged only non-relevant (both must be skipped), and
    qrels/dev.tsv exists so that a missing split can list the others.
    """
    lines = [json.loads(line) for line in sample_data_path("eval").read_text().splitlines()[:rows]]
    queries: dict[str, str] = {}
    docs: dict[str, tuple[str, str]] = {}
    grades: dict[tuple[str, str], int] = {}
    for row in lines:
        qid = queries.setdefault(row["query"], f"q{len(queries)}")
        for text in (row["pos"], row["neg"]):
            if text not in docs:
                docs[text] = (f"d{len(docs)}", row["task_name"] if len(docs) % 2 == 0 else "")
        pos, neg = docs[row["pos"]][0], docs[row["neg"]][0]
        grades[(qid, pos)] = 2
        if grades.get((qid, neg), 0) < 2:
            grades[(qid, neg)] = 1 if int(qid[1:]) % 3 == 0 else 0
    root.mkdir(parents=True)
    (root / "qrels").mkdir()
    with (root / "corpus.jsonl").open("w") as handle:
        for text, (doc_id, title) in docs.items():
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as handle:
        for text, qid in queries.items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
        handle.write(json.dumps({"_id": "q-unjudged", "text": "a query of another split"}) + "\n")
        handle.write(json.dumps({"_id": "q-nothing-relevant", "text": "a query with no relevant document"}) + "\n")
    with (root / "qrels" / "test.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for (qid, doc_id), grade in grades.items():
            handle.write(f"{qid}\t{doc_id}\t{grade}\n")
        handle.write("q-nothing-relevant\td0\t0\n")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    return root


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_beir_folder(tmp_path_factory.mktemp("beir") / "wordnet")


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_transformer_dir(MINILM)


def _read_folder(root: Path) -> tuple[dict, dict, dict[str, dict[str, int]]]:
    """The folder read independently of gist_scale.evaluation.beir: queries, documents as BEIR joins them, and the qrels."""
    corpus = {}
    for line in (root / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        corpus[row["_id"]] = (row["title"] + " " + row["text"]).strip()
    queries = {row["_id"]: row["text"] for row in map(json.loads, (root / "queries.jsonl").read_text().splitlines())}
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, doc_id, grade = line.split("\t")
        qrels.setdefault(qid, {})[doc_id] = int(grade)
    return queries, corpus, qrels


def _pytrec_eval(queries: dict, corpus: dict, qrels: dict, by_text: dict, ignore_identical_ids: bool = True
                 ) -> dict[str, float]:
    """Graded metrics as BEIR's EvaluateRetrieval computes them: pytrec_eval on the full ranking of every judged
    query, the document with the query's own id removed from its results, averaged over the judged queries."""
    import pytrec_eval

    judged = {qid: docs for qid, docs in qrels.items() if qid in queries}
    q = F.normalize(torch.stack([by_text[queries[qid]] for qid in judged]), dim=-1)
    c = F.normalize(torch.stack([by_text[corpus[d]] for d in corpus]), dim=-1)
    run = {qid: {d: float(s) for d, s in zip(corpus, row.tolist()) if not (ignore_identical_ids and d == qid)}
           for qid, row in zip(judged, q @ c.T)}
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}).evaluate(run)
    measures = {"ndcg@10": "ndcg_cut_10", "recall@1": "recall_1", "recall@10": "recall_10",
                "recall@100": "recall_100", "map@100": "map_cut_100"}
    assert len(per_query) == len(judged)
    return {key: sum(m[measure] for m in per_query.values()) / len(per_query) for key, measure in measures.items()}


def _embeddings_by_text(minilm, texts: list[str]) -> dict[str, torch.Tensor]:
    embedder, tokenizer, max_length = minilm
    embeddings = encode_texts(embedder, tokenizer, texts, max_length, 64, "cpu")
    return {text: embeddings[i] for i, text in enumerate(texts)}


# ------------------------------------------------------------------------------------------------ metrics


def test_graded_relevance_hand_computed():
    # Documents ranked in index order (cosine with the x axis falls with the angle).
    angles = torch.tensor([0.1 * j for j in range(6)], dtype=torch.float64)
    corpus = torch.stack([angles.cos(), angles.sin()], dim=1)
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # Ranks 1, 2, 3 hold grades 0 (judged non-relevant), 1 and 3; the ideal order is 3, 1.
    metrics = retrieval_metrics(query, corpus, [{0: 0, 1: 1, 2: 3}])
    dcg = 1 / torch.log2(torch.tensor(3.0)) + 3 / torch.log2(torch.tensor(4.0))
    ideal = 3 + 1 / torch.log2(torch.tensor(3.0))
    assert metrics["ndcg@10"] == pytest.approx(float(dcg / ideal))
    assert metrics["mrr@10"] == 0.5 and metrics["recall@1"] == 0.0 and metrics["recall@10"] == 1.0
    assert metrics["map@100"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # A binary list is grade 1 for each id; the grades above 0 are what binary metrics count.
    binary = retrieval_metrics(query, corpus, [[1, 2]])
    half = 1 / torch.log2(torch.tensor(3.0))
    assert binary["ndcg@10"] == pytest.approx(float((half + 0.5) / (1 + half)))
    for key in ("mrr@10", "recall@1", "recall@10", "recall@100", "map@100"):
        assert binary[key] == pytest.approx(metrics[key])
    # Judged, but nothing relevant: 0 everywhere (trec_eval's per-query value, which BEIR and MTEB average).
    assert all(value == 0.0 for value in retrieval_metrics(query, corpus, [{0: 0}]).values())
    # A query never retrieves its excluded document: the others move up one rank.
    excluded = retrieval_metrics(query, corpus, [{1: 1, 2: 3}], exclude=[0])
    assert excluded["mrr@10"] == 1.0 and excluded["recall@1"] == 0.5


def test_beir_folder_matches_sentence_transformers_and_pytrec_eval(beir_dir: Path, minilm):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    embedder, tokenizer, max_length = minilm
    data = load_beir(beir_dir)
    queries, corpus, qrels = _read_folder(beir_dir)
    assert len(data.queries) == len(queries) - 1 and len(data.corpus) == len(corpus)  # q-unjudged is skipped
    assert f"1 of {len(queries)} queries have no judgments" in data.source
    assert "1 judged without a relevant document" in data.source
    ours = evaluate_embedder(embedder, tokenizer, max_length, data, batch_size=64, device="cpu")
    assert set(ours) == set(METRICS) and 0.2 < ours["ndcg@10"] < 1.0

    # The same embeddings, looked up by text, for both references.
    by_text = _embeddings_by_text(minilm, data.texts)

    class Lookup:  # what InformationRetrievalEvaluator asks of a model
        def encode_query(self, texts, **kwargs):
            return torch.stack([by_text[t] for t in texts])

        encode_document = encode_query

    # sentence-transformers' evaluator: binary relevance (every grade above 0 relevant); it skips the query judged
    # without a relevant document, which BEIR and we count as 0: our averages are over one query more.
    n = len(data.queries) - 1
    binary = {qid: {d for d, g in docs.items() if g > 0} for qid, docs in qrels.items()}
    evaluator = InformationRetrievalEvaluator(queries, corpus, binary, mrr_at_k=[10], ndcg_at_k=[10],
                                              accuracy_at_k=[1], precision_recall_at_k=[1, 10, 100],
                                              map_at_k=[100], score_functions={"cos": cos_sim}, write_csv=False)
    st = evaluator.compute_all_metrics(Lookup())["cos"]
    for key, value in (("mrr@10", st["mrr@k"][10]), ("recall@1", st["recall@k"][1]),
                       ("recall@10", st["recall@k"][10]), ("recall@100", st["recall@k"][100]),
                       ("map@100", st["map@k"][100])):
        assert ours[key] == pytest.approx(value * n / (n + 1), abs=1e-6), key
    # Graded nDCG differs from the binary one; pytrec_eval (BEIR's and MTEB's scorer) is the graded reference.
    assert abs(ours["ndcg@10"] - st["ndcg@k"][10] * n / (n + 1)) > 1e-3
    reference = _pytrec_eval(queries, corpus, qrels, by_text)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_identical_ids_are_not_retrieved(tmp_path: Path, minilm):
    """A document with a query's own _id is not retrieved for it (BEIR's ignore_identical_ids, MTEB's too)."""
    embedder, tokenizer, max_length = minilm
    root = write_beir_folder(tmp_path / "self", rows=60)
    queries, _, _ = _read_folder(root)
    with (root / "corpus.jsonl").open("a") as handle:
        for qid, text in queries.items():  # every query's own text as a document with its id: it would rank first
            handle.write(json.dumps({"_id": qid, "title": "", "text": text}) + "\n")
    data = load_beir(root)
    assert sum(i >= 0 for i in data.exclude) == len(data.queries)
    ours = evaluate_embedder(embedder, tokenizer, max_length, data, 64, "cpu")
    queries, corpus, qrels = _read_folder(root)
    by_text = _embeddings_by_text(minilm, data.texts)
    for key, value in _pytrec_eval(queries, corpus, qrels, by_text).items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    # Without the exclusion each query would find itself first, which is not relevant: the metrics would drop.
    assert _pytrec_eval(queries, corpus, qrels, by_text, ignore_identical_ids=False)["ndcg@10"] < ours["ndcg@10"] - 0.05


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_folders_are_named(tmp_path: Path, beir_dir: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(DataError, match=r"qrels/validation.tsv: no such file; splits here: dev, test"):
        load_beir(beir_dir, "validation")
    assert main([MINILM, "--beir", str(beir_dir), "--split", "validation"]) == 2
    err = capsys.readouterr().err
    assert "qrels/validation.tsv: no such file" in err and "Traceback" not in err and len(err.splitlines()) == 1

    for name in ("corpus.jsonl", "queries.jsonl"):
        broken = tmp_path / f"no-{name}"
        write_beir_folder(broken, rows=20)
        (broken / name).unlink()
        with pytest.raises(DataError, match=rf"{name}: no such file \(a BEIR folder holds"):
            load_beir(broken)
    bad = write_beir_folder(tmp_path / "bad", rows=20)
    with (bad / "qrels" / "test.tsv").open("a") as handle:
        handle.write("q0\td0\tvery\n")
    with pytest.raises(DataError, match=r"test.tsv:\d+: field 'score' must be an integer grade"):
        load_beir(bad)
    (bad / "corpus.jsonl").write_text('{"_id": "d0", "text": "fine"}\n{"_id": "d1"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: field 'text'"):
        load_beir(bad, "dev")
    assert main([MINILM, "--beir", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_unknown_ids_in_qrels_are_dropped_with_a_warning(tmp_path: Path):
    root = write_beir_folder(tmp_path / "unknown", rows=20)
    clean = load_beir(root)
    with (root / "qrels" / "test.tsv").open("a") as handle:
        handle.write("q0\tno-such-doc\t1\nq-ghost\td0\t2\nq-ghost\td1\t1\n")
    with pytest.warns(UserWarning) as caught:
        data = load_beir(root)
    messages = [str(w.message) for w in caught]
    assert any("1 judgment(s) name a corpus id" in m and "'no-such-doc'" in m for m in messages)
    assert any("2 judgment(s) name a query id" in m and "'q-ghost'" in m for m in messages)
    assert data.queries == clean.queries and data.relevant == clean.relevant


def test_eval_config_beir_validation(beir_dir: Path):
    assert EvalConfig(beir=str(beir_dir)).beir_split == "test"
    with pytest.raises(ConfigError, match="eval.beir=.*: no such folder"):
        EvalConfig(beir="/no/such/folder")
    with pytest.raises(ConfigError, match="both set"):
        EvalConfig(beir=str(beir_dir), path="x.jsonl")


# ------------------------------------------------------------------------ CLI, training, checkpoints


@pytest.mark.slow
def test_training_evaluates_on_beir_and_checkpoint_evaluates_like_export(beir_dir: Path, tiny_model_dir: Path,
                                                                        tmp_path: Path):
    from gist_scale.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--model.name", str(tiny_model_dir), "--guide.name", str(tiny_model_dir),
                       "--train.batch_size", "8", "--train.max_steps", "2", "--checkpoint.every", "2",
                       "--eval.beir", str(beir_dir), "--train.output_dir", str(run)]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "eval/ndcg@10" in r][-1]
    assert {f"eval/{key}" for key in METRICS} <= final.keys()

    out_final, out_checkpoint = tmp_path / "final.json", tmp_path / "checkpoint.json"
    assert main([str(run / "final"), "--beir", str(beir_dir), "--out", str(out_final)]) == 0
    assert main([str(run / "checkpoints" / "step_2"), "--beir", str(beir_dir), "--out", str(out_checkpoint)]) == 0
    exported = json.loads(out_final.read_text())["model"]
    assert json.loads(out_checkpoint.read_text())["model"] == pytest.approx(exported, abs=1e-6)
    for key in METRICS:
        assert final[f"eval/{key}"] == pytest.approx(exported[key], abs=1e-5), key


# A ZeRO-3 checkpoint (each rank holds a shard) evaluating like the run's consolidated export: tests/test_resume.py,
# on the 2-rank ZeRO-3 run it trains anyway.
