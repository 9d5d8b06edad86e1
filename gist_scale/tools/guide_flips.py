"""How often a bf16 guide's mask changes with the layout: the measured side of the exactness contract.

    python -m gist_scale.tools.guide_flips [--guide.name MODEL] [--guide.dtype bf16|fp32] [--data.path FILE]
                                           [--rows 512] [--global-batch 32] [--micro-batches 8 4]

A rank encodes its share of a global batch padded to its own longest text, so the same text is encoded in a
different padded shape on 1 and on 2 ranks. In fp32 that changes the guide's cosines by ~1e-7; in bf16 by up to a few
1e-3, and a candidate whose guide score lies that close to its row's threshold can fall on either side. This tool
embeds the texts of task-homogeneous global batches (as the trainer builds them) once in micro-batches of each size
given, builds the GIST guide mask (absolute margin 0, all four blocks) of every global batch from each, and counts
the candidates whose decision differs. Self pairs, the positive and duplicates (masked by identity whatever the
guide says) are left out, as in training. It prints the flip rate and the largest distance of a flipped candidate's
guide score from its threshold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gist_scale.config import MINILM, GuideConfig
from gist_scale.data import sample_data_path
from gist_scale.loss import block_similarities, margin_threshold
from gist_scale.model import load_guide, load_tokenizer


@dataclass(frozen=True)
class FlipReport:
    flips: int
    """Candidates whose guide-mask decision differs between the layouts."""
    candidates: int
    """Candidates compared (not the positive, a self pair or a duplicate of the row's query or positive)."""
    max_gap: float
    """Largest |guide score - threshold| of a flipped candidate (0 without flips)."""
    batches: int

    def line(self, dtype: str, micro_batches: Sequence[int]) -> str:
        sizes = " vs ".join(map(str, micro_batches))
        return (f"guide {dtype}, micro-batches {sizes}: {self.flips} of {self.candidates} mask decisions flip "
                f"({self.flips / max(self.candidates, 1):.2e}) over {self.batches} global batches; largest "
                f"|score - threshold| of a flip {self.max_gap:.2e}")


def global_batches(rows: Sequence[dict], size: int) -> list[list[dict]]:
    """Consecutive full batches of `size` rows of one task each (the trainer's task-homogeneous batches)."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task_name"], []).append(row)
    return [group[i:i + size] for group in by_task.values() for i in range(0, len(group) - size + 1, size)]


def _embed(guide: torch.nn.Module, tokenizer, texts: list[str], micro_batch: int, max_length: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), micro_batch):
            batch = tokenizer(texts[start:start + micro_batch], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            out.append(guide(batch["input_ids"], batch["attention_mask"]).float())
    return F.normalize(torch.cat(out), dim=-1)


def _decisions(embeddings: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Guide mask `[n, C]` over [qp | qn | qq | pp] and each candidate's score minus its row's threshold."""
    q, p, neg = embeddings[:n], embeddings[n:2 * n], embeddings[2 * n:]
    scores = block_similarities(q, p, neg, 0, n, contrast_anchors=True, contrast_positives=True)  # as GISTLoss
    gap = scores - margin_threshold(scores.diagonal()[:, None], "absolute", 0.0)
    return gap > 0, gap


def measure_flips(guide: torch.nn.Module, tokenizer, batches: Sequence[Sequence[dict]],
                  micro_batches: Sequence[int] = (8, 4), max_length: int = 128) -> FlipReport:
    """Compare the guide masks of `batches` (rows with `query`, `pos`, one `neg` text) across the first two
    micro-batch sizes of `micro_batches`."""
    flips, candidates, max_gap = 0, 0, 0.0
    for batch in batches:
        n = len(batch)
        query, pos, neg = ([row[key] for row in batch] for key in ("query", "pos", "neg"))
        (mask_a, gap_a), (mask_b, _) = (_decisions(_embed(guide, tokenizer, query + pos + neg, size, max_length), n)
                                        for size in micro_batches[:2])
        columns = pos + neg + query + pos
        compared = torch.tensor([[j != i and j != 2 * n + i and j != 3 * n + i and text not in (query[i], pos[i])
                                  for j, text in enumerate(columns)] for i in range(n)])
        flipped = (mask_a != mask_b) & compared
        flips += int(flipped.sum())
        candidates += int(compared.sum())
        max_gap = max([max_gap, *gap_a[flipped].abs().tolist()])
    return FlipReport(flips, candidates, max_gap, len(batches))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gist_scale.tools.guide_flips", description=__doc__.split("\n")[0])
    parser.add_argument("--guide.name", dest="guide", default=MINILM, help="guide model (default: %(default)s)")
    parser.add_argument("--guide.dtype", dest="dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--guide.trust_remote_code", dest="trust_remote_code", choices=("true", "false"),
                        default="false", help="run the guide repository's own code (only for code you trust)")
    parser.add_argument("--data.path", dest="data", type=Path, default=sample_data_path("train"),
                        help="JSONL rows with query, pos, neg (one text) and task_name (default: the WordNet sample)")
    parser.add_argument("--rows", type=int, default=512, help="rows read from the top of the file")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, nargs=2, default=[8, 4], metavar=("A", "B"),
                        help="the two micro-batch sizes compared (each rank's share under two layouts)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"--data.path {args.data}: no such file")
    rows = []
    for number, line in enumerate(args.data.read_text().splitlines()[:args.rows], start=1):
        try:
            row = json.loads(line)
            rows.append({key: row[key] for key in ("query", "pos", "neg", "task_name")})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            parser.error(f"{args.data}:{number}: not a JSON object with query, pos, neg and task_name ({error!r})")
    batches = global_batches(rows, args.global_batch)
    if not batches:
        parser.error(f"--rows {args.rows}: no task has --global-batch {args.global_batch} rows; read more rows")
    trust = args.trust_remote_code == "true"
    guide = load_guide(GuideConfig(name=args.guide, dtype=args.dtype, trust_remote_code=trust), torch.device("cpu"))
    tokenizer = load_tokenizer(args.guide, None, trust, "--guide.trust_remote_code true")
    print(measure_flips(guide, tokenizer, batches, args.micro_batches).line(args.dtype, args.micro_batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
