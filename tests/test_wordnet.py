"""The WordNet triplet builder: the data-file parser, and builds from the installed WordNet 3.0."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gist_scale import cli
from gist_scale.config import DataConfig
from gist_scale.data import load_triplets, sample_data_path
from gist_scale.tools.wordnet import DEFAULT_WORDNET_DIR, build_triplets, load_wordnet, parse_gloss, parse_line

needs_wordnet = pytest.mark.skipif(
    not (DEFAULT_WORDNET_DIR / "data.noun").is_file(),
    reason=f"WordNet 3.0 is not installed at {DEFAULT_WORDNET_DIR} (Debian: apt-get install wordnet-base)")

BREATHE = ("00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 003 @ 02108395 v 0000 "
           "+ 03110323 a 0301 ~ 00002573 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "
           '"I can breathe better when the air is clean"; "The patient is respiring"; "gasp"  ')
SATELLITE = ("00002956 00 s 01 abducent 0 001 & 00002527 a 0000 | especially of muscles; "
             '"abducent muscles draw the limb away"  ')


@pytest.fixture(scope="module")
def synsets() -> dict:
    """The installed WordNet, parsed once for this module (only tests marked `needs_wordnet` use it)."""
    return load_wordnet(DEFAULT_WORDNET_DIR)


def test_parse_line_reads_lexname_gloss_and_parents() -> None:
    verb = parse_line(BREATHE)
    assert verb.key == ("v", "00001740") and verb.lexname == "verb.body"
    assert verb.definition == "draw air into, and expel out of, the lungs"
    assert verb.examples == ("I can breathe better when the air is clean", "The patient is respiring")  # "gasp": short
    assert verb.parents == (("v", "02108395"),)  # only the hypernym, not the derivation or hyponym pointers
    satellite = parse_line(SATELLITE)
    assert satellite.key == ("a", "00002956") and satellite.parents == (("a", "00002527"),)
    with pytest.raises(ValueError, match="gloss"):
        parse_line("00001740 29 v 01 breathe 0 000")


def test_parse_gloss_without_examples() -> None:
    assert parse_gloss("a separate and self-contained entity  ") == ("a separate and self-contained entity", ())


@needs_wordnet
def test_build_is_deterministic_balanced_and_held_out(synsets: dict) -> None:
    built = build_triplets(synsets, num_train=512, num_eval=128, seed=0, num_tasks=4)
    assert built == build_triplets(synsets, num_train=512, num_eval=128, seed=0, num_tasks=4)
    assert built.train != build_triplets(synsets, num_train=512, num_eval=128, seed=1, num_tasks=4).train
    assert Counter(r["task_name"] for r in built.train) == dict.fromkeys(built.tasks, 128)
    assert Counter(r["task_name"] for r in built.eval) == dict.fromkeys(built.tasks, 32)
    assert all(set(r) == {"query", "pos", "neg", "task_name"} and r["pos"] != r["neg"] for r in built.train)
    train_texts = {r[f] for r in built.train for f in ("query", "pos", "neg")}
    assert not train_texts & {r[f] for r in built.eval for f in ("query", "pos", "neg")}


@needs_wordnet
def test_shipped_sample_is_the_default_build(synsets: dict) -> None:
    built = build_triplets(synsets, num_train=4096, num_eval=512, seed=0, num_tasks=8)
    for split, rows in (("train", built.train), ("eval", built.eval)):
        assert sample_data_path(split).read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in rows]
    notice = (sample_data_path("train").parent / "LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in notice


@needs_wordnet
def test_cli_writes_a_loadable_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wordnet"
    assert cli.main(["data", "wordnet", str(out), "--train", "96", "--eval", "32", "--tasks", "2",
                     "--seed", "3"]) == 0
    assert "wrote 96 train and 32 eval triplets over 2 tasks" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "README.md", "eval.jsonl", "train.jsonl"]
    assert "--train 96 --eval 32 --tasks 2 --seed 3" in (out / "README.md").read_text()
    held_out, report = load_triplets(DataConfig(path=str(out)), split="eval")
    assert len(held_out) == 32 and len(report.tasks) == 2


@needs_wordnet
def test_holdout_lexnames_make_an_ood_split_disjoint_from_train_and_eval(synsets: dict) -> None:
    holdout = ("noun.artifact", "verb.social")
    built = build_triplets(synsets, num_train=512, num_eval=128, seed=0, num_tasks=4, holdout_lexnames=holdout,
                           num_ood=64)
    assert built == build_triplets(synsets, num_train=512, num_eval=128, seed=0, num_tasks=4,
                                   holdout_lexnames=holdout, num_ood=64)
    assert built.ood_tasks == list(holdout) and not set(built.tasks) & set(holdout)
    assert Counter(r["task_name"] for r in built.ood) == dict.fromkeys(holdout, 32)
    assert all(r["pos"] != r["neg"] for r in built.ood)

    def texts(rows: list[dict]) -> set[str]:
        return {r[f] for r in rows for f in ("query", "pos", "neg")}

    def synset_texts(held: bool) -> set[str]:
        return {t for s in synsets.values() if (s.lexname in holdout) == held for t in (s.definition, *s.examples)}

    # Every ood text comes from a held-out synset, every train and eval text from another one, and none is shared.
    assert texts(built.ood) <= synset_texts(held=True)
    assert texts(built.train) | texts(built.eval) <= synset_texts(held=False)
    assert not texts(built.ood) & (texts(built.train) | texts(built.eval))
    assert not texts(built.train) & texts(built.eval)


@needs_wordnet
def test_cli_writes_the_ood_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wordnet"
    assert cli.main(["data", "wordnet", str(out), "--train", "96", "--eval", "32", "--tasks", "2",
                     "--holdout-lexnames", "noun.person,verb.social", "--ood", "20"]) == 0
    assert "and 20 ood triplets of noun.person, verb.social," in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "README.md", "eval.jsonl", "ood.jsonl", "train.jsonl"]
    readme = (out / "README.md").read_text()
    assert "--holdout-lexnames noun.person,verb.social --ood 20" in readme and "| noun.person | 10 |" in readme
    ood, report = load_triplets(DataConfig(path=str(out / "ood.jsonl")))
    assert len(ood) == 20 and sorted(report.tasks) == ["noun.person", "verb.social"]
    train, _ = load_triplets(DataConfig(path=str(out)))  # the folder's train split leaves ood.jsonl out
    assert len(train) == 96


def test_cli_refuses_an_unknown_lexname(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "wordnet", str(tmp_path), "--holdout-lexnames", "noun.plant,noun.animl"])
    assert exit_.value.code == 2
    assert "'noun.animl' is not a WordNet lexicographer file; did you mean 'noun.animal'?" in capsys.readouterr().err


def test_cli_reports_a_missing_wordnet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "wordnet", str(tmp_path / "out"), "--wordnet-dir", str(tmp_path)]) == 1
    assert "no data.noun" in capsys.readouterr().err
