"""Multi-process (gloo, CPU) tests of the global-batch GISTLoss and of gist_scale.distributed.

Each spawned group runs several cases, because starting ranks dominates the runtime. A failing
assertion on any rank fails the test with that rank's traceback; a hang fails it by timeout.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from gist_reference import POLICIES, make_inputs, random_slot_roles, st_gist_loss, with_duplicates
from torch import nn

from gist_scale import distributed as gdist
from gist_scale.loss import GISTLoss, LossPolicy

STUDENT = ("anchor", "positive", "negative")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 0) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------- no process group


def test_helpers_are_identities_without_a_process_group():
    t = torch.randn(3, 2, requires_grad=True)
    assert not gdist.is_distributed() and gdist.world_size() == 1 and gdist.rank() == 0
    assert gdist.gather_with_grad(t) is t
    assert not gdist.gather_no_grad(t).requires_grad
    assert gdist.gather_sizes(3) == [3]
    assert torch.equal(gdist.all_reduce_sum(t), t.detach())
    assert gdist.all_reduce_mean(torch.tensor(3)).dtype == torch.float32
    nonfinite = torch.tensor(True)
    skip, stop = gdist.agree_on_step(nonfinite, False)
    assert skip is nonfinite and stop is False  # alone: nothing moves, nothing is read
    assert gdist.agree_on_step(nonfinite, True)[1] is True
    assert gdist.main_process_decides(True) and not gdist.main_process_decides(False)


# ---------------------------------------------------------------------------- exactness


# (sizes per rank, K (None: no negatives, 0: [B, D]), guide, contrast_anchors, contrast_positives, strategy, margin)
CASES = {
    2: [
        ((4, 4), None, True, True, True, "absolute", 0.0),
        ((5, 2), 3, True, True, True, "absolute", 0.0),
        ((3, 6), 0, True, False, True, "relative", 0.1),
        ((6, 1), 1, False, True, True, "absolute", 0.0),
        ((2, 5), 2, True, True, False, "absolute", 0.1),
    ],
    3: [
        ((3, 3, 3), 3, True, True, True, "absolute", 0.0),
        ((4, 1, 2), 0, True, True, True, "relative", 0.1),
        ((2, 0, 3), 2, True, True, True, "absolute", 0.0),  # a rank with no rows at all
        ((1, 5, 2), None, False, False, True, "absolute", 0.0),
    ],
}


# Every case also runs as Matryoshka GIST: sizes in any order, unequal weights, the full width (16) among them.
MATRYOSHKA = (None, dict(matryoshka_dims=[4, 16, 8], matryoshka_weights=[2.0, 1.0, 0.5]))


def _exactness_worker(rank: int, world: int, cases) -> None:
    for (i, (sizes, k, guided, ca, cp, strategy, margin)), matryoshka in (
            (case, m) for m in MATRYOSHKA for case in enumerate(cases)):
        what = f"case {i} sizes={sizes} k={k} guide={guided} matryoshka={matryoshka} rank={rank}"
        full = make_inputs(sum(sizes), k, seed=100 + i, related=0.5)
        if not guided:
            full = {name: (None if name.startswith("guide") else t) for name, t in full.items()}
        kwargs = dict(margin_strategy=strategy, margin=margin, contrast_anchors=ca, contrast_positives=cp,
                      **(matryoshka or {}))

        ref_student = {c: full[c].clone().requires_grad_() for c in STUDENT if full[c] is not None}
        ref, ref_stats = GISTLoss(gather_across_ranks=False, **kwargs)(**{**full, **ref_student})
        ref.backward()

        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        local = {name: None if t is None else t[rows].clone() for name, t in full.items()}
        local_student = {c: local[c].requires_grad_() for c in STUDENT if local[c] is not None}
        # Every other case computes the loss in row blocks of 2 (recomputed in the backward), and every third is
        # told the ranks' sizes instead of exchanging them: same results.
        told = i % 3 == 2
        fn = GISTLoss(row_block=2 if i % 2 else None, check_finite=not told, **kwargs)
        loss, stats = fn(**local, rank_sizes=list(sizes) if told else None)
        loss.backward()

        # (a) the mean over ranks is the full-batch loss
        _close(gdist.all_reduce_mean(loss), ref.detach(), f"{what}: mean loss")
        _close(gdist.all_reduce_mean(stats.dim_losses), ref_stats.dim_losses, f"{what}: per size")
        # (b) after gradient averaging (/ world) the input gradients are the single-process ones
        for c, t in local_student.items():
            # Matryoshka gradients sum several sizes' (weights up to 2): fp32 rounding then grows with them.
            _close(t.grad / world, ref_student[c].grad[rows], f"{what}: grad of {c}", rtol=1e-5 if matryoshka else 0)
        assert stats.global_rows.item() == sum(sizes)
        assert stats.local_rows.item() == sizes[rank]
        n, kk = sum(sizes), (0 if k is None else max(k, 1))
        assert stats.candidates_per_anchor.item() == n + n * kk + (n - 1) * ca + (n - 1) * cp


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_global_loss_and_input_grads_match_single_process(world):
    run_distributed(_exactness_worker, world, args=(CASES[world],))


def _duplicates_worker(rank: int, world: int) -> None:
    """Text identities travel with the embeddings: the duplicate rule over the global batch equals one process."""
    for i, (sizes, k, matryoshka) in enumerate([((5, 4), 2, None), ((3, 6), 1, MATRYOSHKA[1]), ((7, 2), 3, None)]):
        what = f"duplicates case {i} sizes={sizes} k={k} rank={rank}"
        full, ids = with_duplicates(make_inputs(sum(sizes), k, seed=300 + i, related=1.0))
        kwargs = matryoshka or {}
        ref_student = {c: full[c].clone().requires_grad_() for c in STUDENT}
        ref, ref_stats = GISTLoss(gather_across_ranks=False, **kwargs)(**{**full, **ref_student}, text_ids=ids)
        ref.backward()

        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        local = {name: t[rows].clone() for name, t in full.items()}
        local_student = {c: local[c].requires_grad_() for c in STUDENT}
        fn = GISTLoss(row_block=2 if i == 1 else None, **kwargs)
        loss, stats = fn(**local, text_ids=tuple(t[rows] for t in ids))
        loss.backward()
        _close(gdist.all_reduce_mean(loss), ref.detach(), f"{what}: mean loss")
        for c, t in local_student.items():
            _close(t.grad / world, ref_student[c].grad[rows], f"{what}: grad of {c}", rtol=1e-5)
        total = gdist.all_reduce_sum(stats.duplicates_masked)
        assert total.item() == ref_stats.duplicates_masked.item() > 0, what


@pytest.mark.slow
def test_duplicate_rule_over_the_global_batch_matches_single_process():
    run_distributed(_duplicates_worker, 2)


def _guidance_worker(rank: int, world: int) -> None:
    """Several positives, the guide's policy (given per call, as the trainer gives a source's) and distillation over
    the global batch equal one process holding it, in loss, input gradients and mask counts."""
    cases = [((5, 4), "everything", None), ((3, 6), "no_in_batch", None), ((4, 4), "relabel", MATRYOSHKA[1]),
             ((6, 2), "distill", MATRYOSHKA[1]), ((4, 5), "distill_only", None), ((2, 7), "protected", None)]
    for i, (sizes, name, matryoshka) in enumerate(cases):
        what = f"guidance case {i} {name} sizes={sizes} rank={rank}"
        n, k = sum(sizes), 4
        full, ids = with_duplicates(make_inputs(n, k, seed=500 + i, related=0.5))
        ids = (ids[0], ids[1], ids[2].reshape(n, k))
        roles = random_slot_roles(n, k, seed=i)
        settings = POLICIES[name]
        policy = LossPolicy(**{f: settings[f] for f in settings if f in LossPolicy.__dataclass_fields__})
        weights = {f: v for f, v in settings.items() if f not in LossPolicy.__dataclass_fields__}
        kwargs = {**weights, **(matryoshka or {})}
        ref_student = {c: full[c].clone().requires_grad_() for c in STUDENT}
        ref, ref_stats = GISTLoss(gather_across_ranks=False, **kwargs)(
            **{**full, **ref_student}, text_ids=(ids[0], ids[1], ids[2].reshape(-1)), slot_roles=roles,
            policy=policy)
        ref.backward()

        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        local = {name: t[rows].clone() for name, t in full.items()}
        local_student = {c: local[c].requires_grad_() for c in STUDENT}
        told = i % 2 == 1
        loss, stats = GISTLoss(row_block=2 if i % 3 == 0 else None, check_finite=not told, **kwargs)(
            **local, text_ids=(ids[0][rows], ids[1][rows], ids[2][rows].reshape(-1)), slot_roles=roles[rows],
            policy=policy, rank_sizes=list(sizes) if told else None)
        loss.backward()
        _close(gdist.all_reduce_mean(loss), ref.detach(), f"{what}: mean loss")
        _close(gdist.all_reduce_mean(stats.distillation), ref_stats.distillation, f"{what}: distillation")
        for c, t in local_student.items():
            _close(t.grad / world, ref_student[c].grad[rows], f"{what}: grad of {c}", rtol=1e-5)
        for field in ("flagged_by_block", "judged_by_block"):
            assert torch.equal(gdist.all_reduce_sum(getattr(stats, field)), getattr(ref_stats, field)), what
        assert torch.equal(stats.negatives_left, ref_stats.negatives_left[rows]), what


@pytest.mark.slow
def test_policies_positives_and_distillation_over_the_global_batch_match_single_process():
    run_distributed(_guidance_worker, 2)


def _ddp_worker(rank: int, world: int, sizes: tuple[int, ...]) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    d_in, d, dg, k = 10, 8, 6, 2
    n = sum(sizes)
    gen = torch.Generator().manual_seed(0)
    raw = {c: torch.randn(n, *((k,) if c == "negative" else ()), d_in, generator=gen) for c in STUDENT}
    guide = torch.randn(d_in, dg, generator=gen)  # a frozen "guide encoder"
    model = nn.Linear(d_in, d)
    with torch.no_grad():  # identical init on all ranks without relying on DDP's broadcast
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    reference = copy.deepcopy(model)

    def step(module: nn.Module, batch: dict[str, torch.Tensor], loss_fn: GISTLoss) -> None:
        b = batch["anchor"].shape[0]
        # One forward for all columns: DDP expects one forward per backward.
        flat = torch.cat([batch["anchor"], batch["positive"], batch["negative"].reshape(-1, d_in)])
        emb = module(flat)
        embeddings = {"anchor": emb[:b], "positive": emb[b : 2 * b], "negative": emb[2 * b :].reshape(b, k, d)}
        guides = {f"guide_{c}": batch[c] @ guide for c in STUDENT}
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        loss_fn(**embeddings, **guides)[0].backward()
        optimizer.step()

    step(reference, raw, GISTLoss(gather_across_ranks=False, margin=0.05))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    step(DDP(model), {c: t[rows] for c, t in raw.items()}, GISTLoss(margin=0.05))
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        _close(p.grad, p_ref.grad, f"rank {rank} grad of {name}")
        _close(p.detach(), p_ref.detach(), f"rank {rank} {name} after one step")


@pytest.mark.slow
def test_ddp_linear_encoder_one_step_matches_single_process():
    run_distributed(_ddp_worker, 2, args=((5, 3),))


# ---------------------------------------------------------------------------- vs sentence-transformers


def _st_worker(rank: int, world: int, per_rank: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # ST's gather goes through torch's deprecated autograd all_gather
    configs = [
        (None, "absolute", 0.0, True),
        (0, "absolute", 0.0, True),
        (0, "relative", 0.1, True),
        (None, "absolute", 0.1, False),
        (0, "relative", 0.0, False),
    ]
    for i, (k, strategy, margin, cp) in enumerate(configs):
        full = make_inputs(per_rank * world, k, seed=200 + i, related=1.0)
        local = {name: None if t is None else t[rank * per_rank : (rank + 1) * per_rank] for name, t in full.items()}
        kwargs = dict(margin_strategy=strategy, margin=margin, contrast_anchors=False, contrast_positives=cp)
        ours, _ = GISTLoss(**kwargs)(**local)
        theirs = st_gist_loss(**local, gather_across_devices=True, **kwargs)
        assert abs(ours.item() - theirs.item()) <= 1e-5, (i, rank, ours.item(), theirs.item())


@pytest.mark.slow
def test_matches_sentence_transformers_gathered_without_anchor_contrast():
    run_distributed(_st_worker, 2, args=(4,))


# ---------------------------------------------------------------------------- collectives, failure agreement


def _helpers_worker(rank: int, world: int) -> None:
    sizes = [3, 0, 2][:world]
    assert gdist.is_distributed() and gdist.world_size() == world and gdist.rank() == rank
    assert gdist.gather_sizes(sizes[rank]) == sizes

    # uneven gather without grad: rows carry their owner's rank
    local = torch.full((sizes[rank], 2), float(rank))
    expected = torch.cat([torch.full((s, 2), float(r)) for r, s in enumerate(sizes)])
    assert torch.equal(gdist.gather_no_grad(local), expected)
    assert torch.equal(gdist.gather_no_grad(local, sizes=sizes), expected)

    # backward of the gather is a reduce-scatter SUM: rank r's loss weights the gathered rows
    # by (r + 1) * w, so every input receives sum_r (r + 1) * w on its own rows
    x = torch.randn(sizes[rank], 2, requires_grad=True)
    w = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2)
    (gdist.gather_with_grad(x) * w * (rank + 1)).sum().backward()
    own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    assert torch.equal(x.grad, w[own] * sum(range(1, world + 1)))

    value = torch.tensor([float(rank), -float(rank)])
    assert torch.equal(gdist.all_reduce_sum(value), torch.tensor([1.0, -1.0]) * sum(range(world)))
    assert torch.allclose(gdist.all_reduce_mean(value), torch.tensor([1.0, -1.0]) * sum(range(world)) / world)
    assert torch.equal(value, torch.tensor([float(rank), -float(rank)]))  # inputs untouched
    # One collective for both decisions: each flag is OR-ed over ranks on its own, the skip staying a tensor.
    for local_nonfinite, local_preempted, expected in [(rank == 0, rank == world - 1, (True, True)),
                                                       (False, rank == 0, (False, True)),
                                                       (rank == world - 1, False, (True, False)),
                                                       (False, False, (False, False))]:
        skip, stop = gdist.agree_on_step(torch.tensor(local_nonfinite), local_preempted)
        assert isinstance(skip, torch.Tensor) and skip.dtype == torch.bool and (bool(skip), stop) == expected
    # Rank 0 decides even when the ranks' own answers differ (the keep-best export must be joined by every rank).
    assert gdist.main_process_decides(rank == 0) is True
    assert gdist.main_process_decides(rank != 0) is False


def _raises_everywhere(rank: int, bad_rank: int, mutate, match: str) -> None:
    inputs = make_inputs(3 + rank, 2, seed=rank)
    if rank == bad_rank:
        inputs = mutate(inputs)
    with pytest.raises(ValueError, match=match):
        GISTLoss()(**inputs)


def _failure_worker(rank: int, world: int) -> None:
    def nan(inputs):
        inputs["positive"][0, 0] = math.nan
        return inputs

    def wrong_width(inputs):
        inputs["negative"] = inputs["negative"][..., :-1]
        return inputs

    def fewer_negatives(inputs):
        inputs["negative"], inputs["guide_negative"] = inputs["negative"][:, :1], inputs["guide_negative"][:, :1]
        return inputs

    def no_guide(inputs):
        return {name: None if name.startswith("guide") else t for name, t in inputs.items()}

    _raises_everywhere(rank, 1, nan, "NaN or inf")
    _raises_everywhere(rank, 0, wrong_width, "negative must be|invalid loss inputs on rank")
    _raises_everywhere(rank, 1, fewer_negatives, "ranks disagree")
    _raises_everywhere(rank, 0, no_guide, "ranks disagree")
    # every rank took the same path, so the group is still in step
    loss, _ = GISTLoss()(**make_inputs(2 + rank, 1, seed=9))
    assert torch.isfinite(loss)
    # Sizes given by the caller are checked against the local rows (every rank is wrong here, so none hangs).
    told = GISTLoss(check_finite=False)
    with pytest.raises(ValueError, match=f"rank_sizes says 9 rows on this rank, the anchors have {2 + rank}"):
        told(**make_inputs(2 + rank, 1, seed=9), rank_sizes=[9] * world)
    with pytest.raises(ValueError, match="rank_sizes has 1 entries for 2 ranks"):
        told(**make_inputs(2 + rank, 1, seed=9), rank_sizes=[2])
    dist.barrier()


def _no_host_read_worker(rank: int, world: int) -> None:
    """With the ranks' sizes given, the global loss and its backward read nothing back to the host."""
    inputs = make_inputs(4, 2, seed=rank)
    leaves = {c: inputs[c].clone().requires_grad_() for c in STUDENT}
    fn = GISTLoss(check_finite=False)
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    try:
        for name in saved:
            setattr(torch.Tensor, name, host_read)
        loss, _ = fn(**{**inputs, **leaves}, rank_sizes=[4] * world)
        loss.backward()
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    reference, _ = GISTLoss()(**{**inputs, **{c: t.detach() for c, t in leaves.items()}})
    _close(loss.detach(), reference, "told sizes vs exchanged sizes")
    assert all(t.grad is not None for t in leaves.values())


@pytest.mark.slow
def test_known_rank_sizes_skip_the_size_exchange_and_its_host_read():
    run_distributed(_no_host_read_worker, 2)


@pytest.mark.slow
def test_collective_helpers_with_uneven_and_empty_ranks():
    run_distributed(_helpers_worker, 3)


@pytest.mark.slow
def test_invalid_input_on_one_rank_raises_on_every_rank_without_hanging():
    run_distributed(_failure_worker, 2)
