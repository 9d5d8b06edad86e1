"""The guide's policy (in-batch negatives, protected hard negatives, relabel), several positives per row and
distillation from the guide: `GISTLoss` against the naive per-row reference `gist_reference.naive_guided_loss`."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from gist_reference import POLICIES, make_inputs, naive_guided_loss, random_slot_roles, with_duplicates
from test_encode import BagOfTokens, _columns, _embedder

from gist_scale import chunking, encode

from gist_scale.config import LossConfig, SourceConfig
from gist_scale.loss import BLOCKS, GISTLoss, LossPolicy


def _inputs(n: int, k: int, seed: int, duplicates: bool):
    inputs = make_inputs(n, k, seed=seed, related=0.5)
    if duplicates:
        return with_duplicates(inputs)
    return inputs, None


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("roles", [False, True])
@pytest.mark.parametrize("duplicates", [False, True])
def test_matches_the_naive_reference(name, roles, duplicates):
    n, k = 8, 4
    inputs, ids = _inputs(n, k, seed=len(name) + 10 * roles + 20 * duplicates, duplicates=duplicates)
    settings = POLICIES[name]
    roles_tensor = random_slot_roles(n, k, seed=7) if roles else None
    want = naive_guided_loss(**inputs, slot_roles=roles_tensor, text_ids=None if ids is None else (
        ids[0].tolist(), ids[1].tolist(), ids[2].reshape(-1).tolist()), **settings)
    loss, stats = GISTLoss(**settings)(**inputs, slot_roles=roles_tensor,
                                       text_ids=None if ids is None else (ids[0], ids[1], ids[2].reshape(-1)))
    assert loss.item() == pytest.approx(want.loss, rel=1e-4, abs=1e-5)
    assert stats.flagged_by_block.tolist() == want.flagged
    assert stats.judged_by_block.tolist() == want.judged
    assert stats.negatives_left.tolist() == want.negatives_left
    if settings.get("distill_weight"):
        assert stats.distillation.item() > 0
    else:
        assert stats.distillation.item() == 0


def test_the_policies_of_the_reference_do_change_the_loss():
    """The cases above would pass vacuously if the settings did nothing: each changes the loss or the mask."""
    inputs = make_inputs(8, 4, seed=3, related=0.5)
    roles = random_slot_roles(8, 4, seed=7)
    base = naive_guided_loss(**inputs, slot_roles=roles, margin=0.05)
    for name, settings in POLICIES.items():
        if name == "gist":
            continue
        got = naive_guided_loss(**inputs, slot_roles=roles, **{"margin": 0.05, **settings})
        assert got.loss != pytest.approx(base.loss, rel=1e-9) or got.flagged != base.flagged, name
    assert sum(base.flagged) > 0  # the guide flags something here


def test_one_positive_and_no_relabel_is_the_plain_loss():
    """All-negative slots and `relabel` with nothing flagged give the cross-entropy of the default."""
    inputs = make_inputs(8, 3, seed=5, related=0.5)
    plain, plain_stats = GISTLoss()(**inputs)
    zeros, _ = GISTLoss()(**inputs, slot_roles=torch.zeros(8, 3, dtype=torch.int8))
    torch.testing.assert_close(zeros, plain)
    unflagging = GISTLoss(false_negatives="relabel", margin=-10.0)  # a threshold nothing reaches
    relabelled, stats = unflagging(**inputs)
    assert stats.flagged_by_block.sum().item() == 0
    no_mask, _ = GISTLoss(margin=-10.0)(**inputs)
    torch.testing.assert_close(relabelled, no_mask)
    assert plain_stats.flagged_by_block.sum().item() == pytest.approx(
        plain_stats.masked_fraction.item() * 8 * (plain_stats.candidates_per_anchor.item() - 1))


def test_the_policy_argument_equals_a_module_built_with_it():
    inputs = make_inputs(6, 2, seed=9, related=0.5)
    settings = dict(margin=0.1, margin_strategy="relative", contrast_anchors=False, in_batch_negatives=True,
                    protect_hard_negatives=True, false_negatives="relabel")
    built, built_stats = GISTLoss(**settings)(**inputs)
    per_call, call_stats = GISTLoss()(**inputs, policy=LossPolicy(**{**dataclasses.asdict(LossPolicy()), **settings}))
    torch.testing.assert_close(per_call, built)
    assert call_stats.judged_by_block.tolist() == built_stats.judged_by_block.tolist()
    assert call_stats.judged_by_block[BLOCKS.index("qq")].item() == 0  # no query-query block in this policy


def test_a_source_overrides_the_loss_section_where_it_sets_a_value():
    loss = LossConfig(margin=0.1, contrast_anchors=False)
    source = SourceConfig(path="x.jsonl", margin=0.0, in_batch_negatives=False)
    policy = LossPolicy.of(loss, source)
    assert policy.margin == 0.0 and policy.in_batch_negatives is False  # the source's
    assert policy.contrast_anchors is False and policy.false_negatives == "mask"  # the loss section's
    assert LossPolicy.of(loss) == LossPolicy.of(loss, SourceConfig(path="y.jsonl"))


@pytest.mark.parametrize("matryoshka", [None, dict(matryoshka_dims=[16, 4], matryoshka_weights=[1.0, 0.5])])
def test_row_blocks_give_the_same_loss_gradients_and_stats(matryoshka):
    inputs, ids = with_duplicates(make_inputs(9, 4, seed=11, related=0.5))
    roles = random_slot_roles(9, 4, seed=2)
    settings = dict(false_negatives="relabel", distill_weight=1.0, protect_hard_negatives=True, margin=0.05,
                    **(matryoshka or {}))
    results = []
    for row_block in (None, 2):
        student = {c: inputs[c].clone().requires_grad_() for c in ("anchor", "positive", "negative")}
        loss, stats = GISTLoss(row_block=row_block, **settings)(
            **{**inputs, **student}, slot_roles=roles, text_ids=(ids[0], ids[1], ids[2].reshape(-1)))
        loss.backward()
        results.append((loss.detach(), {c: t.grad for c, t in student.items()}, stats))
    (loss, grads, stats), (blocked, blocked_grads, blocked_stats) = results
    torch.testing.assert_close(blocked, loss)
    for c in grads:
        torch.testing.assert_close(blocked_grads[c], grads[c])
    for field in ("flagged_by_block", "judged_by_block", "negatives_left", "distillation", "dim_losses"):
        torch.testing.assert_close(getattr(blocked_stats, field), getattr(stats, field))


def test_distillation_pulls_the_student_towards_the_guide():
    """Pure distillation is zero when the student scores like the guide, and positive when it does not."""
    inputs = make_inputs(6, 2, seed=4, d=12, dg=12, related=0.5)
    same = {**inputs, "anchor": inputs["guide_anchor"], "positive": inputs["guide_positive"],
            "negative": inputs["guide_negative"]}
    distill = GISTLoss(contrastive_weight=0.0, distill_weight=1.0)
    assert distill(**same)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert distill(**inputs)[0].item() > 0.01


@pytest.mark.parametrize("kwargs, call, match", [
    (dict(distill_weight=1.0), dict(no_guide=True), "distills from the guide"),
    ({}, dict(slot_roles=torch.zeros(5, 3, dtype=torch.int8)), "slot_roles must be"),
])
def test_bad_inputs(kwargs, call, match):
    inputs = make_inputs(6, 2, seed=1)
    if call.pop("no_guide", False):
        inputs = {name: None if name.startswith("guide") else t for name, t in inputs.items()}
    with pytest.raises(ValueError, match=match):
        GISTLoss(**kwargs)(**inputs, **call)


@pytest.mark.parametrize("kwargs, match", [
    (dict(false_negatives="drop"), "false_negatives='drop'"),
    (dict(distill_weight=-1.0), "distill_weight"),
    (dict(contrastive_weight=0.0), "at least one > 0"),
    (dict(distill_temperature=0.0), "distill_temperature"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GISTLoss(**kwargs)


def test_grad_cache_with_distillation_relabel_and_several_positives_matches_the_plain_step(tiny_model_dir):
    """Through GradCache the loss is taken on the embedding leaves, so distillation, relabelling and several
    positives change only the cached gradient: same loss and parameter gradients as the plain step."""
    plain = _embedder(tiny_model_dir).train()
    cached = copy.deepcopy(plain)
    columns = _columns(b=6, k=2)
    roles = torch.tensor([[1, 0], [-1, 0], [1, 0], [0, 0], [-1, 0], [1, 0]], dtype=torch.int8)
    loss_fn = GISTLoss(distill_weight=2.0, false_negatives="relabel", margin=0.05, matryoshka_dims=[32, 8])
    guide = encode.encode_columns(BagOfTokens().requires_grad_(False), columns, 2)

    loss, stats = loss_fn(*encode.encode_columns(plain, chunking.chunk_texts(columns, 3), 2), *guide,
                          slot_roles=roles)
    loss.backward()
    cache = encode.GradCache(cached, chunking.chunk_texts(columns, 3), 2)
    cached_loss, _ = loss_fn(*cache.embeddings, *guide, slot_roles=roles)
    cache.backward(cached_loss)

    assert stats.distillation.sum().item() > 0
    torch.testing.assert_close(cached_loss, loss, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("settings", [dict(false_negatives="relabel"), dict(distill_weight=1.0), {}])
def test_pairs_without_in_batch_negatives_give_zero_loss_and_finite_gradients(settings):
    """Pairs with in-batch negatives off leave each row only its positive: nothing to contrast, so the loss is 0 and
    no NaN leaks from the all-masked rows into the gradients."""
    inputs = make_inputs(5, None, seed=1)
    student = {c: inputs[c].clone().requires_grad_() for c in ("anchor", "positive")}
    loss, stats = GISTLoss(in_batch_negatives=False, **settings)(**{**inputs, **student})
    loss.backward()
    assert loss.item() == 0.0 and stats.negatives_left.sum().item() == 0
    assert all(torch.isfinite(t.grad).all() for t in student.values())
