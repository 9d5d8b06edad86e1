"""Independent references for testing :class:`gist_scale.loss.GISTLoss`.

* :func:`naive_gist_loss`: a per-row Python loop over the original GISTEmbed formulation
  (``[qp | qn | qq | pp]``, strict ``>``, label ``i``), in float64, sharing no code with the
  vectorized implementation; optionally extended with gist-scale's duplicate rule (``text_ids``).
* :func:`st_gist_loss`: sentence-transformers' ``GISTEmbedLoss`` (optionally inside its ``MatryoshkaLoss``) fed
  our exact tensors, by giving it real SentenceTransformer models whose forward returns them and an ``embed_columns`` that calls it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


def make_inputs(
    n: int,
    k: int | None,
    d: int = 16,
    dg: int = 12,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    related: float = 0.0,
) -> dict[str, Tensor | None]:
    """Random student/guide columns. ``k=None``: no negatives; ``k=0``: ``[B, D]`` negatives; else ``[B, K, D]``.

    ``related > 0`` pulls each positive towards its anchor (in both models), which keeps the loss
    O(1) like in real training instead of O(1/temperature), so that fp32 absolute errors are small.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    neg_shape = None if k is None else ((n,) if k == 0 else (n, k))
    anchor, guide_anchor = rnd(n, d), rnd(n, dg)
    out = {
        "anchor": anchor,
        "positive": related * anchor + rnd(n, d),
        "negative": None if neg_shape is None else rnd(*neg_shape, d),
        "guide_anchor": guide_anchor,
        "guide_positive": related * guide_anchor + rnd(n, dg),
        "guide_negative": None if neg_shape is None else rnd(*neg_shape, dg),
    }
    return {name: None if t is None else t.to(dtype) for name, t in out.items()}


def _cos(x: Tensor, y: Tensor) -> float:
    x, y = x.double(), y.double()
    return float(x @ y) / (float(x.norm()) * float(y.norm()))


class NaiveResult(NamedTuple):
    loss: float
    masked: int
    """Candidates the guide masked (not the positive, self pairs or duplicates)."""
    maskable: int
    """Candidates other than the positive and the self pairs."""
    duplicates: int
    """Candidates masked because their text is the row's positive or query (``text_ids``)."""


def naive_gist_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor | None,
    guide_anchor: Tensor | None,
    guide_positive: Tensor | None,
    guide_negative: Tensor | None,
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    exclude_self: bool = False,
    text_ids: tuple[list[int], list[int], list[int]] | None = None,
) -> NaiveResult:
    """Original formulation, one row at a time.

    ``exclude_self=False`` is the original: self pairs are dropped only if the guide threshold
    masks them. ``exclude_self=True`` always drops them (gist-scale's rule). The positive is
    never masked. Masked/maskable counts exclude the positive and the self pairs.

    ``text_ids`` (query ids, positive ids, negative ids in row-major ``[B*K]`` order) adds gist-scale's
    duplicate rule: a candidate (not the positive, not a self pair) whose id is the row's query's or
    positive's is dropped, whatever the guide says, and counted in ``duplicates`` (not in ``masked``).
    """
    n, d = anchor.shape
    guided = guide_anchor is not None
    negs = [] if negative is None else list(negative.reshape(-1, d))
    gnegs = [] if guide_negative is None else list(guide_negative.reshape(len(negs), -1))
    total, masked, maskable = 0.0, 0, 0

    def gcos(x: Tensor | None, y: Tensor | None) -> float | None:
        return _cos(x, y) if guided else None

    ga = guide_anchor if guided else [None] * n
    gp = guide_positive if guided else [None] * n
    gnegs = gnegs if guided else [None] * len(negs)
    qid, pid, nid = text_ids if text_ids is not None else ([None] * n, [None] * n, [None] * len(negs))
    duplicates = 0
    for i in range(n):
        # (student sim, guide sim, is the positive, is a self pair, candidate's text id)
        cands: list[tuple[float, float | None, bool, bool, int | None]] = []
        for j in range(n):
            cands.append((_cos(anchor[i], positive[j]), gcos(ga[i], gp[j]), j == i, False, pid[j]))
        for m in range(len(negs)):
            cands.append((_cos(anchor[i], negs[m]), gcos(ga[i], gnegs[m]), False, False, nid[m]))
        if contrast_anchors:
            for j in range(n):
                cands.append((_cos(anchor[i], anchor[j]), gcos(ga[i], ga[j]), False, j == i, qid[j]))
        if contrast_positives:
            for j in range(n):
                cands.append((_cos(positive[i], positive[j]), gcos(gp[i], gp[j]), False, j == i, pid[j]))
        threshold = None
        if guided:
            pos = _cos(ga[i], gp[i])
            threshold = pos - margin if margin_strategy == "absolute" else pos - abs(pos) * margin
        kept = []
        label_logit = None
        for sim, gsim, is_pos, is_self, text in cands:
            if is_pos:
                label_logit = sim / temperature
                kept.append(label_logit)
                continue
            if is_self and exclude_self:
                continue
            if text is not None and not is_self and text in (qid[i], pid[i]):
                maskable += 1
                duplicates += 1
                continue
            hit = guided and gsim > threshold
            if not is_self:
                maskable += 1
                masked += int(hit)
            if not hit:
                kept.append(sim / temperature)
        top = max(kept)
        lse = top + math.log(sum(math.exp(v - top) for v in kept))
        total += lse - label_logit
    return NaiveResult(total / n, masked, maskable, duplicates)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))


class _ColumnModule(nn.Module):
    """The only module of a real ``SentenceTransformer`` whose forward returns the given column
    (``features["column"]``). Being a real SentenceTransformer, it has whatever GISTEmbedLoss and MatryoshkaLoss ask
    of a model in any release (6.3 added ``_get_untruncated_embedding_dimension``); MatryoshkaLoss decorates its
    forward as it decorates any model's."""

    max_seq_length = 128

    def __init__(self, columns: list[Tensor]) -> None:
        super().__init__()
        self.tokenizer = _tokenizer()
        self.columns = columns

    def get_embedding_dimension(self) -> int:
        return self.columns[0].shape[-1]

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": self.columns[features["column"]]}


def _column_model(columns: list[Tensor]) -> nn.Module:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[_ColumnModule(columns)], device="cpu")


def st_gist_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor | None,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negative: Tensor | None,
    matryoshka_dims: list[int] | None = None,
    matryoshka_weights: list[float] | None = None,
    **kwargs,
) -> Tensor:
    """sentence-transformers' ``GISTEmbedLoss`` on exactly these embeddings (``negative``: ``[B, D]``); with
    ``matryoshka_dims``, wrapped in its ``MatryoshkaLoss``, which truncates what the student's forward returns."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
    from sentence_transformers.sentence_transformer.losses import gist_embed as st_module

    cols = [anchor, positive] + ([negative] if negative is not None else [])
    guide_cols = [guide_anchor, guide_positive] + ([guide_negative] if guide_negative is not None else [])
    student, guide = _column_model(cols), _column_model(guide_cols)
    loss = st_module.GISTEmbedLoss(student, guide, **kwargs)
    if matryoshka_dims is not None:
        loss = MatryoshkaLoss(student, loss, matryoshka_dims, matryoshka_weights)

    def embed_columns(model, features_list, separate_first=True):
        # One forward per column, through the (possibly Matryoshka-decorated) forward of the model.
        return [model(features)["sentence_embedding"] for features in features_list]

    original = st_module.embed_columns
    st_module.embed_columns = embed_columns
    try:
        return loss([{"column": i} for i in range(len(cols))], None)
    finally:
        st_module.embed_columns = original


def with_duplicates(inputs: dict[str, Tensor | None]) -> tuple[dict[str, Tensor | None], tuple[Tensor, Tensor, Tensor]]:
    """``make_inputs`` columns (``n >= 7``, ``[B, K, D]`` negatives) rewritten so that some texts repeat, as in real
    batches, with ``text_ids`` that say which: a text and its embeddings (student and guide) are the same wherever
    it appears. Row 3 has row 1's positive; row 5's first negative is row 2's positive; row 6 repeats row 0's query;
    row 4's last negative is row 4's own positive (a mined negative equal to the positive) and row 2's last negative
    is row 2's own query. Returns ``(inputs, (query ids [B], positive ids [B], negative ids [B, K]))``."""
    out = {name: None if t is None else t.clone() for name, t in inputs.items()}
    n, k = out["negative"].shape[:2]
    q_ids = torch.arange(n)
    p_ids = torch.arange(n) + n
    n_ids = (torch.arange(n * k) + 2 * n).reshape(n, k)

    def copy(dst: tuple[str, tuple], src: tuple[str, tuple]) -> None:
        for prefix in ("", "guide_"):
            out[prefix + dst[0]][dst[1]] = out[prefix + src[0]][src[1]]

    copy(("positive", (3,)), ("positive", (1,)))
    p_ids[3] = p_ids[1]
    copy(("negative", (5, 0)), ("positive", (2,)))
    n_ids[5, 0] = p_ids[2]
    copy(("anchor", (6,)), ("anchor", (0,)))
    q_ids[6] = q_ids[0]
    copy(("negative", (4, k - 1)), ("positive", (4,)))
    n_ids[4, k - 1] = p_ids[4]
    copy(("negative", (2, k - 1)), ("anchor", (2,)))
    n_ids[2, k - 1] = q_ids[2]
    return out, (q_ids, p_ids, n_ids)


class NaiveGuided(NamedTuple):
    loss: float
    flagged: list[int]
    """Guide-flagged candidates per block (qp, qn, qq, pp)."""
    judged: list[int]
    negatives_left: list[int]
    """Per row."""


def random_slot_roles(n: int, k: int, seed: int) -> torch.Tensor:
    """Random roles, as several positives make them: per row, its extra positive slots first (1), then empty slots
    of positives it lacks (-1), then its hard negatives (0)."""
    g = torch.Generator().manual_seed(seed)
    extra = k // 2  # P - 1 positive slots per row
    roles = torch.zeros(n, k, dtype=torch.int8)
    for row in range(n):
        have = int(torch.randint(0, extra + 1, (1,), generator=g))
        roles[row, :have] = 1
        roles[row, have:extra] = -1
    return roles


# The guide policies, distillation and their mixes that the loss tests run against the references (one process
# and the global batch over ranks).
POLICIES = {
    "gist": {},
    "relative": dict(margin_strategy="relative", margin=0.1),
    "no_in_batch": dict(in_batch_negatives=False),
    "protected": dict(protect_hard_negatives=True, margin=0.05),
    "relabel": dict(false_negatives="relabel"),
    "relabel_qq_only": dict(false_negatives="relabel", contrast_positives=False, margin=0.05),
    "distill": dict(distill_weight=2.0, distill_temperature=0.05),
    "distill_only": dict(contrastive_weight=0.0, distill_weight=1.0, distill_temperature=0.1),
    "everything": dict(false_negatives="relabel", protect_hard_negatives=True, distill_weight=0.5, margin=0.02),
}


def naive_guided_loss(
    anchor: Tensor, positive: Tensor, negative: Tensor, guide_anchor: Tensor | None, guide_positive: Tensor | None,
    guide_negative: Tensor | None, *, slot_roles: Tensor | None = None, text_ids=None, temperature: float = 0.01,
    margin_strategy: str = "absolute", margin: float = 0.0, contrast_anchors: bool = True,
    contrast_positives: bool = True, in_batch_negatives: bool = True, protect_hard_negatives: bool = False,
    false_negatives: str = "mask", contrastive_weight: float = 1.0, distill_weight: float = 0.0,
    distill_temperature: float = 0.05,
) -> NaiveGuided:
    """gist-scale's guided loss with the guide's policy, several positives and distillation, one row and one candidate
    at a time in float64 (no code shared with ``gist_scale.loss``), from their definitions (docs/loss.md):

    * a row's positives are its ``pos`` and its slots of role 1; a slot of role -1 is empty (never a candidate);
      self pairs (``qq``/``pp`` at the row's own index) and, with ``in_batch_negatives`` off, every other row's text
      are not candidates either; with ``text_ids``, a candidate whose text is the row's query or one of its positives
      is dropped (a duplicate);
    * the guide judges every other candidate except, with ``protect_hard_negatives``, the row's own hard negatives; it
      flags those it scores strictly above the threshold of the row's least similar positive; flagged candidates are
      dropped (``mask``) or become positives (``relabel``);
    * the contrastive term of a row is the mean over its positives of ``-log(e^s_p / (e^s_p + sum_neg e^s_n))``;
      distillation is ``KL(softmax(g / t) || softmax(s / t))`` over the candidates that are not dropped before the
      guide (positives and flagged ones included); the loss is the mean over rows of the weighted sum.
    """
    n, d = anchor.shape
    k = 0 if negative is None else negative.shape[1]
    negs = [] if negative is None else list(negative.reshape(-1, d))
    guided = guide_anchor is not None
    gnegs = list(guide_negative.reshape(n * k, -1)) if guided and k else [None] * (n * k)
    ga = guide_anchor if guided else [None] * n
    gp = guide_positive if guided else [None] * n
    roles = [[0] * k for _ in range(n)] if slot_roles is None else slot_roles.tolist()
    qid, pid, nid = text_ids if text_ids is not None else ([None] * n, [None] * n, [None] * (n * k))
    total = 0.0
    flagged_blocks, judged_blocks, left = [0] * 4, [0] * 4, []

    def gcos(x, y):
        return _cos(x, y) if guided else None

    for i in range(n):
        # (student sim, guide sim, owner row, block, role, text id)
        cands = [(_cos(anchor[i], positive[j]), gcos(ga[i], gp[j]), j, 0, 1, pid[j]) for j in range(n)]
        cands += [(_cos(anchor[i], negs[j * k + s]), gcos(ga[i], gnegs[j * k + s]), j, 1, roles[j][s], nid[j * k + s])
                  for j in range(n) for s in range(k)]
        if contrast_anchors:
            cands += [(_cos(anchor[i], anchor[j]), gcos(ga[i], ga[j]), j, 2, 0, qid[j]) for j in range(n)]
        if contrast_positives:
            cands += [(_cos(positive[i], positive[j]), gcos(gp[i], gp[j]), j, 3, 0, pid[j]) for j in range(n)]
        own_texts = {qid[i], pid[i]} | {nid[i * k + s] for s in range(k) if roles[i][s] == 1}
        positives, others = [], []
        for cand in cands:
            sim, gsim, owner, block, role, text = cand
            if role == -1 or (owner == i and block >= 2) or (owner != i and not in_batch_negatives):
                continue
            if owner == i and role == 1 and block <= 1:
                positives.append(cand)
            elif text_ids is not None and text in own_texts:
                continue
            else:
                others.append(cand)
        negatives, kept_positives = [], list(positives)
        threshold = None
        if guided:
            low = min(c[1] for c in positives)
            threshold = low - margin if margin_strategy == "absolute" else low - abs(low) * margin
        for cand in others:
            sim, gsim, owner, block, role, text = cand
            protected = protect_hard_negatives and owner == i and block == 1 and role == 0
            if guided and not protected:
                judged_blocks[block] += 1
                if gsim > threshold:
                    flagged_blocks[block] += 1
                    if false_negatives == "relabel":
                        kept_positives.append(cand)
                    continue
            negatives.append(cand)
        left.append(len(negatives))
        neg_logits = [c[0] / temperature for c in negatives]
        terms = []
        for cand in kept_positives:
            s = cand[0] / temperature
            terms.append(_logsumexp([s, *neg_logits]) - s)
        row = contrastive_weight * sum(terms) / len(terms)
        if distill_weight:
            compared = positives + others
            teacher = [c[1] / distill_temperature for c in compared]
            student = [c[0] / distill_temperature for c in compared]
            t_lse, s_lse = _logsumexp(teacher), _logsumexp(student)
            row += distill_weight * sum(math.exp(t - t_lse) * ((t - t_lse) - (s - s_lse))
                                        for t, s in zip(teacher, student))
        total += row
    return NaiveGuided(total / n, flagged_blocks, judged_blocks, left)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
