"""`gist-scale mine`: a brute-force reference, the margin rule, sentence-transformers' mine_hard_negatives, 2 ranks,
the guide cache, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import one_error_line, torchrun_command
from gist_scale import cli
from gist_scale.config import MINILM, DataConfig, GuideConfig, JobConfig
from gist_scale.data import sample_data_path
from gist_scale.metrics import top_k
from gist_scale.tools import mine as mine_mod
from gist_scale.tools.mine import MarginSweep, MineConfig, main, margin_grid, mine_negatives, query_blocks

datasets.disable_progress_bars()


def _embeddings(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def _problem(seed: int = 0, queries: int = 37, corpus: int = 300, dim: int = 16):
    """Random unit vectors. Every query's first positive is close to it, as in real pairs; a third of the queries
    have a second, random positive, whose low score sets a threshold that few candidates pass."""
    generator = torch.Generator().manual_seed(seed)
    q = _embeddings(queries, dim, generator)
    c = _embeddings(corpus, dim, generator)
    rng = np.random.default_rng(seed)
    positives = [rng.choice(corpus, size=rng.choice([1, 1, 2]), replace=False).tolist() for _ in range(queries)]
    for i, ids in enumerate(positives):
        c[ids[0]] = F.normalize(q[i] + 0.5 * c[ids[0]], dim=-1)
    return q, c, positives


def _with_own_texts(q, c, positives, every: int = 3) -> list[int]:
    """Every `every`-th query's own text becomes a corpus text (its embedding, not one of its positives): the
    candidate the guide ranks first, which must be excluded by identity. Returns each query's own corpus id or -1."""
    own = [-1] * q.shape[0]
    taken = {j for ids in positives for j in ids}
    free = iter(j for j in range(c.shape[0]) if j not in taken)
    for i in range(0, q.shape[0], every):
        own[i] = next(free)
        c[own[i]] = q[i]
    return own


def _reference(q, c, positives, cfg: MineConfig, own=None) -> list[list[int] | None]:
    """The rule, one query at a time with a full sort: the top range_max + P + 1 by score; drop the positives, the
    query's own text, and what the guide scores strictly above the (lowest) positive minus the margin; ranks counted
    among the survivors."""
    own = own or [-1] * q.shape[0]
    depth = min(cfg.range_max + max(map(len, positives)) + 1, c.shape[0])
    result = []
    for i in range(q.shape[0]):
        scores = (c @ q[i]).tolist()
        order = sorted(range(len(scores)), key=lambda j: -scores[j])[:depth]
        pos = min(scores[j] for j in positives[i])
        threshold = pos - cfg.margin if cfg.margin_strategy == "absolute" else pos - abs(pos) * cfg.margin
        survivors = [j for j in order if j not in positives[i] and j != own[i] and not scores[j] > threshold]
        window = survivors[cfg.range_min:cfg.range_max]
        result.append(window[:cfg.num_negatives] if len(window) >= cfg.num_negatives else None)
    return result


@pytest.mark.parametrize(("strategy", "margin"), [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05),
                                                  ("relative", -0.2)])
@pytest.mark.parametrize("own_texts", [False, True])
def test_top_negatives_equal_a_brute_force_reference(strategy, margin, own_texts):
    q, c, positives = _problem()
    own = _with_own_texts(q, c, positives) if own_texts else None
    cfg = MineConfig(num_negatives=4, range_min=3, range_max=40, margin=margin, margin_strategy=strategy,
                     sampling="top", query_block=5)
    # Small corpus blocks, so that the running top-k merge is exercised too.
    ids, scores, dropped = mine_negatives(q, c, positives, cfg, search=lambda x, k: top_k(x, c, k, corpus_block=16),
                                          own=own)
    want = _reference(q, c, positives, cfg, own)
    if own is not None:  # a query's own text is never its negative, though the guide ranks it first
        assert all(own[i] not in ids[i].tolist() for i in range(q.shape[0]) if own[i] >= 0)
    assert 0 < sum(w is None for w in want) < q.shape[0] // 2  # some queries are left without negatives
    for i, expected in enumerate(want):
        if expected is None:
            assert (ids[i] == -1).all() and scores[i].isnan().all(), i
        else:
            assert ids[i].tolist() == expected, i
            torch.testing.assert_close(scores[i], c[expected] @ q[i])
    assert int(dropped) > 0


@pytest.mark.parametrize("strategy", ["absolute", "relative"])
def test_the_drop_table_counts_what_mining_at_each_margin_does(strategy):
    """One mining pass at the chosen margin counts, for every margin of the grid, exactly the candidates and the
    queries that mining at that margin drops and leaves short."""
    q, c, positives = _problem(seed=3)
    own = _with_own_texts(q, c, positives)
    cfg = MineConfig(num_negatives=3, range_min=2, range_max=25, margin=0.05, margin_strategy=strategy,
                     sampling="top", query_block=6)
    sweep = MarginSweep(margin_grid(cfg.margin))
    assert sweep.margins == (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    ids, _, dropped = mine_negatives(q, c, positives, cfg, own=own, sweep=sweep)
    short = sweep.short(q.device)
    assert short.shape == (q.shape[0], 7) and short.dtype == torch.uint8
    assert int(sweep.dropped(q.device)[3]) == int(dropped)
    for g, margin in enumerate(sweep.margins):
        at = MineConfig(**{**cfg.__dict__, "margin": margin})
        ids, _, dropped = mine_negatives(q, c, positives, at, own=own)
        want = _reference(q, c, positives, at, own)
        assert int(sweep.dropped(q.device)[g]) == int(dropped), margin
        assert short[:, g].tolist() == [int(w is None) for w in want] == (ids[:, 0] < 0).int().tolist(), margin
    # A larger margin lowers every threshold: it drops more, and leaves more queries short (here: it does).
    counts, rows_short = sweep.dropped(q.device).tolist(), short.sum(0).tolist()
    assert counts == sorted(counts) and rows_short == sorted(rows_short)
    assert counts[0] < counts[-1] and rows_short[0] < rows_short[-1]
    # A rank given no query blocks counts zeros of the grid's shape, which the reduction over ranks needs.
    empty = MarginSweep((0.0, 0.1))
    mine_negatives(q, c, positives, cfg, blocks=[], sweep=empty)
    assert empty.dropped(q.device).tolist() == [0, 0] and empty.short(q.device).shape == (0, 2)


@pytest.mark.parametrize("field, value, message", [
    ("margin_strategy", "percent", "--margin-strategy 'percent': use one of absolute, relative"),
    ("sampling", "best", "--sampling 'best': use random or top"),
    ("index", "annoy", "--index 'annoy': use torch or faiss"),
])
def test_a_mine_config_built_in_python_refuses_an_unknown_choice(field, value, message):
    """The parser rejects these on the command line; a MineConfig built in Python must not mine with a fallback."""
    with pytest.raises(ValueError, match=re.escape(message)):
        MineConfig(**{field: value})


def test_margin_grid_brackets_the_chosen_margin():
    assert margin_grid(0.0) == (0.0, 0.005, 0.01, 0.02)
    assert margin_grid(0.03) == (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
    assert margin_grid(1.0) == (0.1, 0.2, 0.5, 1.0)
    assert margin_grid(-0.1) == (-0.1, 0.0, 0.005, 0.01)


def test_random_draw_is_uniform_over_the_allowed_ranks_and_independent_of_the_blocks():
    q, c, positives = _problem(seed=1)
    top = MineConfig(num_negatives=3, range_min=2, range_max=12, margin=0.0, sampling="top", query_block=4)
    window = MineConfig(num_negatives=10, range_min=2, range_max=12, margin=0.0, sampling="top", query_block=4)
    allowed, _, _ = mine_negatives(q, c, positives, window)
    cfg = MineConfig(num_negatives=3, range_min=2, range_max=12, margin=0.0, sampling="random", seed=7, query_block=4)
    ids, scores, _ = mine_negatives(q, c, positives, cfg)
    blocks = math.ceil(q.shape[0] / 4)
    parts = [mine_negatives(q, c, positives, cfg, blocks=range(b, min(b + 3, blocks)))[0] for b in range(0, blocks, 3)]
    assert torch.equal(torch.cat(parts), ids)  # any split of the blocks over ranks draws the same negatives
    full = allowed[:, 0] >= 0
    assert full.sum() >= 10
    for i in torch.nonzero(full).flatten().tolist():
        assert set(ids[i].tolist()) <= set(allowed[i].tolist())
        assert (scores[i][:-1] >= scores[i][1:]).all()  # written best first
    assert not torch.equal(ids, mine_negatives(q, c, positives, top)[0])
    assert not torch.equal(ids, mine_negatives(q, c, positives, MineConfig(**{**cfg.__dict__, "seed": 8}))[0])

    # Each of a query's 10 allowed candidates is drawn with probability 3/10.
    i = int(torch.nonzero(full)[0])
    counts = dict.fromkeys(allowed[i].tolist(), 0)
    draws = 400
    for seed in range(draws):
        for j in mine_negatives(q[i:i + 1], c, positives[i:i + 1], MineConfig(**{**cfg.__dict__, "seed": seed}))[0][0]:
            counts[int(j)] += 1
    # Binomial(400, 0.3): standard deviation 9.2 draws; 4 of them is a 1-in-15,000 miss per candidate.
    assert all(abs(n - 0.3 * draws) < 4 * math.sqrt(draws * 0.3 * 0.7) for n in counts.values()), counts


def test_faiss_index_gives_the_same_negatives():
    # faiss-cpu is in the [dev] extra: a missing faiss fails here rather than skipping the check.
    q, c, positives = _problem(seed=2)
    cfg = MineConfig(num_negatives=3, range_min=1, range_max=30, margin=0.05, margin_strategy="relative",
                     sampling="top", query_block=8)
    want = mine_negatives(q, c, positives, cfg)
    got = mine_negatives(q, c, positives, cfg, search=mine_mod._faiss_search(c, 40))
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], equal_nan=True)


def test_query_blocks_cover_every_query_once():
    for queries, block, world in [(10, 3, 2), (10, 3, 5), (2, 8, 3), (1024, 1024, 2)]:
        parts = [query_blocks(queries, block, world, rank) for rank in range(world)]
        sizes = parts[0][1]
        assert all(p[1] == sizes for p in parts) and sum(sizes) == queries
        assert [b for p in parts for b in p[0]] == list(range(math.ceil(queries / block)))


# ------------------------------------------------------------------------------------------- end to end


def _pairs(tmp_path: Path, rows: int) -> Path:
    """The first `rows` rows of the shipped sample, as pairs (query, pos, task_name): no negatives."""
    out = tmp_path / "pairs.jsonl"
    lines = sample_data_path("train").read_text().splitlines()[:rows]
    out.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "neg"}) + "\n"
                           for line in lines))
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_no_mined_negative_breaks_the_margin_rule(tmp_path):
    """Checked with the guide's scores recomputed by sentence-transformers, not with the scores the file reports;
    the guide runs in bf16 (the default), so its scores are within bf16 rounding of the fp32 recomputation."""
    from sentence_transformers import SentenceTransformer

    from gist_scale.model import resolve_model_path

    pairs, out = _pairs(tmp_path, 250), tmp_path / "mined.jsonl"
    margin = 0.1
    assert main(["--data.path", str(pairs), "--guide.name", MINILM, "--num-negatives", "3", "--range-min", "2",
                 "--range-max", "40", "--margin", str(margin), "--margin-strategy", "relative", "--out", str(out),
                 "--query-block", "64"]) == 0
    rows = _read(out)
    assert 60 < len(rows) <= 250
    model = SentenceTransformer(resolve_model_path(MINILM), device="cpu")

    def embed(texts):
        return model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, batch_size=64)

    q, p = embed([r["query"] for r in rows]), embed([r["pos"] for r in rows])
    n = embed([t for r in rows for t in r["neg"]]).reshape(len(rows), 3, -1)
    pos = (q * p).sum(-1)
    neg = torch.einsum("bd,bkd->bk", q, n)
    threshold = pos - pos.abs() * margin
    assert (neg <= threshold[:, None] + 0.02).all()
    torch.testing.assert_close(pos, torch.tensor([r["pos_score"] for r in rows]), atol=0.02, rtol=0)
    torch.testing.assert_close(neg, torch.tensor([r["neg_scores"] for r in rows]), atol=0.02, rtol=0)
    # The file's own scores, which the rule was applied to, obey it exactly.
    written = torch.tensor([r["pos_score"] for r in rows])
    assert (torch.tensor([r["neg_scores"] for r in rows]) <= (written - written.abs() * margin)[:, None] + 1e-6).all()
    positives = {}
    for r in _read(pairs):
        positives.setdefault(r["query"], set()).add(r["pos"])
    assert all(not positives[r["query"]] & set(r["neg"]) for r in rows)  # never a positive of the query
    assert all(len(set(r["neg"])) == 3 for r in rows)


def test_matches_sentence_transformers_mine_hard_negatives(tmp_path):
    """Same model (all-MiniLM-L6-v2 in fp32), same settings, sampling "top": the same negatives for every pair."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from gist_scale.model import resolve_model_path

    pairs, out, extra = _pairs(tmp_path, 200), tmp_path / "mined.jsonl", tmp_path / "extra.jsonl"
    eval_rows = _read(sample_data_path("eval"))[:100]
    extra.write_text("".join(json.dumps({"text": r["pos"]}) + "\n" for r in eval_rows))
    settings = dict(range_min=2, range_max=30, num_negatives=3)
    assert main(["--data.path", str(pairs), "--guide.name", MINILM, "--guide.dtype", "fp32", "--corpus", str(extra),
                 "--num-negatives", "3", "--range-min", "2", "--range-max", "30", "--margin", "0.05",
                 "--margin-strategy", "relative", "--sampling", "top", "--out", str(out)]) == 0
    ours = {(r["query"], r["pos"]): r for r in _read(out)}

    model = SentenceTransformer(resolve_model_path(MINILM), device="cpu")
    pair_rows = _read(pairs)
    reference = mine_hard_negatives(
        datasets.Dataset.from_list([{"query": r["query"], "pos": r["pos"]} for r in pair_rows]), model,
        anchor_column_name="query", positive_column_name="pos", corpus=[r["pos"] for r in eval_rows],
        relative_margin=0.05, sampling_strategy="top", output_format="n-tuple", output_scores=True,
        batch_size=64, verbose=False, **settings)
    theirs = {(r["query"], r["pos"]): r for r in reference}
    assert len(theirs) > 60
    assert set(ours) == set(theirs)
    for key, row in theirs.items():
        assert ours[key]["neg"] == [row[f"negative_{i}"] for i in (1, 2, 3)], key
        torch.testing.assert_close(torch.tensor([ours[key]["pos_score"], *ours[key]["neg_scores"]]),
                                   torch.tensor(row["scores"]), atol=1e-5, rtol=0)


def test_trains_on_the_mined_file(tmp_path, tiny_model_dir, capsys):
    """The output is MEDI triplets that `gist-scale train` reads with its defaults (K = 2 list-valued negatives).
    The drop table is printed before the file is written, and its chosen row is what the run did."""
    from gist_scale.data import load_triplets

    out, stats = tmp_path / "mined.jsonl", tmp_path / "stats.json"
    assert main(["--data.path", str(_pairs(tmp_path, 200)), "--guide.name", str(tiny_model_dir), "--range-max", "60",
                 "--num-negatives", "2", "--out", str(out), "--stats", str(stats)]) == 0
    err = capsys.readouterr().err
    assert err.index("margin rule (absolute)") < err.index("-> 0 ") < err.index(f"wrote {len(_read(out))} rows")
    record = json.loads(stats.read_text())
    table = {row["margin"]: row for row in record["drop_table"]}
    assert list(table) == [0.0, 0.005, 0.01, 0.02]
    assert table[0.0]["dropped"] == record["margin_dropped"]
    assert table[0.0]["rows_without_negatives"] == record["rows"] - record["rows_written"]
    dataset, report = load_triplets(DataConfig(path=str(out)))
    assert report.num_negatives == 2 and len(dataset) == len(_read(out)) > 50
    assert set(report.tasks) <= {r["task_name"] for r in _read(sample_data_path("train"))}


def test_a_rows_listed_positives_are_never_its_negatives(tmp_path, tiny_model_dir):
    """With `--data.num_positives 2` the second listed positive of "cats" (also the positive of another row, so a
    corpus text) is excluded like the first; with one positive it is an ordinary candidate. The margin is disabled
    and every candidate drawn, so only the positives rule decides."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"query": "cats", "pos": ["a cat", "a kitten"]}, {"query": "kittens", "pos": "a kitten"},
            *({"query": f"query {i}", "pos": f"document {i}"} for i in range(6))]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    negatives = {}
    for positives in (1, 2):
        out = tmp_path / f"mined{positives}.jsonl"
        # 8 corpus texts: "cats" has 7 candidates with one positive, 6 with two.
        assert main(["--data.path", str(pairs), "--data.task_column", "null", "--data.num_positives", str(positives),
                     "--guide.name", str(tiny_model_dir), "--num-negatives", "6", "--sampling", "top", "--margin",
                     "-10", "--out", str(out)]) == 0
        negatives[positives] = next(r["neg"] for r in _read(out) if r["query"] == "cats")
    assert "a kitten" in negatives[1] and "a kitten" not in negatives[2] and "a cat" not in negatives[2]


def test_a_guide_cache_replaces_the_guide(tmp_path, tiny_model_dir):
    """Built with cache-guide on the same pairs, the cache gives the queries' and positives' embeddings (fp16) and
    the guide is not even loaded when there is no extra corpus (its directory is gone)."""
    from gist_scale.data import load_triplets
    from gist_scale.evaluation.data import retrieval_task
    from gist_scale.guide_cache import build_guide_cache

    guide = tmp_path / "guide"
    shutil.copytree(tiny_model_dir, guide)
    pairs = _pairs(tmp_path, 120)
    data = DataConfig(path=str(pairs), neg_columns=[])
    job = JobConfig(guide=GuideConfig(name=str(guide), dtype="fp32"), data=data)
    build_guide_cache(job, tmp_path / "cache", rows_per_batch=50, chunk_size=16)
    dataset, report = load_triplets(data)
    task = retrieval_task(dataset, (), report.source)
    rows_q, rows_p, _ = mine_mod._row_pairs(dataset, task)
    want_q, want_c, embedded = mine_mod._embed(job, task, rows_q, rows_p, dataset, 32, torch.device("cpu"))
    assert embedded == len(task.texts)
    cached = JobConfig(guide=GuideConfig(name=str(guide), dtype="fp32", cache=str(tmp_path / "cache")), data=data)
    got_q, got_c, embedded = mine_mod._embed(cached, task, rows_q, rows_p, dataset, 32, torch.device("cpu"))
    assert embedded == 0
    torch.testing.assert_close(got_q, want_q, atol=2e-3, rtol=0)
    torch.testing.assert_close(got_c, want_c, atol=2e-3, rtol=0)

    shutil.rmtree(guide)
    out = tmp_path / "mined.jsonl"
    assert main(["--data.path", str(pairs), "--guide.name", str(guide), "--guide.dtype", "fp32", "--guide.cache",
                 str(tmp_path / "cache"), "--range-max", "60", "--num-negatives", "2", "--out", str(out)]) == 0
    assert len(_read(out)) > 30


# ------------------------------------------------------------------------------------------- bad input


def _fails(capsys, *argv: str) -> str:
    return one_error_line(main, capsys, *argv)


def test_bad_input_fails_with_one_line_naming_the_source(tmp_path, tiny_model_dir, capsys):
    pairs, out = _pairs(tmp_path, 20), tmp_path / "mined.jsonl"
    common = ["--data.path", str(pairs), "--guide.name", str(tiny_model_dir), "--out", str(out)]
    wrong = tmp_path / "corpus.jsonl"
    wrong.write_text('{"document": "a text"}\n')
    assert f"--corpus {wrong}: no 'text' column (columns: document)" in _fails(capsys, *common, "--corpus", str(wrong))
    message = _fails(capsys, *common, "--num-negatives", "20", "--range-min", "10", "--range-max", "20")
    assert "--num-negatives 20 is more than the 10 ranks allowed by --range-min 10 --range-max 20" in message
    for content in ("", "\n\n"):  # empty, or only blank lines
        empty = tmp_path / "empty.jsonl"
        empty.write_text(content)
        message = _fails(capsys, "--data.path", str(empty), "--guide.name", str(tiny_model_dir), "--out", str(out))
        assert f"{empty}: " in message and ("empty file" in message or "no rows" in message), message
    no_pos = tmp_path / "queries.jsonl"
    no_pos.write_text('{"query": "a question", "task_name": "t"}\n')
    message = _fails(capsys, "--data.path", str(no_pos), "--guide.name", str(tiny_model_dir), "--out", str(out))
    assert f"{no_pos}:1: field 'pos': missing" in message
    assert not out.exists()


def test_an_existing_out_is_never_damaged(tmp_path, tiny_model_dir, capsys, monkeypatch):
    pairs, out = _pairs(tmp_path, 60), tmp_path / "mined.jsonl"
    out.write_text("precious\n")
    common = ["--data.path", str(pairs), "--guide.name", str(tiny_model_dir), "--out", str(out), "--range-max", "60",
              "--num-negatives", "1"]
    assert f"--out {out} exists: pass --overwrite" in _fails(capsys, *common)
    calls = []

    def failing_dumps(*args, **kwargs):  # the disk fills up after a few rows
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return json.dumps(*args, **kwargs)

    monkeypatch.setattr(mine_mod, "json", type("json", (), {"dumps": staticmethod(failing_dumps)}))
    assert "No space left on device" in _fails(capsys, *common, "--overwrite")
    assert out.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mined.jsonl", "pairs.jsonl"]
    monkeypatch.undo()
    assert main([*common, "--overwrite"]) == 0 and len(_read(out)) > 20


def test_command_is_registered():
    assert cli.COMMANDS["mine"][0] == "gist_scale.tools.mine"


# ------------------------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
def test_two_ranks_write_the_same_file_as_one(tmp_path, launch_env):
    """all-MiniLM-L6-v2, whose scores are spread out: the random tiny BERT scores every pair within a few hundredths,
    so float noise between the ranks' batchings could swap near-tied candidates. Under a bare torchrun (no
    ACCELERATE_USE_CPU), which on a machine without a GPU gets the same CPU setup as with it (`test_launch_plan`)."""
    pairs = _pairs(tmp_path, 200)
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(r["pos"] for r in _read(sample_data_path("eval"))[:61]) + "\n")  # plain lines
    args = ["--data.path", str(pairs), "--guide.name", MINILM, "--guide.dtype", "fp32", "--corpus",
            str(extra), "--num-negatives", "3", "--range-min", "1", "--range-max", "50", "--margin", "0.02",
            "--sampling", "random", "--seed", "3", "--query-block", "32"]
    assert main([*args, "--out", str(tmp_path / "one.jsonl"), "--stats", str(tmp_path / "one.json")]) == 0
    result = subprocess.run(torchrun_command(2, "mine", *args, "--out", str(tmp_path / "two.jsonl"), "--stats",
                                             str(tmp_path / "two.json")),
                            env=launch_env("plain"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stderr
    # The drop table is reduced over the ranks' query blocks: the same table as one process counts.
    tables = [json.loads((tmp_path / name).read_text())["drop_table"] for name in ("one.json", "two.json")]
    assert tables[0] == tables[1] and len(tables[0]) == 7 and tables[0][3]["margin"] == 0.02
    one, two = _read(tmp_path / "one.jsonl"), _read(tmp_path / "two.jsonl")
    assert len(one) > 60
    # The texts are identical; the scores may differ in the last written digit (the ranks' batches pad differently).
    texts = [[{k: v for k, v in r.items() if k not in ("pos_score", "neg_scores")} for r in rows]
             for rows in (one, two)]
    assert texts[0] == texts[1]
    scores = [torch.tensor([[r["pos_score"], *r["neg_scores"]] for r in rows]) for rows in (one, two)]
    torch.testing.assert_close(scores[1], scores[0], atol=2e-6, rtol=0)
