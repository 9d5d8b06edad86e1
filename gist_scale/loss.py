"""GISTEmbed guided in-batch contrastive loss, computed over the global (all-rank) batch.

Formulation (GISTEmbed, arXiv 2402.16829; original code
``gist_embed/trainer/loss.py::guided_in_batch_contrastive_loss``)
----------------------------------------------------------------------------------------
For query (anchor) ``q_i`` with positive ``p_i``, the candidates are the columns of ::

    [ qp | qn | qq | pp ]

* ``qp``: ``q_i`` against every positive ``p_j``      (N columns; the label is ``p_i``),
* ``qn``: ``q_i`` against every hard negative ``n_jk`` (N*K columns, absent without negatives),
* ``qq``: ``q_i`` against every query ``q_j``         (N columns, if ``contrast_anchors``),
* ``pp``: ``p_i`` against every positive ``p_j``      (N columns, if ``contrast_positives``),

where N is the number of rows in the (global) batch. Similarities are cosine, computed in fp32
whatever the input dtype (bf16 cosines are too coarse once divided by a temperature of 0.01),
and the logits are ``sim / temperature``. The loss is the cross-entropy with label ``p_i``.

Guided mask. A frozen guide model embeds the same texts. Candidate ``j`` of row ``i`` is
removed (logit ``-inf``) when its guide similarity is *strictly greater* than the row threshold
derived from the guide's ``g(q_i, p_i)``:

* ``absolute``: ``g_sim > g(q_i, p_i) - margin``
* ``relative``: ``g_sim > g(q_i, p_i) - |g(q_i, p_i)| * margin``

The rationale: a candidate the guide rates as at least as relevant as the labelled positive is
probably a false negative, and pushing it away would teach the model the wrong thing. The
positive ``p_i`` itself is never masked, even when ``margin > 0`` puts it above the threshold.

Self pairs: one deliberate difference from the original. ``(q_i, q_i)`` in ``qq`` and
``(p_i, p_i)`` in ``pp`` are trivially similar and are *always* excluded. The original relies
on the guide mask for this (guide self-similarity 1 exceeds the threshold), which fails on a
tie: a query identical to its positive has threshold 1, its self-similarity is not strictly
greater, and the original kept a logit of ``1/temperature`` in the denominator that no
training can change. On inputs without such ties both agree.

Duplicates: a second deliberate difference. A candidate whose text *is* the row's positive or
the row's query (another row holding the same positive, a hard negative that is some other row's
positive, a repeated query) is masked by identity, not by the guide's score: its guide score
equals the threshold exactly, so GIST's strict ``>`` keeps it as a negative in exact arithmetic
and rounding decides in practice (with a bf16 guide, the padding and the rank layout). The
identity is a 64-bit hash of the token ids the student's encoder sees (prompt and truncation
included), computed on the host by the collator (``text_ids``) and gathered with the
embeddings. ``mask_duplicates=False`` (``loss.mask_duplicates``) restores the original
behaviour. Duplicates are counted in ``LossStats.duplicates_masked``, apart from the guide's
``masked_fraction``.

The forward returns ``(loss, LossStats)``: the statistics travel with the value they describe, so a caller never
reads them off the module (where the next call, or another caller, would have replaced them).

The guide's policy (``LossPolicy``: per call, so that each data source can have its own)
------------------------------------------------------------------------------------------
* ``in_batch_negatives=False``: a row's candidates are its own positive(s) and hard negatives only (classification
  data, whose in-batch rows share labels).
* ``protect_hard_negatives=True``: a row's own hard negatives are never judged by the guide (curated negatives).
* ``false_negatives="relabel"``: a flagged candidate becomes one more positive of the row instead of being masked.

Several positives. ``slot_roles`` ``[B, K]`` marks each negative slot: 0 a hard negative, 1 one more positive of the
row, -1 an empty slot (never a candidate of any row). A row's positives are never its negatives, in any block; the
guide threshold comes from the row's least similar positive; each positive competes with the row's negatives only
(``-log(e^s_p / (e^s_p + sum_n e^s_n))``, averaged over the row's positives), which with one positive is the
cross-entropy above.

Distillation. With ``distill_weight > 0`` the loss adds ``KL(softmax(g / t) || softmax(s / t))`` per row, ``t`` the
``distill_temperature``, over every candidate the row is compared with (flagged ones included: the guide's scores of
them are what masking throws away), at each Matryoshka size; ``contrastive_weight`` weighs the cross-entropy.

``guide_* = None`` gives plain in-batch InfoNCE over the same blocks (self pairs and
duplicates still excluded), for ablations.

Global batch and scaling
------------------------
Inside an initialized process group, the student columns are all-gathered *with* gradient and
the guide columns *without*, so each row sees the candidates of all ranks in all four blocks
(queries too; sentence-transformers keeps the anchors of the ``qq`` block local). Each rank
computes the cross-entropy only for its own rows (against all global candidates), so the
logit matrix is ``[B_local, C]``. Ranks may hold different ``B_local`` (even zero): one tiny
all-gather exchanges the sizes (and each rank's input validity, so that a bad input raises
``ValueError`` on every rank rather than hanging the others), then the columns are padded to
the largest rank, gathered, and stripped back to exactly ``N`` rows. Embeddings travel in their
own dtype (bf16 halves the traffic) and are upcast to fp32 after the gather. A caller that
knows every rank's size passes ``rank_sizes`` and skips that exchange (the trainer does, with
equal per-rank batches): its ``.tolist()`` is a host sync.

Each rank returns ``sum(local row losses) * W / N`` (``W`` ranks, ``N`` global rows), so that

* the mean over ranks of the returned values equals the single-process loss on the
  concatenated batch (for logging, average it over ranks);
* the all-gather's backward is a reduce-scatter SUM, so the gradient reaching rank ``r``'s
  inputs is ``d(sum_r' loss_r')/dx_r = W * dL/dx_r``; after the usual DDP / ZeRO gradient
  averaging (a division by ``W``), the parameter gradients equal exactly those of one process
  holding the whole global batch. Consequently, *every* rank must run backward on its loss.

Without a process group (or with ``gather_across_ranks=False``) this is the ordinary mean over
the local rows.

Matryoshka GIST
---------------
With ``matryoshka_dims`` (Kusupati et al., arXiv 2205.13147) the loss is ``sum_d w_d * L(student[..., :d])``: the
GIST loss above on the student embeddings truncated to each size ``d`` and re-normalized, as sentence-transformers'
``MatryoshkaLoss(GISTEmbedLoss)`` computes it. The guide never changes size, so the mask, the threshold and the
self pairs are computed once per row (block) and shared by every size; the student columns are gathered once at
full width and truncated after the gather. What each size adds is one matmul, one masked cross-entropy, and its
``[rows, C]`` logits kept for the backward. Under GradCache the loss is taken on the embedding leaves, so the
sizes only change the gradient that reaches them: the encoder is still re-run once, not once per size.

Memory
------
The logit matrix is ``[B_local, C]`` with ``C = N * (2 + K)`` or so: quadratic in the batch. Past
``row_block`` local rows the loss is computed in row blocks, each under activation checkpointing
(recomputed in the backward), so no tensor of the forward or backward exceeds ``row_block x C``
elements (tested); the loss and gradients are the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gist_scale import distributed as gdist
from gist_scale.config import POLICY_FIELDS, LossConfig, SourceConfig, matryoshka_pairs

__all__ = ["BLOCKS", "GISTLoss", "LossPolicy", "LossStats", "block_similarities", "margin_threshold"]


@dataclass(frozen=True)
class LossPolicy:
    """The guide's settings for one step: `LossConfig`'s, or a `data.sources` entry's where it sets them. Every
    global batch comes from one source, so every rank applies the same policy to a step."""

    margin_strategy: str = LossConfig.margin_strategy
    margin: float = LossConfig.margin
    contrast_anchors: bool = LossConfig.contrast_anchors
    contrast_positives: bool = LossConfig.contrast_positives
    in_batch_negatives: bool = LossConfig.in_batch_negatives
    protect_hard_negatives: bool = LossConfig.protect_hard_negatives
    false_negatives: str = LossConfig.false_negatives

    @classmethod
    def of(cls, loss: LossConfig, source: SourceConfig | None = None) -> LossPolicy:
        """The policy of `source`'s batches: its own settings, the `loss` section's where it leaves them null."""
        chosen = {name: getattr(loss, name) for name in POLICY_FIELDS}
        if source is not None:
            chosen.update({name: getattr(source, name) for name in POLICY_FIELDS if getattr(source, name) is not None})
        return cls(**chosen)

@dataclass(frozen=True)
class LossStats:
    """Diagnostics of one forward (its second result), as detached 0-dim float32 tensors on the loss device.

    Tensors rather than Python numbers so that reading them costs no host sync; call
    ``.item()`` (or :func:`gist_scale.distributed.all_reduce_mean`) only when logging.

    Attributes:
        masked_fraction: fraction of this rank's maskable candidates that the guide masked.
            Rows are this rank's local rows; columns are all global candidates *except* the
            row's positive (never masked) and its self pairs (always excluded), i.e. the
            denominator is ``local_rows * (candidates_per_anchor - 1)``. ``0`` without a guide.
            This is the number to watch when tuning ``margin``.
        candidates_per_anchor: logit columns each row competes over: the positive, all other
            global candidates, excluding the self pairs (there are no padding columns).
        local_rows: rows this rank computed the loss for.
        global_rows: rows in the global batch (``N``).
        dim_losses: ``[M]``, the unweighted GIST loss at each Matryoshka size, largest first (``M = 1``, the full
            dimension, without Matryoshka), scaled like the loss: their mean over ranks is the full-batch value.
            The mask, and so ``masked_fraction``, is the same for every size.
        duplicates_masked: candidates of this rank's rows masked because their text is the row's positive or
            query (``text_ids``), not counted in ``masked_fraction``; ``0`` without ``text_ids``.
        distillation: ``[M]``, KL(guide || student) at each size, scaled like ``dim_losses``; zeros when off.
        flagged_by_block: ``[4]``, candidates of this rank's rows the guide flagged (masked, or relabelled) in each
            of :data:`BLOCKS`.
        judged_by_block: ``[4]``, the candidates the guide judged in each block: all but the row's own positives, its
            self pairs, duplicates, empty slots, protected hard negatives and, with in-batch negatives off, other
            rows' texts. ``flagged / judged`` is a block's masked share.
        negatives_left: ``[local_rows]``, the candidates each row's softmax kept that are not its positives.
    """

    masked_fraction: Tensor
    candidates_per_anchor: Tensor
    local_rows: Tensor
    global_rows: Tensor
    dim_losses: Tensor
    duplicates_masked: Tensor
    distillation: Tensor
    flagged_by_block: Tensor
    judged_by_block: Tensor
    negatives_left: Tensor


class GISTLoss(nn.Module):
    """Guided in-batch contrastive loss of GISTEmbed over the global batch.

    The keyword arguments are `LossConfig`'s fields, with its defaults and its rules (one place), plus
    ``gather_across_ranks`` and ``check_finite``; the trainer builds it as ``GISTLoss(**asdict(cfg.loss))``.

    See the module docstring for the formulation, the self-pair rule and the distributed
    scaling.

    Args:
        temperature: logits are ``cosine / temperature``; must be > 0.
        margin_strategy: ``"absolute"`` or ``"relative"``, how ``margin`` lowers the threshold.
        margin: threshold margin. ``0`` masks candidates the guide rates above the positive;
            larger values mask more aggressively.
        contrast_anchors: include the query-query block ``qq``.
        contrast_positives: include the positive-positive block ``pp``.
        gather_across_ranks: inside a process group, contrast against the candidates of all
            ranks (the point of this class). ``False`` computes a rank-local loss.
        check_finite: raise ``ValueError`` on NaN/inf embeddings. Costs one host sync per call
            in single-process mode; in a process group the check rides on the size exchange
            that happens anyway. Disable only if that sync matters and you check elsewhere.
        row_block: with more local rows than this, the loss is computed in blocks of this many rows, each
            recomputed in the backward (activation checkpointing), so its memory is ``row_block x C`` instead of
            ``B_local x C`` (same loss and gradients; ``None`` never blocks). The default leaves batches up to 2048
            rows per rank untouched.
        matryoshka_dims: sizes to truncate the student embeddings to (any order; each at most the embedding
            dimension); the loss is the weighted sum over them. ``None``: the full dimension only.
        matryoshka_weights: one positive weight per size; ``None`` weighs each 1.
        mask_duplicates: mask every candidate whose ``text_ids`` equals the row's positive's or query's (see the
            module docstring); ``False`` reproduces the original, where the guide's score decides.

    Forward:
        ``anchor``, ``positive``: ``[B, D]`` student embeddings. ``negative``: ``None``,
        ``[B, D]`` or ``[B, K, D]``. ``guide_*``: the guide's embeddings of the same texts with
        the same shapes except the last dim ``Dg`` (any dtype), or all ``None`` for plain
        InfoNCE. ``rank_sizes``: every rank's ``B``, when the caller knows them (e.g. equal
        per-rank batches) and ``check_finite`` is off: skips the size exchange, a host sync, at
        the price of checking the inputs on this rank only (a rank whose inputs disagree with
        the others' then fails in the gather, or at the collective timeout, instead of raising
        ``ValueError`` everywhere). ``text_ids``: ``(query [B], positive [B], negative [B] | [B, K] | None)``
        int64 identities of the texts (equal ids: the same text), for the duplicate rule; ``None``: no
        candidate is known to be a duplicate. Returns ``(loss, stats)``: the 0-dim fp32 loss and its
        :class:`LossStats`.
    """

    def __init__(self, *, gather_across_ranks: bool = True, check_finite: bool = True, **settings: Any) -> None:
        super().__init__()
        # The settings, their defaults and their rules are LossConfig's (ConfigError, a ValueError), in one place.
        settings.update({name: tuple(settings[name]) for name in ("matryoshka_dims", "matryoshka_weights")
                         if settings.get(name) is not None})  # lists welcome here; the config holds tuples
        self.settings = LossConfig(**settings)
        # The guide settings a data source may override, per call (`forward(policy=...)`).
        self.policy = LossPolicy.of(self.settings)
        self.gather_across_ranks, self.check_finite = gather_across_ranks, check_finite
        # [(size, weight)], largest first; None: the full dimension with weight 1.
        self.matryoshka = matryoshka_pairs(self.settings.matryoshka_dims, self.settings.matryoshka_weights)

    def extra_repr(self) -> str:
        return (f"temperature={self.settings.temperature}, {self.policy}"
                + (f", distill_weight={self.settings.distill_weight}" if self.settings.distill_weight else "")
                + (f", matryoshka={self.matryoshka}" if self.matryoshka else ""))

    def forward(
        self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None, guide_anchor: Tensor | None = None,
        guide_positive: Tensor | None = None, guide_negative: Tensor | None = None, *,
        rank_sizes: list[int] | None = None, text_ids: tuple[Tensor, Tensor, Tensor | None] | None = None,
        slot_roles: Tensor | None = None, policy: LossPolicy | None = None,
    ) -> tuple[Tensor, LossStats]:
        error, shape = _check_inputs(anchor, positive, negative, guide_anchor, guide_positive, guide_negative)
        if error is None and text_ids is not None and self.settings.mask_duplicates:
            error = _check_text_ids(text_ids, shape)
        if error is None and slot_roles is not None and tuple(slot_roles.shape) != shape[:2]:
            error = f"slot_roles must be [B={shape[0]}, K={shape[1]}] like the negatives, got {tuple(slot_roles.shape)}"
        if error is None and self.settings.distill_weight and guide_anchor is None:
            error = "distill_weight > 0 distills from the guide: pass the guide's embeddings"
        if error is None and self.matryoshka and self.matryoshka[0][0] > shape[2]:
            error = (f"matryoshka_dims has {self.matryoshka[0][0]}, larger than the student's embedding dimension "
                     f"{shape[2]}")
        distributed = self.gather_across_ranks and gdist.world_size() > 1

        columns = (anchor, positive, negative, guide_anchor, guide_positive, guide_negative)
        if distributed and rank_sizes is not None and not self.check_finite:
            # The caller knows every rank's rows (equal per-rank batches): no size exchange, so no host sync here.
            # Inputs are then only checked locally.
            if error is None and len(rank_sizes) != gdist.world_size():
                error = f"rank_sizes has {len(rank_sizes)} entries for {gdist.world_size()} ranks"
            elif error is None and rank_sizes[gdist.rank()] != shape[0]:
                error = f"rank_sizes says {rank_sizes[gdist.rank()]} rows on this rank, the anchors have {shape[0]}"
            if error is not None:
                raise ValueError(error)
            sizes = list(rank_sizes)
        elif distributed:
            # One tiny all-gather carries every rank's sizes *and* its validity, so that a bad
            # input on one rank makes every rank raise together instead of leaving the healthy
            # ranks blocked in the embedding all-gather until the timeout.
            device = anchor.device if isinstance(anchor, Tensor) else gdist.comm_device()
            checked = self.check_finite and error is None
            finite = _all_finite(columns, device) if checked else torch.ones((), dtype=torch.bool, device=device)
            # non_blocking: a blocking host-to-device copy would sync the stream, and the
            # .tolist() below is meant to be the only sync.
            meta = torch.tensor([*shape, 0 if error is None else 1], dtype=torch.int64).to(device, non_blocking=True)
            meta = torch.cat([meta, finite.long().view(1)])
            all_meta = gdist.gather_no_grad(meta.view(1, -1), sizes=[1] * gdist.world_size()).tolist()
            _raise_if_any_invalid(error, all_meta)
            sizes = [row[0] for row in all_meta]
        else:
            if error is not None:
                raise ValueError(error)
            if self.check_finite and not bool(_all_finite(columns, anchor.device)):
                raise ValueError("embeddings contain NaN or inf")
            sizes = [anchor.shape[0]]

        n_global = sum(sizes)
        if n_global == 0:
            raise ValueError("the (global) batch is empty")
        offset = sum(sizes[:gdist.rank()]) if distributed else 0  # this rank's first global row
        b_local, k = shape[:2]
        policy = policy or self.policy

        # Student columns travel as one [B, (2+K)*D] tensor: one collective instead of three, at full width; each
        # Matryoshka size is a truncation of the gathered columns, normalized once here for all row blocks.
        q, p, n = self._gathered_columns(anchor, positive, negative, sizes, distributed, with_grad=True)
        sizes_weights = self.matryoshka or [(shape[2], 1.0)]
        views = [_normalized(q, p, n, dim) for dim, _ in sizes_weights]
        guide = (None, None, None)
        if guide_anchor is not None:
            with torch.no_grad():
                gathered = self._gathered_columns(guide_anchor, guide_positive, guide_negative, sizes, distributed,
                                                  with_grad=False)
                guide = _normalized(*gathered, guide_anchor.shape[1])  # the guide's full width
        # The rows' integer facts, gathered like the embeddings in one small collective: text identities
        # [N, 2 + K] (duplicate rule) and slot roles [N, K] (several positives, empty slots).
        ids = roles = None
        local_facts = []
        if text_ids is not None and self.settings.mask_duplicates:  # query, positive and (with K > 0) slot ids
            local_facts += [t.reshape(b_local, width) for t, width in zip(text_ids, (1, 1, k)) if width]
        if slot_roles is not None and k > 0:
            local_facts.append(slot_roles.reshape(b_local, k).long())
        if local_facts:
            facts = torch.cat([f.to(anchor.device) for f in local_facts], 1)
            facts = gdist.gather_no_grad(facts, sizes) if distributed else facts
            if text_ids is not None and self.settings.mask_duplicates:
                ids, facts = facts[:, :2 + k], facts[:, 2 + k:]
            roles = facts if facts.shape[1] else None
        n_self = int(policy.contrast_anchors) + int(policy.contrast_positives)  # the qq and pp blocks' self pairs
        n_cols = n_global * (1 + k + n_self)
        # Decided on the host from what the batch holds, not from its values: no sync.
        several_positives = slot_roles is not None or policy.false_negatives == "relabel"

        row_losses = functools.partial(self._row_losses, policy, several_positives, n_global, k)
        block = self.settings.row_block
        if block is None or b_local <= block:
            parts = row_losses(offset, b_local, views, ids, roles, *guide)
        else:
            # Row blocks, each recomputed in the backward: the loss holds [row_block, C] matrices at a time instead
            # of [B_local, C] ones (a 16,384-row batch with one negative has C = 65,536).
            blocks = [checkpoint(row_losses, offset + start, min(block, b_local - start), views, ids, roles,
                                 *guide, use_reentrant=False) for start in range(0, b_local, block)]
            parts = _RowParts(*(torch.cat(values) if name == "negatives_left" else torch.stack(values).sum(0)
                                for name, values in zip(_RowParts._fields, zip(*blocks))))
        scale = len(sizes) / n_global  # W ranks / N global rows
        dim_losses, dim_distillation = parts.contrastive * scale, parts.distillation * scale
        objective = self.settings.contrastive_weight * dim_losses + self.settings.distill_weight * dim_distillation
        # Weighted with Python floats: a weight tensor would be a host-to-device copy, a stream sync, in every step.
        loss = sum(objective[i] * weight for i, (_, weight) in enumerate(sizes_weights))

        maskable = b_local * (n_cols - 1 - n_self)
        return loss, LossStats(
            masked_fraction=(parts.flagged_by_block.sum() / max(maskable, 1)).detach(),
            candidates_per_anchor=loss.new_full((), float(n_cols - n_self)),
            local_rows=loss.new_full((), float(b_local)),
            global_rows=loss.new_full((), float(n_global)),
            dim_losses=dim_losses.detach(),
            duplicates_masked=parts.duplicates.float().detach(),
            distillation=dim_distillation.detach(),
            flagged_by_block=parts.flagged_by_block.detach(),
            judged_by_block=parts.judged_by_block.detach(),
            negatives_left=parts.negatives_left.float().detach(),
        )

    def _row_losses(
        self, policy: LossPolicy, several_positives: bool, n_global: int, k: int, first: int, rows: int,
        views: list[tuple[Tensor, Tensor, Tensor | None]], ids: Tensor | None, roles: Tensor | None,
        gq: Tensor | None, gp: Tensor | None, gn: Tensor | None,
    ) -> _RowParts:
        """The loss terms and mask counts of global rows ``first .. first + rows`` (see :class:`_RowParts`). The
        mask is built once and shared by every view (Matryoshka size). ``ids``: the global ``[N, 2 + K]`` text
        identities (query, positive, slots), or None; ``roles``: the global ``[N, K]`` slot roles, or None."""
        device = views[0][0].device
        g = torch.arange(first, first + rows, device=device)[:, None]  # each local row's global index
        layout = _column_layout(n_global, k, roles, policy.contrast_anchors, policy.contrast_positives, device)
        mine = layout.owner == g  # [rows, C]: the row's own texts, in every block
        own_positive = mine & (layout.role == 1) & (layout.block <= QN)
        # Never candidates: self pairs, empty slots, and with in-batch negatives off every other row's text.
        excluded = (mine & (layout.block >= QQ)) | (layout.role == -1)
        if not policy.in_batch_negatives:
            excluded |= ~mine
        duplicates = torch.zeros((), dtype=torch.int64, device=device)
        if ids is not None:
            # Identity before the guide: a candidate whose text is the row's query or one of its positives is masked
            # whatever the guide scores it (it ties the threshold, so rounding would decide).
            own_ids = ids[first:first + rows, :2]  # the row's query and positive
            candidate_ids = _block_ids(ids, policy.contrast_anchors, policy.contrast_positives)
            same_text = candidate_ids[None, :, None] == own_ids[:, None, :]
            if roles is not None:  # and its other positives, in its slots
                own_slots = ids[first:first + rows, 2:]
                extra = (candidate_ids[None, :, None] == own_slots[:, None, :]) & (roles[first:first + rows] == 1)[:, None, :]
                same_text = torch.cat([same_text, extra], -1)
            duplicate = same_text.any(-1) & ~own_positive & ~excluded
            duplicates = duplicate.sum()
            excluded |= duplicate
        positives = own_positive
        flagged = torch.zeros_like(excluded)
        judged = ~excluded & ~own_positive
        guide_sims = None
        if gq is not None:
            with torch.no_grad():
                guide_sims = block_similarities(gq, gp, gn, first, rows, policy.contrast_anchors,
                                                policy.contrast_positives)
                # The threshold from the row's least similar positive, read off the very matrix the positives' columns
                # hold, so "strictly greater" compares like with like. One positive: its column, without a pass over
                # the matrix.
                pos_sim = (guide_sims.gather(1, g) if roles is None else
                           guide_sims.masked_fill(~own_positive, float("inf")).amin(1, keepdim=True))
                if policy.protect_hard_negatives:
                    judged &= ~(mine & (layout.block == QN) & (layout.role == 0))
                flagged = judged & (guide_sims > margin_threshold(pos_sim, policy.margin_strategy, policy.margin))
            if policy.false_negatives == "relabel":
                positives = positives | flagged
            else:
                excluded = excluded | flagged
        negatives = ~excluded & ~positives
        contrastive, distillation = [], []
        teacher = None
        distill_temperature = self.settings.distill_temperature
        if self.settings.distill_weight:
            # Over every candidate the row may be compared with, flagged ones included: the guide's scores of them are
            # the knowledge the mask alone throws away.
            compared = excluded & ~flagged
            teacher = (guide_sims / distill_temperature).masked_fill(compared, float("-inf")).log_softmax(1)
        for q, p, n in views:
            sims = block_similarities(q, p, n, first, rows, policy.contrast_anchors, policy.contrast_positives)
            logits = (sims / self.settings.temperature).masked_fill(excluded, float("-inf"))
            if several_positives:
                # Each positive competes with the row's negatives only (never with its fellow positives); the row's
                # loss is the mean over its positives. With one positive this is the cross-entropy.
                negative_lse = logits.masked_fill(~negatives, float("-inf")).logsumexp(1, keepdim=True)
                terms = torch.logaddexp(logits, negative_lse) - logits
                per_row = terms.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)
                contrastive.append(per_row.sum())
            else:
                contrastive.append(F.cross_entropy(logits, g[:, 0], reduction="sum"))  # label: the row's positive
            if teacher is None:
                distillation.append(torch.zeros((), device=device))
            else:
                student = (sims / distill_temperature).masked_fill(compared, float("-inf")).log_softmax(1)
                # KL(guide || student) per row, summed; excluded columns hold 0 * (-inf) terms, so they are zeroed.
                distillation.append((teacher.exp() * (teacher - student)).masked_fill(compared, 0.0).sum())
        return _RowParts(
            contrastive=torch.stack(contrastive), distillation=torch.stack(distillation), duplicates=duplicates,
            flagged_by_block=_count_by_block(flagged, layout.block), judged_by_block=_count_by_block(judged, layout.block),
            negatives_left=negatives.sum(1))

    @staticmethod
    def _gathered_columns(a: Tensor, p: Tensor, n: Tensor | None, sizes: list[int], distributed: bool,
                          with_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Global fp32 ``(queries [N,D], positives [N,D], negatives [N*K,D] | None)``, before `_normalized`."""
        b, d = a.shape
        k = 0 if n is None else (1 if n.ndim == 2 else n.shape[1])
        n2 = None if n is None else n.reshape(b, k * d)
        if distributed:
            cols = [a, p] if n2 is None else [a, p, n2]
            dtype = functools.reduce(torch.promote_types, [c.dtype for c in cols])
            # Gathered in the input dtype (half the traffic for bf16); normalized in fp32 after.
            packed = torch.cat([c.to(dtype) for c in cols], dim=1)
            packed = gdist.gather_with_grad(packed, sizes) if with_grad else gdist.gather_no_grad(packed, sizes)
            a, p = packed[:, :d], packed[:, d : 2 * d]
            n2 = None if n2 is None else packed[:, 2 * d :]
        negs = None if n2 is None or k == 0 else n2.float().reshape(-1, d)
        return a.float(), p.float(), negs


def _normalized(q: Tensor, p: Tensor, n: Tensor | None, dim: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The columns truncated to their first ``dim`` features and L2-normalized (a Matryoshka view)."""
    return tuple(None if t is None else F.normalize(t[:, :dim], dim=-1) for t in (q, p, n))


QP, QN, QQ, PP = range(4)
BLOCKS = ("qp", "qn", "qq", "pp")
"""The candidate blocks, in column order: query-positive, query-negative (slots), query-query, positive-positive."""


class _Layout(NamedTuple):
    """What each candidate column is (each ``[1, C]``, to broadcast against ``[rows, C]``)."""

    owner: Tensor
    """The global row whose text the column holds."""
    block: Tensor
    """``QP``, ``QN``, ``QQ`` or ``PP``."""
    role: Tensor
    """1: a positive of its owner (the ``qp`` column, a positive slot), 0: any other text, -1: an empty slot."""


def _column_layout(n: int, k: int, roles: Tensor | None, contrast_anchors: bool, contrast_positives: bool,
                   device: torch.device) -> _Layout:
    """The :class:`_Layout` of ``[qp | qn | qq | pp]`` for ``n`` global rows with ``k`` slots each, in
    :func:`block_similarities`'s column order."""
    rows = torch.arange(n, device=device)
    zeros = torch.zeros_like(rows)
    slot_roles = zeros.repeat_interleave(k) if roles is None else roles.reshape(-1)
    # (owner, block, role) of each block's columns: the qp column is its owner's positive.
    parts = [(rows, QP, zeros + 1), (rows.repeat_interleave(k), QN, slot_roles)]
    parts += [(rows, block, zeros) for present, block in ((contrast_anchors, QQ), (contrast_positives, PP)) if present]
    owners, blocks, part_roles = zip(*parts)
    block = torch.cat([torch.full_like(owner, index) for owner, index in zip(owners, blocks)])
    return _Layout(torch.cat(owners)[None], block[None], torch.cat(part_roles)[None])


def _count_by_block(mask: Tensor, block: Tensor) -> Tensor:
    """``[4]`` float32: the True entries of ``mask`` ``[rows, C]`` in each block (``block`` ``[1, C]``)."""
    return torch.zeros(len(BLOCKS), device=mask.device).index_add_(0, block[0], mask.sum(0).float())


class _RowParts(NamedTuple):
    """What :meth:`GISTLoss._row_losses` returns for a span of rows (summed over its rows, except the last)."""

    contrastive: Tensor
    """``[M]``: the guided cross-entropy per student view (Matryoshka size)."""
    distillation: Tensor
    """``[M]``: KL(guide || student) per view (zeros without distillation)."""
    duplicates: Tensor
    flagged_by_block: Tensor
    judged_by_block: Tensor
    negatives_left: Tensor
    """``[rows]``: per row, the candidates left in its softmax that are not its positives."""


def margin_threshold(pos_sim: Tensor, margin_strategy: str, margin: float) -> Tensor:
    """The guide score above which (strictly) a candidate is a false negative of a query whose positive the guide
    scores ``pos_sim``: the loss masks such candidates, and `gist-scale mine` never picks them as negatives."""
    if margin_strategy == "absolute":
        return pos_sim - margin
    return pos_sim - pos_sim.abs() * margin


def block_similarities(q: Tensor, p: Tensor, n: Tensor | None, offset: int, b_local: int, contrast_anchors: bool,
                       contrast_positives: bool) -> Tensor:
    """Cosine matrix ``[B_local, C]`` of the local rows against ``[qp | qn | qq | pp]``.

    ``q``, ``p``, ``n`` are global and normalized; this rank's rows are the global rows
    ``offset .. offset + b_local``. The three query blocks share one matmul.
    """
    rows = slice(offset, offset + b_local)
    candidates = [p] + ([n] if n is not None else []) + ([q] if contrast_anchors else [])
    blocks = [q[rows] @ torch.cat(candidates).T] + ([p[rows] @ p.T] if contrast_positives else [])
    return torch.cat(blocks, dim=1)


def _block_ids(ids: Tensor, contrast_anchors: bool, contrast_positives: bool) -> Tensor:
    """The text identity of every column of ``[qp | qn | qq | pp]`` (``[C]``), from the global ``[N, 2 + K]`` ids,
    in :func:`block_similarities`'s column order."""
    blocks = [ids[:, 1], ids[:, 2:].reshape(-1)]  # qp, qn
    blocks += [block for present, block in ((contrast_anchors, ids[:, 0]), (contrast_positives, ids[:, 1])) if present]
    return torch.cat(blocks)


def _check_text_ids(text_ids: tuple, shape: tuple[int, ...]) -> str | None:
    """An error message when ``text_ids`` does not match the columns ``(B, K)`` of ``shape``, else None."""
    b, k = shape[0], shape[1]
    for name, t, numel in zip(("query", "positive", "negative"), text_ids, (b, b, b * k), strict=True):
        if numel == 0 and t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.numel() != numel:
            got = "None" if t is None else f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            return f"text_ids {name} must be {numel} int64 ids (B={b}, K={k}), got {got}"
    return None


def _all_finite(tensors: tuple[Tensor | None, ...], device: torch.device) -> Tensor:
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors if t is not None]).all()


def _raise_if_any_invalid(local_error: str | None, all_meta: list[list[int]]) -> None:
    """Raise the same ``ValueError`` decision on every rank from the exchanged metadata."""
    if local_error is not None:
        raise ValueError(local_error)
    bad = [r for r, row in enumerate(all_meta) if row[-2] != 0]
    if bad:
        raise ValueError(f"invalid loss inputs on rank(s) {bad} (see that rank's error)")
    nonfinite = [r for r, row in enumerate(all_meta) if row[-1] == 0]
    if nonfinite:
        raise ValueError(f"embeddings contain NaN or inf on rank(s) {nonfinite}")
    # K, D, Dg and the guide/negative layout must agree, or the gathered columns would not line up.
    layouts = {tuple(row[1:-2]) for row in all_meta}
    if len(layouts) > 1:
        raise ValueError("ranks disagree on (K, D, Dg, has_negative, has_guide): "
                         + ", ".join(f"rank {r}: {tuple(row[1:-2])}" for r, row in enumerate(all_meta)))


def _check_inputs(
    anchor: Tensor, positive: Tensor, negative: Tensor | None, guide_anchor: Tensor | None,
    guide_positive: Tensor | None, guide_negative: Tensor | None,
) -> tuple[str | None, tuple[int, int, int, int, int, int]]:
    """Validate shapes without raising: ``(error or None, (B, K, D, Dg, has_neg, has_guide))``.

    Not raising lets a distributed caller first tell the other ranks (see
    :func:`_raise_if_any_invalid`). No host sync: only shapes are inspected here.
    """
    bad_shape = (-1, -1, -1, -1, -1, -1)
    named = {"anchor": anchor, "positive": positive, "negative": negative, "guide_anchor": guide_anchor,
             "guide_positive": guide_positive, "guide_negative": guide_negative}
    for name, t in named.items():
        if t is not None and not (isinstance(t, Tensor) and t.is_floating_point()):
            return f"{name} must be a floating-point tensor or None, got {type(t).__name__}", bad_shape
    if anchor is None or positive is None:
        return "anchor and positive are required", bad_shape
    if anchor.ndim != 2 or positive.ndim != 2:
        return f"anchor and positive must be [B, D], got {tuple(anchor.shape)} and {tuple(positive.shape)}", bad_shape
    b, d = anchor.shape
    if positive.shape != (b, d):
        return f"positive shape {tuple(positive.shape)} does not match anchor shape {tuple(anchor.shape)}", bad_shape
    if d == 0:
        return "embedding dimension must be > 0", bad_shape
    k = 0
    if negative is not None:
        if negative.ndim not in (2, 3) or negative.shape[0] != b or negative.shape[-1] != d:
            return f"negative must be [B, D] or [B, K, D] with B={b}, D={d}, got {tuple(negative.shape)}", bad_shape
        k = 1 if negative.ndim == 2 else negative.shape[1]

    guides = (guide_anchor, guide_positive, guide_negative)
    if all(g is None for g in guides):
        return None, (b, k, d, 0, int(negative is not None), 0)
    missing = [f"guide_{c}" if g is None else c for c, s, g in zip(("anchor", "positive", "negative"),
                                                                      (anchor, positive, negative), guides)
               if (s is None) != (g is None)]
    if missing:
        return f"guide embeddings must be given for all columns or none; unmatched: {missing}", bad_shape
    if guide_anchor.ndim != 2:
        return f"guide_anchor must be [B, Dg], got {tuple(guide_anchor.shape)}", bad_shape
    dg = guide_anchor.shape[1]
    if guide_anchor.shape[0] != b or guide_positive.shape != (b, dg) or dg == 0:
        return (f"guide_anchor/guide_positive must both be [B={b}, Dg], got {tuple(guide_anchor.shape)} and "
                f"{tuple(guide_positive.shape)}"), bad_shape
    if guide_negative is not None:
        gk = 1 if guide_negative.ndim == 2 else (guide_negative.shape[1] if guide_negative.ndim == 3 else -1)
        if gk != k or guide_negative.shape[0] != b or guide_negative.shape[-1] != dg:
            return (f"guide_negative must match negative's [B={b}, K={k}] with Dg={dg}, got "
                    f"{tuple(guide_negative.shape)}"), bad_shape
    return None, (b, k, d, dg, int(negative is not None), 1)
