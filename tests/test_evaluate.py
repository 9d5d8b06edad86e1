"""The evaluator: metric math, eval data, sentence-transformers directories, the CLI and distributed encoding."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
from dist_utils import run_distributed, torchrun_command
from transformers import BertConfig, BertModel

from gist_scale.config import MINILM, DataConfig
from gist_scale.data import DataError, sample_data_path
from gist_scale.evaluation import EvalData, evaluate_embedder, load_eval_data
from gist_scale.evaluation.cli import main
from gist_scale.inference import encode_texts
from gist_scale.metrics import METRICS, _average_ranks, retrieval_metrics, spearman
from gist_scale.model import load_tokenizer, resolve_model_path
from gist_scale.st_format import export_sentence_transformer, load_sentence_transformer_dir

datasets.disable_progress_bars()


def _eval_subset(path: Path, rows: int) -> Path:
    """The first `rows` rows of the shipped eval split, as a file of its own."""
    lines = sample_data_path("eval").read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer, exported in sentence-transformers format (cls, no normalize)."""
    tokenizer = load_tokenizer(MINILM)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny") / "model"
    return export_sentence_transformer(BertModel(config), tokenizer, "cls", False, 64, out)


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_transformer_dir(MINILM)


# ------------------------------------------------------------------------------------------- metric math


def _fan(angles: list[float]) -> torch.Tensor:
    """Unit vectors in the plane at these angles: cosine with the x axis ranks them by angle."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_perfect_ranking_scores_one():
    corpus = _fan([0.0, 0.7, 1.4, 2.1])
    metrics = retrieval_metrics(corpus[[2, 0, 3]] * 5.0, corpus, [[2], [0], [3]])  # scale must not matter
    assert set(metrics) == set(METRICS)
    assert all(value == pytest.approx(1.0) for value in metrics.values())


def test_known_rankings_give_hand_computed_values():
    # Twelve documents in order of similarity to the query: document j is ranked j + 1.
    corpus = _fan([0.1 * j for j in range(12)])
    query = _fan([0.0])

    third = retrieval_metrics(query, corpus, [[2]])
    assert third["ndcg@10"] == pytest.approx(1 / math.log2(4))  # = 0.5: the single hit at rank 3
    assert third["mrr@10"] == pytest.approx(1 / 3)
    assert third["recall@1"] == 0.0 and third["recall@10"] == 1.0

    missed = retrieval_metrics(query, corpus, [[11]])  # rank 12: outside the top 10, inside the top 100
    assert all(missed[key] == 0.0 for key in ("ndcg@10", "mrr@10", "recall@1", "recall@10"))
    assert missed["recall@100"] == 1.0 and missed["map@100"] == pytest.approx(1 / 12)

    two = retrieval_metrics(query, corpus, [[0, 2]])  # hits at ranks 1 and 3
    ideal = 1 + 1 / math.log2(3)
    assert two["ndcg@10"] == pytest.approx((1 + 0.5) / ideal)  # 0.919720...
    assert two["ndcg@10"] == pytest.approx(0.9197207891)
    assert two["mrr@10"] == 1.0 and two["recall@1"] == 0.5 and two["recall@10"] == 1.0

    # Averaged over queries, and the corpus order of the relevant ids does not matter.
    together = retrieval_metrics(query.repeat(3, 1), corpus, [[2], [11], [2, 0]])
    for key in METRICS:
        assert together[key] == pytest.approx((third[key] + missed[key] + two[key]) / 3)


def test_more_relevant_documents_than_k_and_small_corpus():
    corpus = _fan([0.05 * j for j in range(15)])
    metrics = retrieval_metrics(_fan([0.0]), corpus, [list(range(12))])
    # The top 10 are all relevant: the ideal ranking can do no better, but 2 of 12 are beyond the cutoff.
    assert metrics["ndcg@10"] == pytest.approx(1.0) and metrics["recall@10"] == pytest.approx(10 / 12)
    assert metrics["recall@1"] == pytest.approx(1 / 12)
    # Fewer than 10 documents: ranking depth is the corpus size.
    small = retrieval_metrics(_fan([0.0]), _fan([0.0, 0.5, 1.0]), [[1]])
    assert small["ndcg@10"] == pytest.approx(1 / math.log2(3)) and small["mrr@10"] == pytest.approx(0.5)


def test_blockwise_scoring_equals_one_matrix_product(monkeypatch: pytest.MonkeyPatch):
    import gist_scale.metrics as metrics

    generator = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(40, 8, generator=generator), torch.randn(300, 8, generator=generator)
    relevant = [torch.randint(0, 300, (1 + i % 3,), generator=generator).unique().tolist() for i in range(40)]
    whole = retrieval_metrics(queries, corpus, relevant)
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 7)
    monkeypatch.setattr(metrics, "CORPUS_CHUNK", 13)  # the last block (1 document) is smaller than k
    assert retrieval_metrics(queries, corpus, relevant) == pytest.approx(whole, abs=1e-12)


def test_spearman_with_ties_matches_hand_computation():
    assert _average_ranks(torch.tensor([5.0, 7.0, 7.0, 9.0]).numpy()).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert _average_ranks(torch.tensor([3.0, 1.0, 3.0, 3.0]).numpy()).tolist() == [3.0, 1.0, 3.0, 3.0]
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]: covariance 4.5, variances 4.5 and 5 -> 4.5 / sqrt(22.5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_agrees_with_scipy_on_random_ties():
    from scipy import stats  # a dependency of sentence-transformers ([dev])
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=generator).double()
    y = x + torch.randint(0, 4, (200,), generator=generator).double()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


# --------------------------------------------------------------------------------------------- eval data


def test_shipped_eval_split_relevance():
    data = load_eval_data(None)
    rows = [json.loads(line) for line in sample_data_path("eval").read_text().splitlines()]
    assert len(data.queries) == len({r["query"] for r in rows}) == 511
    assert len(data.corpus) == len({r["pos"] for r in rows} | {r["neg"] for r in rows}) == 598
    relevant = {q: {data.corpus[i] for i in ids} for q, ids in zip(data.queries, data.relevant)}
    for row in rows:
        assert row["pos"] in relevant[row["query"]]
    # A query repeated across rows is one query with both positives relevant; negatives never are.
    assert len(relevant["the act of entering"]) == 2
    positives = {(r["query"], r["pos"]) for r in rows}
    for row in rows:
        assert (row["neg"] in relevant[row["query"]]) == ((row["query"], row["neg"]) in positives)
    assert data.sts is None and len(data.texts) == len(set(data.queries) | set(data.corpus))


def test_every_listed_positive_is_relevant_and_the_first_positives_keep_the_first_corpus_ids(tmp_path: Path):
    """With `data.num_positives` P, a row's first P listed positives are all relevant (as in training, where none of
    them is a negative); the others join the corpus after every first positive and negative, so the first positives
    keep ids 0.. in row order (`gist-scale mine` reads their guide embeddings from the cache in that order)."""
    triplets = tmp_path / "eval.jsonl"
    triplets.write_text("\n".join(json.dumps(r) for r in [
        {"query": "cats", "pos": ["a cat", "a kitten", "a tabby", "a lion"], "neg": ["a dog"]},
        {"query": "dogs", "pos": "a dog", "neg": ["a kitten"]},
    ]) + "\n")
    cfg = DataConfig(task_column=None, num_positives=3)
    data = load_eval_data(str(triplets), cfg)
    assert data.corpus == ["a cat", "a dog", "a kitten", "a tabby"]  # "a lion" is past P; "a kitten" is dog's negative
    assert data.relevant == [[0, 2, 3], [1]]
    # One positive per row (the default): only the first is relevant, as before.
    assert load_eval_data(str(triplets), DataConfig(task_column=None)).relevant == [[0], [1]]


def test_column_mapping_extra_corpus_and_sts(tmp_path: Path):
    triplets = tmp_path / "eval.jsonl"
    triplets.write_text("\n".join(json.dumps(r) for r in [
        {"anchor": "what is a cat", "positive": "a cat is a small feline", "negative": ["dogs bark", "a car"]},
        {"anchor": "what is a dog", "positive": "dogs bark", "negative": ["a cat is a small feline", "a tree"]},
    ]) + "\n")
    extra_jsonl = tmp_path / "extra.jsonl"
    extra_jsonl.write_text('{"text": "a tree"}\n{"text": "oceans are deep"}\n')
    extra_txt = tmp_path / "extra.txt"
    extra_txt.write_text("mountains are high\n\n  oceans are deep  \n")
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a cat", "sentence2": "a kitten", "score": 4.5}\n'
                   '{"sentence1": "a cat", "sentence2": "a car", "score": 0}\n')
    cfg = DataConfig(query_column="anchor", pos_column="positive", neg_columns=["negative"], task_column=None,
                     max_rows=1)
    data = load_eval_data(str(triplets), cfg, [str(extra_jsonl), str(extra_txt)], sts=str(sts))
    assert data.queries == ["what is a cat", "what is a dog"]  # max_rows of training does not cut the eval set
    assert data.corpus == ["a cat is a small feline", "dogs bark", "a car", "a tree", "oceans are deep",
                           "mountains are high"]
    assert data.relevant == [[0], [1]]
    assert data.sts.scores == [4.5, 0.0] and data.sts.sentence1 == ["a cat", "a cat"]
    assert len(data.texts) == 2 + 6 + 2  # "a cat" is encoded once for both pairs

    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="no 'text' column"):
        load_eval_data(str(triplets), cfg, [str(tmp_path / "bad.jsonl")])
    (tmp_path / "bad_sts.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": "high"}\n' * 2)
    with pytest.raises(DataError, match="score must be a finite number"):
        load_eval_data(str(triplets), cfg, sts=str(tmp_path / "bad_sts.jsonl"))
    with pytest.raises(ValueError, match="no relevant document"):
        EvalData(["q"], ["d"], [[]])


# ----------------------------------------------------------------------------------- models and encoding


def test_minilm_on_shipped_split_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    embedder, tokenizer, max_length = minilm
    assert (embedder.pooling, embedder.normalize, max_length) == ("mean", True, 256)
    data = load_eval_data(None)
    embedder.train()
    ours = evaluate_embedder(embedder, tokenizer, max_length, data, batch_size=64, device="cpu")
    assert embedder.training and embedder.encoder.training  # train mode restored
    assert 0.2 < ours["ndcg@10"] < 1.0
    assert ours["recall@1"] <= ours["mrr@10"] <= ours["recall@10"]

    st = SentenceTransformer(resolve_model_path(MINILM), device="cpu")
    embeddings = st.encode(data.texts, batch_size=64, convert_to_tensor=True)
    theirs = retrieval_metrics(embeddings[data.query_ids], embeddings[data.corpus_ids], data.relevant)
    for key in METRICS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key


def test_st_directories_in_both_formats_load_like_sentence_transformers(tiny_st_dir: Path, tmp_path: Path):
    from sentence_transformers import SentenceTransformer

    texts = ["a short text", "a somewhat longer text about nothing in particular", "x"]
    embedder, tokenizer, max_length = load_sentence_transformer_dir(str(tiny_st_dir))
    assert (embedder.pooling, embedder.normalize, max_length) == ("cls", False, 64)
    ours = encode_texts(embedder, tokenizer, texts, max_length, 2, "cpu")
    st = SentenceTransformer(str(tiny_st_dir), device="cpu")
    torch.testing.assert_close(ours, st.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=0)

    # sentence-transformers' own writer: `pooling_mode` as a string, the length kept by the tokenizer.
    st.save(str(tmp_path / "resaved"))
    embedder2, tokenizer2, max_length2 = load_sentence_transformer_dir(str(tmp_path / "resaved"))
    assert (embedder2.pooling, embedder2.normalize, max_length2) == ("cls", False, 64)
    torch.testing.assert_close(encode_texts(embedder2, tokenizer2, texts, max_length2, 3, "cpu"), ours,
                               atol=1e-6, rtol=0)

    dense = tmp_path / "dense"
    shutil.copytree(tiny_st_dir, dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="not supported"):
        load_sentence_transformer_dir(str(dense))


def test_cli_out_json_with_baseline(tiny_st_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = _eval_subset(tmp_path / "eval.jsonl", 48)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a document nobody asked for\nanother distractor\n")
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a cat sat", "sentence2": "a cat was sitting", "score": 5}\n'
                   '{"sentence1": "a cat sat", "sentence2": "stock markets fell", "score": 0}\n'
                   '{"sentence1": "he ran", "sentence2": "he was running fast", "score": 4}\n')
    out = tmp_path / "out" / "metrics.json"
    code = main([MINILM, "--data", str(data), "--corpus", str(corpus), "--sts", str(sts), "--baseline", MINILM,
                 "--batch-size", "32", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) == {"model", "baseline"}
    assert set(result["model"]) == {*METRICS, "spearman"} == set(result["baseline"])
    assert all(result["model"][k] == result["baseline"][k] for k in result["model"])  # same model: deltas 0
    assert 0.2 < result["model"]["ndcg@10"] <= 1.0
    printed = capsys.readouterr().out
    assert "delta" in printed and "+0.0000" in printed

    # Another baseline: its metrics are its own (as evaluated alone), and the deltas are model minus baseline.
    alone = tmp_path / "tiny.json"
    assert main([str(tiny_st_dir), "--data", str(data), "--batch-size", "32", "--out", str(alone)]) == 0
    versus = tmp_path / "versus.json"
    assert main([MINILM, "--data", str(data), "--baseline", str(tiny_st_dir), "--batch-size", "32",
                 "--out", str(versus)]) == 0
    compared = json.loads(versus.read_text())
    assert compared["baseline"] == pytest.approx(json.loads(alone.read_text())["model"])
    delta = compared["model"]["ndcg@10"] - compared["baseline"]["ndcg@10"]
    assert delta > 0.1, compared  # trained MiniLM against a random 2-layer BERT
    assert f"{delta:+.4f}" in capsys.readouterr().out

    assert main([str(tmp_path / "no_such_model"), "--data", str(data)]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_cli_matryoshka_dims_match_sentence_transformers_truncate_dim(tiny_st_dir: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]):
    """`--dims 128,64` reports every metric at each size, equal to sentence-transformers' `truncate_dim` embeddings
    scored by the same metric code; the full width is the unsuffixed metric. (MiniLM: a random model's embeddings
    are so alike that 1e-6 of encoding noise reorders them.)"""
    from sentence_transformers import SentenceTransformer

    data_file = _eval_subset(tmp_path / "eval.jsonl", 48)
    out = tmp_path / "dims.json"
    assert main([MINILM, "--data", str(data_file), "--dims", "64,384,128", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["model"]
    assert list(metrics) == [*METRICS, *(f"{m}@{d}" for d in (384, 128, 64) for m in METRICS)]
    data = load_eval_data(str(data_file))
    for dim in (128, 64):
        st = SentenceTransformer(resolve_model_path(MINILM), device="cpu", truncate_dim=dim)
        embeddings = st.encode(data.texts, convert_to_tensor=True)
        assert embeddings.shape[1] == dim
        theirs = retrieval_metrics(embeddings[data.query_ids], embeddings[data.corpus_ids], data.relevant)
        for key in METRICS:
            assert metrics[f"{key}@{dim}"] == pytest.approx(theirs[key], abs=1e-4), (key, dim)
    assert all(metrics[f"{key}@384"] == pytest.approx(metrics[key], abs=1e-6) for key in METRICS)
    assert metrics["ndcg@10@64"] != metrics["ndcg@10"]

    assert main([str(tiny_st_dir), "--data", str(data_file), "--dims", "64,16"]) == 2
    assert "Matryoshka size 64 is larger than the embedding dimension 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_st_dir), "--dims", "0,16"])
    assert exit_info.value.code == 2
    assert "give positive embedding sizes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- distributed


def _distributed_worker(rank: int, world: int, model_dir: str, data: EvalData, out_dir: str) -> None:
    embedder, tokenizer, max_length = load_sentence_transformer_dir(model_dir)
    forwards: list[int] = []
    embedder.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    metrics = evaluate_embedder(embedder, tokenizer, max_length, data, 8, "cpu")
    # 9 texts in batches of 4: shards of 5 and 4 texts, 2 and 1 batches; rank 1 must run a dummy forward.
    uneven_start = len(forwards)
    uneven = encode_texts(embedder, tokenizer, data.texts[:9], max_length, 4, "cpu")
    uneven_forwards = len(forwards) - uneven_start
    # One text: rank 1's shard is empty, and it still runs the one forward rank 0 runs.
    single = encode_texts(embedder, tokenizer, data.texts[:1], max_length, 4, "cpu")
    torch.save({"metrics": metrics, "uneven": uneven, "single": single, "forwards": len(forwards),
                "uneven_forwards": uneven_forwards}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny_st_dir: Path, tmp_path: Path):
    data = load_eval_data(str(_eval_subset(tmp_path / "eval.jsonl", 40)))
    run_distributed(_distributed_worker, world_size=2, args=(str(tiny_st_dir), data, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    embedder, tokenizer, max_length = load_sentence_transformer_dir(str(tiny_st_dir))
    single_metrics = evaluate_embedder(embedder, tokenizer, max_length, data, 8, "cpu")
    single_uneven = encode_texts(embedder, tokenizer, data.texts[:9], max_length, 4, "cpu")
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # the same gathered embeddings on every rank
    for result in ranks:
        assert result["metrics"].keys() == single_metrics.keys()
        for key, value in single_metrics.items():
            # A random 2-layer BERT scores most documents within ~1e-4 of each other, so the ~1e-7 differences of
            # another batching can swap two documents deep in the top 100 (MAP@100); the top 10 stay put.
            assert result["metrics"][key] == pytest.approx(value, abs=1e-4 if key == "map@100" else 1e-6), key
        torch.testing.assert_close(result["uneven"], single_uneven, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["single"], single_uneven[:1], atol=1e-5, rtol=0)
        assert result["uneven_forwards"] == 2
    assert ranks[0]["forwards"] == ranks[1]["forwards"]  # ZeRO-3 safety: the same number of forwards everywhere


@pytest.mark.slow
def test_plain_torchrun_cli_matches_one_process(tmp_path: Path, launch_env):
    """`gist-scale eval` as 2 ranks under a bare torchrun (no ACCELERATE_USE_CPU, no GPU) scores like one process."""
    data = _eval_subset(tmp_path / "eval.jsonl", 48)
    args = [MINILM, "--data", str(data), "--batch-size", "16"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    result = subprocess.run(torchrun_command(2, "eval", *args, "--out", str(tmp_path / "two.json")),
                            env=launch_env("plain"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text())["model"] for name in ("one.json", "two.json"))
    assert two.keys() == one.keys() and "ndcg@10" in one
    assert two == pytest.approx(one, abs=1e-6)
