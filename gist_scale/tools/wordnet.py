"""`gist-scale data wordnet OUT_DIR`: real (query, positive, hard negative) triplets built from WordNet 3.0.

The shipped sample (`gist_scale/sample_data/wordnet/`) is this builder's output with its default arguments, so the
quickstart trains and evaluates on real text without network access. Each row is

- query: a synset's definition (the gloss before its first quoted example),
- pos: one of that synset's example sentences,
- neg: an example sentence of a sibling synset (another child of the same hypernym, or for adjective satellites of
  the same head adjective): close in meaning, so it is a genuinely hard negative,
- task_name: the synset's lexicographer file (`verb.motion`, `noun.act`, ...): the largest files give several tasks
  with enough rows each for task-homogeneous batches.

The held-out `eval` split takes whole sibling families (all children of a hypernym), so no synset of an eval row,
whether as query, positive or negative, occurs anywhere in `train`. Everything is deterministic given `--seed`.

`--holdout-lexnames noun.artifact,verb.social` also writes an out-of-distribution split, `ood.jsonl`: rows built
only from the synsets of those lexicographer files (query, positive and negative), which `train` and `eval` never
use, nor any text of an `ood` row. It measures what training does to text outside the training tasks.

The data files are parsed directly (`wndb(5WN)`: one synset per line, pointers, then `| gloss`), so the only
requirement is the WordNet database, e.g. Debian's `wordnet-base` at /usr/share/wordnet.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")

# lexnames(5WN): lexicographer file number -> name; WordNet 3.0 ships no machine-readable copy in wordnet-base.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
DATA_FILES = ("noun", "verb", "adj", "adv")
MIN_EXAMPLE_WORDS = 3
"""Shorter examples ("to swim") say too little to be a useful positive or negative."""
MAX_EVAL_FAMILY = 30
"""Only families this small are held out, so reserving a family for eval costs train few synsets."""

SynsetKey = tuple[str, str]
"""(data file POS `n`/`v`/`a`/`r`, byte offset): offsets are unique only within one data file."""


@dataclass(frozen=True)
class Synset:
    """The parts of one data-file line that the triplets need."""

    key: SynsetKey
    lexname: str
    definition: str
    examples: tuple[str, ...]
    parents: tuple[SynsetKey, ...]
    """Hypernyms (`@`, `@i`) of nouns and verbs; the head adjective (`&`) of an adjective satellite."""


def _file_pos(ss_type: str) -> str:
    """Satellites (`s`) live in data.adj, whose offsets they share with head adjectives (`a`)."""
    return "a" if ss_type == "s" else ss_type


def parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Split a gloss into its definition and its quoted example sentences (too-short examples are dropped)."""
    definition = gloss.partition('"')[0].strip().rstrip(";").strip()
    # The definition holds no quote, so every quoted part of the gloss is an example.
    examples = tuple(e.strip() for e in re.findall(r'"([^"]*)"', gloss) if len(e.split()) >= MIN_EXAMPLE_WORDS)
    return definition, examples


def parse_line(line: str) -> Synset:
    """Parse one synset line: `offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt (ptr)* [frames] | gloss`."""
    head, sep, gloss = line.partition(" | ")
    if not sep:
        raise ValueError("no ' | ' before the gloss")
    fields = head.split()
    offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
    i = 4 + 2 * int(fields[3], 16)  # p_cnt, after w_cnt (hexadecimal) words and their lex_ids
    # Each pointer is `symbol offset pos source/target`.
    pointers = [fields[j:j + 4] for j in range(i + 1, i + 1 + 4 * int(fields[i]), 4)]
    parents = tuple((_file_pos(target_pos), target) for symbol, target, target_pos, _ in pointers
                    if symbol in ("@", "@i") or (ss_type == "s" and symbol == "&"))
    return Synset((_file_pos(ss_type), offset), LEXNAMES[lex_filenum], *parse_gloss(gloss), parents)


def iter_synsets(path: Path) -> Iterator[Synset]:
    """Every synset of one data file; the license header lines start with two spaces."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  "):
                continue
            try:
                yield parse_line(line.rstrip("\n"))
            except (ValueError, IndexError) as error:
                raise ValueError(f"{path}:{number}: not a WordNet data line ({error})") from error


def load_wordnet(wordnet_dir: Path) -> dict[SynsetKey, Synset]:
    """All synsets of data.noun, data.verb, data.adj and data.adv, by key."""
    missing = [name for name in DATA_FILES if not (wordnet_dir / f"data.{name}").is_file()]
    if missing:
        raise FileNotFoundError(f"{wordnet_dir}: no data.{missing[0]}; install WordNet 3.0 (Debian: apt-get install "
                                "wordnet-base) or pass --wordnet-dir DIR")
    return {s.key: s for name in DATA_FILES for s in iter_synsets(wordnet_dir / f"data.{name}")}


def license_text(wordnet_dir: Path) -> str:
    """The Princeton WordNet 3.0 license, exactly as the header of data.noun carries it."""
    with (wordnet_dir / "data.noun").open(encoding="utf-8") as f:
        header = itertools.takewhile(lambda line: line.startswith("  "), f)
        return "\n".join(re.sub(r"^\s+\d+ ?", "", line).rstrip() for line in header).strip() + "\n"


@dataclass
class WordNetTriplets:
    """The splits, plus what the README reports about them."""

    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    tasks: list[str]
    ood: list[dict[str, str]] = field(default_factory=list)
    """Rows of the held-out lexicographer files (`holdout_lexnames`); empty without them."""
    ood_tasks: list[str] = field(default_factory=list)
    """The held-out lexicographer files, in the order given (never among `tasks`)."""


def _split_quota(total: int, parts: int) -> list[int]:
    """`total` rows over `parts` tasks, as evenly as possible (the first tasks take the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _children(synsets: dict[SynsetKey, Synset]) -> dict[SynsetKey, list[SynsetKey]]:
    """Each parent's children among `synsets`, in key order."""
    children: dict[SynsetKey, list[SynsetKey]] = defaultdict(list)
    for key in sorted(synsets):
        for parent in synsets[key].parents:
            children[parent].append(key)
    return children


def _texts(rows: Sequence[dict[str, str]]) -> set[str]:
    return {row[f] for row in rows for f in ("query", "pos", "neg")}


def build_ood(synsets: dict[SynsetKey, Synset], lexnames: Sequence[str], num_rows: int,
              seed: int) -> list[dict[str, str]]:
    """Rows of the lexicographer files `lexnames` only, an equal share from each: a synset's definition, one of its
    examples, and an example of a sibling synset of the same files (so no other synset's text is used)."""
    rng = random.Random(seed)
    held = {key: s for key, s in synsets.items() if s.lexname in lexnames}
    children = _children(held)

    def negatives(key: SynsetKey) -> list[str]:
        own = held[key].examples
        return sorted({e for p in held[key].parents for c in children[p] if c != key
                       for e in held[c].examples if e not in own})

    rows: list[dict[str, str]] = []
    for lexname, need in zip(lexnames, _split_quota(num_rows, len(lexnames))):
        pool = [k for k in sorted(held) if held[k].lexname == lexname and held[k].definition and held[k].examples
                and negatives(k)]
        if len(pool) < need:
            raise ValueError(f"{lexname} has only {len(pool)} usable synsets, {need} asked; lower --ood or hold out "
                             "more lexicographer files")
        rows += [{"query": held[key].definition, "pos": rng.choice(held[key].examples),
                  "neg": rng.choice(negatives(key)), "task_name": lexname} for key in rng.sample(pool, need)]
    rng.shuffle(rows)
    return rows


def build_triplets(synsets: dict[SynsetKey, Synset], num_train: int, num_eval: int, seed: int,
                   num_tasks: int, holdout_lexnames: Sequence[str] = (), num_ood: int = 0) -> WordNetTriplets:
    """Sample the splits: the out-of-distribution rows of `holdout_lexnames` (if any) first, then eval from
    held-out sibling families, then train from everything else.

    Tasks are the `num_tasks` lexicographer files with the most usable synsets, each taking an equal share of the
    rows (4096 / 8 = 512 = 16 batches of 32), so task-homogeneous batching drops nothing at the default sizes.
    Synsets of `holdout_lexnames` are left out of train and eval (as query, positive and negative), and so are the
    texts of the ood rows. Without `holdout_lexnames` the draws are those of the shipped sample.
    """
    ood = build_ood(synsets, holdout_lexnames, num_ood, seed) if holdout_lexnames else []
    synsets = {key: s for key, s in synsets.items() if s.lexname not in holdout_lexnames}
    rng = random.Random(seed)
    children = _children(synsets)

    # Texts of eval (and ood) rows, filled once eval is drawn: train avoids them too, because a few definitions and
    # examples repeat across synsets and would otherwise leak held-out text into train.
    held_out: set[str] = _texts(ood)

    def examples(key: SynsetKey) -> list[str]:
        return [e for e in synsets[key].examples if e not in held_out]

    def usable(key: SynsetKey) -> bool:
        s = synsets[key]
        return bool(s.definition) and s.definition not in held_out and bool(examples(key))

    def siblings(key: SynsetKey, family: SynsetKey | None, exclude: set[SynsetKey]) -> list[SynsetKey]:
        """Other usable children of `family`, or of any parent when `family` is None, minus `exclude`; each has
        an example that is not also one of `key`'s, so it always yields a negative distinct from the positive."""
        parents = [family] if family is not None else list(synsets[key].parents)
        own = set(examples(key))
        return sorted({c for p in parents for c in children[p] if c != key and c not in exclude and usable(c)
                       and any(e not in own for e in examples(c))})

    by_task = Counter(synsets[k].lexname for k in sorted(synsets) if usable(k) and siblings(k, None, set()))
    tasks = sorted(by_task, key=lambda t: (-by_task[t], t))[:num_tasks]
    if len(tasks) < num_tasks:
        raise ValueError(f"WordNet has only {len(tasks)} usable lexicographer files; lower --tasks")
    eval_need = dict(zip(tasks, _split_quota(num_eval, num_tasks)))

    def triplet(key: SynsetKey, negatives: list[SynsetKey]) -> dict[str, str]:
        pos = rng.choice(examples(key))
        options = [e for n in negatives for e in examples(n) if e != pos]
        return {"query": synsets[key].definition, "pos": pos, "neg": rng.choice(options),
                "task_name": synsets[key].lexname}

    # Eval: whole small families, so each eval query's negatives (its siblings there) are held out with it.
    families = sorted(children)
    rng.shuffle(families)
    reserved: set[SynsetKey] = set()
    eval_rows: list[dict[str, str]] = []
    for family in families:
        kids = children[family]
        if len(kids) > MAX_EVAL_FAMILY or sum(eval_need.values()) == 0:
            continue
        candidates = [k for k in kids if k not in reserved and synsets[k].lexname in eval_need and usable(k)
                      and siblings(k, family, set())]
        if not candidates or any(eval_need[synsets[k].lexname] == 0 for k in candidates):
            continue
        reserved.update(kids)
        for key in candidates:
            if eval_need[synsets[key].lexname] > 0:
                eval_need[synsets[key].lexname] -= 1
                eval_rows.append(triplet(key, siblings(key, family, set())))
    if sum(eval_need.values()):
        raise ValueError(f"not enough held-out families for --eval {num_eval}; lower --eval")
    held_out.update(_texts(eval_rows))

    # Train: one row per synset, never touching a synset reserved for eval (as query or as negative).
    train_rows: list[dict[str, str]] = []
    for task, need in zip(tasks, _split_quota(num_train, num_tasks)):
        pool = [k for k in sorted(synsets) if synsets[k].lexname == task and k not in reserved and usable(k)
                and siblings(k, None, reserved)]
        if len(pool) < need:
            raise ValueError(f"{task} has only {len(pool)} usable synsets outside eval, {need} asked; lower --train or "
                             "--tasks")
        train_rows += [triplet(key, siblings(key, None, reserved)) for key in rng.sample(pool, need)]
    rng.shuffle(train_rows)
    rng.shuffle(eval_rows)
    return WordNetTriplets(train_rows, eval_rows, tasks, ood, list(holdout_lexnames))


def _ood_readme(result: WordNetTriplets) -> str:
    """The README's paragraph on `ood.jsonl` (empty without held-out lexicographer files)."""
    if not result.ood_tasks:
        return ""
    counts = Counter(r["task_name"] for r in result.ood)
    table = "\n".join(f"| {t} | {counts[t]} |" for t in result.ood_tasks)
    return f"""
`ood.jsonl` holds rows of the held-out lexicographer files only (query, positive and negative all from their
synsets); none of their synsets appears in `train.jsonl` or `eval.jsonl`, nor any text of an `ood.jsonl` row.

| held-out task | ood |
| --- | --- |
{table}
| total | {len(result.ood)} |
"""


def _readme(result: WordNetTriplets, args: argparse.Namespace) -> str:
    train_counts, eval_counts = (Counter(r["task_name"] for r in rows) for rows in (result.train, result.eval))
    table = "\n".join(f"| {t} | {train_counts[t]} | {eval_counts[t]} |" for t in result.tasks)
    holdout = f" --holdout-lexnames {','.join(args.holdout_lexnames)} --ood {args.ood}" if args.holdout_lexnames else ""
    return f"""# WordNet 3.0 triplets

Generated by `gist-scale data wordnet OUT_DIR --train {args.train} --eval {args.eval} --tasks {args.tasks} \
--seed {args.seed}{holdout}` from the WordNet 3.0 database (Debian package `wordnet-base`, /usr/share/wordnet).
Regenerate with the same command; the output is deterministic given the seed.

Each JSONL row has `query`, `pos`, `neg` and `task_name`:

- `query`: a synset's definition (its gloss without the quoted examples);
- `pos`: one of the synset's example sentences;
- `neg`: an example sentence of a sibling synset (same hypernym; for adjective satellites, same head adjective);
- `task_name`: the synset's lexicographer file.

`eval.jsonl` holds out whole sibling families: no synset used in an eval row (query, positive or negative)
appears in `train.jsonl`, and neither does any eval text.

| task | train | eval |
| --- | --- | --- |
{table}
| total | {len(result.train)} | {len(result.eval)} |
{_ood_readme(result)}
WordNet is (c) 2006 Princeton University and used under the WordNet 3.0 license in `LICENSE`.
"""


def _lexnames(text: str) -> tuple[str, ...]:
    """`--holdout-lexnames`: known lexicographer file names, each once, in the order given."""
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in LEXNAMES:
            close = difflib.get_close_matches(name, LEXNAMES, n=1)
            raise argparse.ArgumentTypeError(f"{name!r} is not a WordNet lexicographer file"
                                             + (f"; did you mean {close[0]!r}?" if close else ""))
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a file twice")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gist-scale data", description="Build triplet datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    wordnet = commands.add_parser("wordnet", help="triplets from WordNet 3.0 (definition, example, sibling's example)",
                                  description="Write OUT_DIR/train.jsonl, eval.jsonl, LICENSE and README.md from "
                                              "WordNet 3.0 (and ood.jsonl with --holdout-lexnames).")
    wordnet.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    wordnet.add_argument("--train", type=int, default=4096, help="train triplets (default: 4096)")
    wordnet.add_argument("--eval", type=int, default=512, help="held-out eval triplets (default: 512)")
    wordnet.add_argument("--tasks", type=int, default=8,
                         help="lexicographer files used as tasks, largest first (default: 8)")
    wordnet.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    wordnet.add_argument("--holdout-lexnames", type=_lexnames, default=(), metavar="NAMES",
                         help="comma-separated lexicographer files (e.g. noun.artifact,verb.social) left out of train "
                              "and eval and written to OUT_DIR/ood.jsonl (default: none, no ood split)")
    wordnet.add_argument("--ood", type=int, default=512,
                         help="out-of-distribution triplets, an equal share per held-out file (default: 512)")
    wordnet.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR,
                         help=f"WordNet 3.0 dict directory holding data.noun etc. (default: {DEFAULT_WORDNET_DIR})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `gist-scale data ...`."""
    args = build_parser().parse_args(argv)
    for name in ("train", "eval", "tasks", "ood"):
        if getattr(args, name) < 1:
            print(f"gist-scale data wordnet: --{name} must be >= 1", file=sys.stderr)
            return 2
    try:
        synsets = load_wordnet(args.wordnet_dir)
        result = build_triplets(synsets, args.train, args.eval, args.seed, args.tasks, args.holdout_lexnames, args.ood)
    except (OSError, ValueError) as error:
        print(f"gist-scale data wordnet: {error}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval", "ood") if result.ood_tasks else ("train", "eval"):
        with (args.out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in getattr(result, split))
    notice = "The triplets in this folder are derived from WordNet 3.0 and are distributed under its license:\n\n"
    (args.out_dir / "LICENSE").write_text(notice + license_text(args.wordnet_dir))
    (args.out_dir / "README.md").write_text(_readme(result, args))
    ood = f", and {len(result.ood)} ood triplets of {', '.join(result.ood_tasks)}," if result.ood_tasks else ""
    print(f"wrote {len(result.train)} train and {len(result.eval)} eval triplets over {len(result.tasks)} tasks "
          f"({', '.join(result.tasks)}){ood} to {args.out_dir}")
    return 0
