"""Single-process tests of GISTLoss: formulation, sentence-transformers parity, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch
from gist_reference import make_inputs, naive_gist_loss, st_gist_loss, with_duplicates

from gist_scale import GISTLoss
from gist_scale.loss import LossStats

# k=None: no negatives; k=0: negatives as [B, D]; k>=1: [B, K, D]
NEGATIVES = [None, 0, 1, 3]


def _loss(inputs, **kwargs) -> tuple[torch.Tensor, LossStats]:
    return GISTLoss(**kwargs)(**inputs)


def _no_ties(inputs, margin: float = 0.0) -> None:
    """The original relies on the guide threshold to drop self pairs; that needs threshold < 1."""
    ga = torch.nn.functional.normalize(inputs["guide_anchor"].double(), dim=-1)
    gp = torch.nn.functional.normalize(inputs["guide_positive"].double(), dim=-1)
    assert ((ga * gp).sum(-1) - margin < 1 - 1e-6).all()


@pytest.mark.parametrize("k", NEGATIVES)
@pytest.mark.parametrize(
    "contrast_anchors,contrast_positives", [(True, True), (False, True), (True, False), (False, False)]
)
def test_matches_naive_original_formulation(k, contrast_anchors, contrast_positives):
    inputs = make_inputs(7, k, seed=11)
    _no_ties(inputs)
    flags = dict(contrast_anchors=contrast_anchors, contrast_positives=contrast_positives)
    loss, stats = _loss(inputs, **flags)
    expected, masked, maskable, _ = naive_gist_loss(**inputs, **flags)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=5e-5)
    assert stats.masked_fraction.item() == pytest.approx(masked / maskable, abs=1e-6)
    assert 0 < masked < maskable  # the guide is actually doing something in this test


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize(
    "strategy,margin", [("absolute", 0.1), ("relative", 0.1), ("absolute", 0.5), ("relative", -0.2)]
)
def test_matches_naive_with_margins(k, strategy, margin):
    inputs = make_inputs(6, k, seed=3)
    kwargs = dict(margin_strategy=strategy, margin=margin)
    loss, stats = _loss(inputs, **kwargs)
    expected, masked, maskable, _ = naive_gist_loss(**inputs, exclude_self=True, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=5e-5)
    assert stats.masked_fraction.item() == pytest.approx(masked / maskable, abs=1e-6)


def test_no_guide_is_plain_infonce_without_self_pairs():
    inputs = make_inputs(6, 2, seed=5)
    no_guide = {**inputs, "guide_anchor": None, "guide_positive": None, "guide_negative": None}
    loss, stats = _loss(no_guide)
    expected, masked, _, _ = naive_gist_loss(**no_guide, exclude_self=True)
    assert masked == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=5e-5)
    assert stats.masked_fraction.item() == 0.0
    # without a guide (and with one) the self pairs never enter the denominator
    assert stats.candidates_per_anchor.item() == 6 + 12 + 5 + 5


def test_self_pairs_excluded_even_when_guide_threshold_ties():
    """The one deliberate difference from the original (see the loss module docstring)."""
    inputs = make_inputs(5, None, seed=7)
    inputs["guide_positive"][2] = inputs["guide_anchor"][2]  # guide threshold of row 2 is exactly 1
    ours = GISTLoss()(**inputs)[0].item()
    always_excluded, _, _, _ = naive_gist_loss(**inputs, exclude_self=True)
    original, _, _, _ = naive_gist_loss(**inputs, exclude_self=False)
    assert ours == pytest.approx(always_excluded, rel=1e-5, abs=5e-5)
    assert abs(ours - original) > 1e-3  # the original keeps (q_2, q_2) and (p_2, p_2) in the denominator


def test_positive_never_masked_even_with_large_margin():
    inputs = make_inputs(6, 1, seed=2)
    # threshold g_ii - 2 <= -1: every candidate but the positive is masked
    loss, stats = GISTLoss(margin=2.0)(**inputs)
    assert loss.item() == 0.0  # one surviving logit, the label
    assert stats.masked_fraction.item() == 1.0


@pytest.mark.parametrize("k", [None, 0])
@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize("margin", [0.0, 0.1])
@pytest.mark.parametrize("contrast_anchors", [True, False])
@pytest.mark.parametrize("contrast_positives", [True, False])
def test_matches_sentence_transformers(k, strategy, margin, contrast_anchors, contrast_positives):
    # related=1: an O(1) loss as in real training (an O(1/temperature) one would spend the 1e-5
    # budget on fp32 rounding alone); seed 23 makes the guide mask something in every case.
    inputs = make_inputs(8, k, seed=23, related=1.0)
    _no_ties(inputs, margin)
    kwargs = dict(
        temperature=0.01,
        margin_strategy=strategy,
        margin=margin,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
    )
    ours, stats = GISTLoss(**kwargs)(**inputs)
    theirs = st_gist_loss(**inputs, **kwargs)
    assert stats.masked_fraction.item() > 0
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_bf16_inputs_match_fp32_of_the_rounded_inputs():
    bf16 = make_inputs(8, 2, seed=4, dtype=torch.bfloat16)
    fp32 = {name: t.float() for name, t in bf16.items()}
    loss_bf16, stats = _loss(bf16, temperature=0.01)
    loss_fp32, _ = _loss(fp32, temperature=0.01)
    assert loss_bf16.dtype == torch.float32 and torch.isfinite(loss_bf16)
    # the cast to fp32 is the first thing that happens, so bf16 only costs the input rounding
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=0, atol=1e-6)
    assert stats.masked_fraction.dtype == torch.float32


def test_fp16_and_mixed_dtypes_give_fp32_loss_and_grads_in_input_dtype():
    inputs = make_inputs(5, 1, seed=9)
    student = {k: inputs[k].half().requires_grad_() for k in ("anchor", "positive", "negative")}
    loss, _ = GISTLoss()(**{**inputs, **student})
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(t.grad is not None and t.grad.dtype == torch.float16 for t in student.values())


def test_row_whose_guide_masks_every_negative_is_finite():
    inputs = make_inputs(6, 2, seed=8)
    # Row 0: the guide puts the positive opposite the query, so the threshold is -1 and every
    # other candidate of that row scores above it.
    inputs["guide_positive"][0] = -inputs["guide_anchor"][0]
    student = {k: inputs[k].clone().requires_grad_() for k in ("anchor", "positive", "negative")}
    loss, _ = GISTLoss()(**{**inputs, **student})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in student.values())
    expected, _, _, _ = naive_gist_loss(**inputs, exclude_self=True)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=5e-5)


def test_single_row_batch_with_guide_is_finite():
    loss, _ = GISTLoss()(**make_inputs(1, None, seed=1))
    assert loss.item() == 0.0  # only the positive is a candidate


def test_stats_are_detached_zero_dim_tensors():
    inputs = make_inputs(4, 3, seed=6)
    student = {k: inputs[k].clone().requires_grad_() for k in ("anchor", "positive", "negative")}
    fn = GISTLoss(contrast_anchors=False)
    _, stats = fn(**{**inputs, **student})
    assert not hasattr(fn, "last_stats")  # returned with the loss, not kept on the module for the next call
    assert isinstance(stats, LossStats)
    for value in (stats.masked_fraction, stats.candidates_per_anchor, stats.local_rows, stats.global_rows):
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad
    assert stats.candidates_per_anchor.item() == 4 + 12 + 3  # qp + qn + pp minus the self pair
    assert stats.local_rows.item() == stats.global_rows.item() == 4


def test_guide_receives_no_gradient():
    inputs = make_inputs(4, 1, seed=10)
    tensors = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    GISTLoss()(**tensors)[0].backward()
    assert all(tensors[k].grad is None for k in ("guide_anchor", "guide_positive", "guide_negative"))
    assert all(tensors[k].grad is not None for k in ("anchor", "positive", "negative"))


def test_guide_may_have_a_different_width_and_dtype():
    inputs = make_inputs(5, 2, d=16, dg=7, seed=12)
    inputs["guide_anchor"] = inputs["guide_anchor"].double()
    loss, _ = GISTLoss()(**inputs)
    expected, _, _, _ = naive_gist_loss(**inputs)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=5e-5)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(margin_strategy="percent"), "margin_strategy"),
        (dict(margin=math.inf), "margin"),
        (dict(row_block=0), "row_block"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GISTLoss(**kwargs)


def _mutate(name, fn):
    def apply(inputs):
        inputs[name] = fn(inputs[name])
        return inputs

    return apply


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_mutate("positive", lambda t: t[:-1]), "positive shape"),
        (_mutate("negative", lambda t: t[:-1]), "negative must be"),
        (_mutate("negative", lambda t: t[..., :-1]), "negative must be"),
        (_mutate("guide_positive", lambda t: t[:-1]), "guide_anchor/guide_positive"),
        (_mutate("guide_negative", lambda t: t[:, :1]), "guide_negative must match"),
        (_mutate("guide_negative", lambda t: None), "all columns or none"),
        (_mutate("guide_anchor", lambda t: None), "all columns or none"),
        (_mutate("negative", lambda t: None), "all columns or none"),
        (_mutate("anchor", lambda t: t.long()), "floating-point"),
        (_mutate("anchor", lambda t: t[0]), r"\[B, D\]"),
        (_mutate("anchor", lambda t: t.index_fill(0, torch.tensor([1]), math.nan)), "NaN or inf"),
        (_mutate("negative", lambda t: t.index_fill(0, torch.tensor([2]), math.inf)), "NaN or inf"),
        (_mutate("guide_positive", lambda t: t.index_fill(0, torch.tensor([0]), -math.inf)), "NaN or inf"),
    ],
)
def test_bad_inputs(mutate, match):
    inputs = mutate(make_inputs(4, 2, seed=0))
    with pytest.raises(ValueError, match=match):
        GISTLoss()(**inputs)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        GISTLoss()(**make_inputs(0, 1))


def test_guide_ties_with_the_threshold_are_kept():
    """Strict ``>``: a candidate the guide rates exactly as high as the positive stays in."""
    inputs = make_inputs(5, 1, seed=13)
    # One-hot guide vectors make every guide cosine exactly 1.0 (no rounding anywhere), so
    # every candidate ties with every threshold.
    for name in ("guide_anchor", "guide_positive", "guide_negative"):
        inputs[name] = torch.zeros_like(inputs[name])
        inputs[name][..., 0] = 1.0
    loss, stats = GISTLoss()(**inputs)
    no_guide = {name: None if name.startswith("guide") else t for name, t in inputs.items()}
    assert stats.masked_fraction.item() == 0.0
    torch.testing.assert_close(loss, GISTLoss()(**no_guide)[0], rtol=0, atol=0)


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("row_block", [1, 3, 7])
def test_row_blocks_give_the_same_loss_gradients_and_stats(k, row_block):
    inputs = make_inputs(7, k, seed=3, related=0.5)
    student = [c for c in ("anchor", "positive", "negative") if inputs[c] is not None]
    results = []
    for block in (None, row_block):
        leaves = {c: inputs[c].clone().requires_grad_() for c in student}
        loss, stats = GISTLoss(margin=0.05, row_block=block)(**{**inputs, **leaves})
        loss.backward()
        results.append((loss.detach(), [leaves[c].grad for c in student], stats))
    (loss, grads, stats), (blocked, blocked_grads, blocked_stats) = results
    torch.testing.assert_close(blocked, loss, rtol=0, atol=1e-5)
    for got, want in zip(blocked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert blocked_stats.masked_fraction.item() == stats.masked_fraction.item() > 0
    assert blocked_stats.candidates_per_anchor.item() == stats.candidates_per_anchor.item()


def test_row_blocks_bound_the_largest_intermediate():
    """With row blocks no tensor of the forward or the backward exceeds row_block x C elements (C candidates):
    the loss memory of a 16,384-triplet batch stops growing with its square."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestOutput(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
            return out

    b, k = 256, 1
    candidates = b * (2 + k) + b  # qp, qn, qq and pp blocks
    inputs = make_inputs(b, k, seed=5)
    for block, bound in ((None, b * candidates), (32, 32 * candidates)):
        leaves = {c: inputs[c].clone().requires_grad_() for c in ("anchor", "positive", "negative")}
        with LargestOutput() as largest:
            GISTLoss(row_block=block)(**{**inputs, **leaves})[0].backward()
        assert largest.numel == bound, block


# ---------------------------------------------------------------------------- Matryoshka


@pytest.mark.parametrize("k", [None, 0])
@pytest.mark.parametrize("dims,weights", [([16, 8, 4], None), ([4, 16, 8], [0.5, 2.0, 1.0]), ([12, 3], [1.0, 3.0])])
@pytest.mark.parametrize("contrast_anchors,contrast_positives", [(True, True), (False, True), (True, False)])
def test_matryoshka_matches_sentence_transformers(k, dims, weights, contrast_anchors, contrast_positives):
    """Loss, input gradients and the per-size losses equal MatryoshkaLoss(GISTEmbedLoss) on the same tensors."""
    inputs = make_inputs(8, k, seed=23, related=1.0)
    _no_ties(inputs)
    kwargs = dict(margin=0.05, contrast_anchors=contrast_anchors, contrast_positives=contrast_positives)
    student = [c for c in ("anchor", "positive", "negative") if inputs[c] is not None]
    grads = []
    for reference in (False, True):
        leaves = {c: inputs[c].clone().requires_grad_() for c in student}
        if reference:
            loss = st_gist_loss(**{**inputs, **leaves}, matryoshka_dims=dims, matryoshka_weights=weights, **kwargs)
        else:
            loss, stats = GISTLoss(matryoshka_dims=dims, matryoshka_weights=weights, **kwargs)(**{**inputs, **leaves})
            ours = loss
        loss.backward()
        grads.append([leaves[c].grad for c in student])
    assert abs(ours.item() - loss.item()) <= 1e-5
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # One unweighted loss per size, largest first: each is ST's GISTEmbedLoss on the truncated embeddings.
    per_size = [st_gist_loss(**{c: t if t is None or c.startswith("guide") else t[..., :dim]
                                for c, t in inputs.items()}, **kwargs).item() for dim in sorted(dims, reverse=True)]
    torch.testing.assert_close(stats.dim_losses, torch.tensor(per_size), rtol=0, atol=1e-5)
    assert stats.masked_fraction.item() > 0


def test_matryoshka_at_the_full_dimension_alone_is_the_plain_loss():
    inputs = make_inputs(6, 2, seed=4, related=0.5)
    plain, stats = _loss(inputs)
    full, matryoshka_stats = _loss(inputs, matryoshka_dims=[16])
    torch.testing.assert_close(full, plain, rtol=0, atol=0)
    torch.testing.assert_close(matryoshka_stats.dim_losses, plain.view(1), rtol=0, atol=0)
    assert stats.dim_losses.shape == (1,)


def test_matryoshka_builds_the_guide_mask_once(monkeypatch):
    """The guide similarities are computed once per row block, whatever the number of sizes: each size adds only its
    own student similarity matrix."""
    import gist_scale.loss as loss_module

    calls = []
    original = loss_module.block_similarities

    def counting(q, *args):
        calls.append(q.shape[-1])
        return original(q, *args)

    monkeypatch.setattr(loss_module, "block_similarities", counting)
    inputs = make_inputs(6, 1, d=16, dg=12, seed=2)
    GISTLoss(matryoshka_dims=[16, 8, 4, 2])(**inputs)
    assert sorted(calls) == [2, 4, 8, 12, 16]  # the guide (12 wide) once, the student at each size
    calls.clear()
    GISTLoss(matryoshka_dims=[16, 8], row_block=2)(**inputs)
    assert sorted(calls) == [8] * 3 + [12] * 3 + [16] * 3  # 3 row blocks


@pytest.mark.parametrize("k", [None, 2])
def test_matryoshka_row_blocks_give_the_same_loss_and_gradients(k):
    inputs = make_inputs(7, k, seed=3, related=0.5)
    student = [c for c in ("anchor", "positive", "negative") if inputs[c] is not None]
    results = []
    for block in (None, 3):
        leaves = {c: inputs[c].clone().requires_grad_() for c in student}
        fn = GISTLoss(margin=0.05, row_block=block, matryoshka_dims=[16, 6], matryoshka_weights=[1.0, 0.3])
        loss, stats = fn(**{**inputs, **leaves})
        loss.backward()
        results.append((loss.detach(), [leaves[c].grad for c in student], stats))
    (loss, grads, stats), (blocked, blocked_grads, blocked_stats) = results
    torch.testing.assert_close(blocked, loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(blocked_stats.dim_losses, stats.dim_losses, rtol=0, atol=1e-5)
    for got, want in zip(blocked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(matryoshka_dims=[]), "positive embedding sizes"),
        (dict(matryoshka_dims=[8, 0]), "positive embedding sizes"),
        (dict(matryoshka_dims=[8, 8]), "appears twice"),
        (dict(matryoshka_dims=[8, 4], matryoshka_weights=[1.0]), "one weight per size"),
        (dict(matryoshka_dims=[8, 4], matryoshka_weights=[1.0, -1.0]), "finite and > 0"),
        (dict(matryoshka_weights=[1.0]), "needs loss.matryoshka_dims"),
    ],
)
def test_bad_matryoshka_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GISTLoss(**kwargs)


def test_matryoshka_size_larger_than_the_embeddings_is_an_error():
    with pytest.raises(ValueError, match="matryoshka_dims has 32, larger than the student's embedding dimension 16"):
        GISTLoss(matryoshka_dims=[32, 8])(**make_inputs(4, 1))


# ---------------------------------------------------------------------------- duplicates


def _as_lists(text_ids):
    return tuple(t.reshape(-1).tolist() for t in text_ids)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("contrast_anchors,contrast_positives", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("strategy,margin", [("absolute", 0.0), ("relative", 0.1)])
def test_duplicates_are_masked_by_identity_as_the_naive_reference(k, contrast_anchors, contrast_positives, strategy,
                                                                  margin):
    """A candidate whose text is the row's positive or query is masked whatever the guide scores it (its score ties
    the threshold), counted in `duplicates_masked`; the guide's count and the loss equal the naive loop with the
    rule. Without the rule (`mask_duplicates=False`) the loss is the original's, which keeps the tied duplicates."""
    inputs, text_ids = with_duplicates(make_inputs(9, k, seed=31, related=1.0))
    kwargs = dict(contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, margin_strategy=strategy,
                  margin=margin)
    loss, stats = GISTLoss(**kwargs)(**inputs, text_ids=text_ids)
    want = naive_gist_loss(**inputs, exclude_self=True, text_ids=_as_lists(text_ids), **kwargs)
    assert loss.item() == pytest.approx(want.loss, rel=1e-5, abs=5e-5)
    assert want.duplicates > 0 and stats.duplicates_masked.item() == want.duplicates
    assert stats.masked_fraction.item() == pytest.approx(want.masked / want.maskable, abs=1e-6)

    kept, original_stats = GISTLoss(mask_duplicates=False, **kwargs)(**inputs, text_ids=text_ids)
    plain = naive_gist_loss(**inputs, exclude_self=True, **kwargs)
    assert kept.item() == pytest.approx(plain.loss, rel=1e-5, abs=5e-5)
    assert original_stats.duplicates_masked.item() == 0
    if margin == 0:
        # A duplicate of the positive ties the threshold exactly: the original (float64, exact) keeps it as a negative.
        assert abs(plain.loss - want.loss) > 1e-3
    else:
        # A positive margin puts the tie above the threshold: the guide masks the duplicates too, same loss.
        assert plain.loss == pytest.approx(want.loss, rel=1e-6)


def test_duplicates_in_row_blocks_and_matryoshka_sizes():
    """The duplicate mask is built per row block like the guide mask and shared by every Matryoshka size."""
    inputs, text_ids = with_duplicates(make_inputs(9, 2, seed=8, related=1.0))
    results = []
    for row_block in (None, 2):
        leaves = {c: inputs[c].clone().requires_grad_() for c in ("anchor", "positive", "negative")}
        loss, stats = GISTLoss(row_block=row_block, matryoshka_dims=[16, 8])(**{**inputs, **leaves}, text_ids=text_ids)
        loss.backward()
        results.append((loss.detach(), stats, [leaves[c].grad for c in leaves]))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for got, want in zip(grads_b, grads_a):
        torch.testing.assert_close(got, want)
    assert stats_a.duplicates_masked.item() == stats_b.duplicates_masked.item() > 0
    truncated = {c: t if t is None or c.startswith("guide") else t[..., :8] for c, t in inputs.items()}
    small = naive_gist_loss(**truncated, exclude_self=True, text_ids=_as_lists(text_ids))
    assert stats_a.dim_losses[1].item() == pytest.approx(small.loss, rel=1e-5, abs=5e-5)


def test_text_ids_of_the_wrong_shape_are_refused():
    inputs, (q, p, n) = with_duplicates(make_inputs(8, 2, seed=1))
    with pytest.raises(ValueError, match="text_ids negative must be 16 int64 ids"):
        GISTLoss()(**inputs, text_ids=(q, p, n[:, :1]))
    with pytest.raises(ValueError, match="text_ids query must be 8 int64 ids"):
        GISTLoss()(**inputs, text_ids=(q.float(), p, n))
