"""C²R's candidate-list search (the default), its exactness between refreshes, its state and its DDP semantics."""

import csv
import math
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from c2r import geometry
from c2r.geometry import best_candidates, nearest_neighbors_exact, top_candidates
from c2r.regularizers import C2R, c2r_loss
from c2r.regularizers.c2r import pair_loss
from c2r.sae import TopKSAE


def random_rows(count, dim, seed):
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(loss_fn, acts, rows):
    acts = acts.clone().requires_grad_(True)
    rows = rows.clone().requires_grad_(True)
    loss = loss_fn(acts, rows)
    return (loss.detach(), *torch.autograd.grad(loss, (acts, rows)))


def naive_top_candidates(rows, count):
    """Brute force in float64: each row's ``count`` most similar other rows, sorted by index, and the cosine of the
    most similar row left out."""
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    cosines = (unit @ unit.T).fill_diagonal_(float("-inf"))
    best = cosines.topk(count + 1, dim=1)
    return best.indices[:, :count].sort(dim=1).values, best.values[:, count]


# ---------------------------------------------------------------- the search itself
@pytest.mark.parametrize("tile_size", [7, 4096])
def test_top_candidates_are_the_most_similar_other_latents_sorted_by_index(tile_size):
    rows = random_rows(200, 12, seed=0)
    got = top_candidates(rows, 9, tile_size=tile_size)
    want_lists, want_floors = naive_top_candidates(rows, 9)
    assert got.lists.shape == (200, 9)
    assert torch.equal(got.lists, want_lists)
    torch.testing.assert_close(got.floors, want_floors.float())
    assert (got.lists != torch.arange(200)[:, None]).all()  # never the latent itself
    some = torch.tensor([5, 0, 199, 77])  # the search for some latents only gives their rows of the same answer
    part = top_candidates(rows, 9, tile_size=tile_size, latents=some)
    assert torch.equal(part.lists, want_lists[some])
    torch.testing.assert_close(part.floors, want_floors[some].float())


def test_more_candidates_than_other_latents_keeps_all_others_and_one_latent_has_none():
    rows = random_rows(5, 3, seed=1)
    every_other = top_candidates(rows, 16)
    assert every_other.lists.tolist() == [[j for j in range(5) if j != i] for i in range(5)]
    assert torch.isinf(every_other.floors).all()  # nothing was left out
    alone = top_candidates(rows[:1], 16)
    assert alone.lists.shape == (1, 0)
    assert best_candidates(rows[:1], alone.lists).neighbors.tolist() == [0]  # the "no neighbour" sentinel


def test_candidate_argmax_equals_the_exact_argmax_when_the_true_neighbour_is_in_the_list(monkeypatch):
    monkeypatch.setattr(geometry, "CANDIDATE_ROWS", 17)  # several tiles of latents, the last one partial
    rows = random_rows(300, 8, seed=2)
    lists = top_candidates(rows, 4).lists
    moved = rows + 0.5 * random_rows(300, 8, seed=3)  # training moved the decoder since the lists were made
    exact = nearest_neighbors_exact(moved)
    chosen = best_candidates(moved, lists).neighbors
    held = (lists == exact[:, None]).any(dim=1)
    assert 0.2 < held.float().mean() < 0.95  # both cases occur, so the test has teeth
    assert torch.equal(chosen[held], exact[held])
    # Elsewhere the choice is the best listed latent, by the current cosines.
    unit = torch.nn.functional.normalize(moved.double(), dim=1)
    listed_cosines = torch.einsum("fd,fmd->fm", unit, unit[lists])
    assert torch.equal(chosen, lists.gather(1, listed_cosines.argmax(dim=1, keepdim=True)).squeeze(1))


def test_ties_among_candidates_go_to_the_smallest_index_like_the_exact_search():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])  # rows 1 and 2 tie for row 0 and row 3
    lists = top_candidates(rows, 3).lists
    assert torch.equal(best_candidates(rows, lists).neighbors, nearest_neighbors_exact(rows))


def test_a_low_precision_first_pass_re_ranked_in_fp32_gives_the_fp32_argmax():
    rows = random_rows(1024, 32, seed=0)
    exact = nearest_neighbors_exact(rows)
    unit = torch.nn.functional.normalize(rows, dim=1).bfloat16()
    bf16_argmax = (unit @ unit.T).float().fill_diagonal_(float("-inf")).argmax(dim=1)
    assert (bf16_argmax != exact).sum() > 10  # a bf16 search alone picks other neighbours for many rows

    lists = top_candidates(rows, 4, first_pass_dtype=torch.bfloat16)
    fp32 = top_candidates(rows, 4)
    assert torch.equal(best_candidates(rows, lists.lists).neighbors, exact)
    assert torch.equal(lists.lists, fp32.lists)  # the re-ranked lists are the fp32 lists, and so are the floors
    torch.testing.assert_close(lists.floors, fp32.floors)
    regularizer = C2R(coef=1, interval=1, candidates=4, refresh_precision="bfloat16")
    assert torch.equal(regularizer.neighbors(rows, 0), exact)


def test_the_smallest_leads_hold_the_stale_lists():
    """What the renewals rest on, on a moved decoder: the eighth of latents whose best listed latent leads their
    list's floor by the least holds most of the latents whose exact neighbour left their list."""
    rows = random_rows(2000, 16, seed=22)
    old = top_candidates(rows, 8)
    moved = rows + 0.15 * random_rows(2000, 16, seed=23)
    stale = (old.lists != nearest_neighbors_exact(moved)[:, None]).all(dim=1)
    leads = best_candidates(moved, old.lists).cosines - old.floors
    smallest = torch.zeros(2000, dtype=torch.bool)
    smallest[leads.argsort()[:250]] = True
    assert stale.sum() >= 20 and (stale & smallest).sum() >= 0.5 * stale.sum()


def naive_leads(rows, lists, floors):
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    return torch.stack([max(unit[i] @ unit[j] for j in listed) for i, listed in enumerate(lists)]) - floors.double()


def assert_renewed_exactly(regularizer, moved, old, renewed):
    """The lists (and floors) of the ``renewed`` latents are the exact ones of ``moved``; every other is ``old``'s."""
    want_lists, want_floors = naive_top_candidates(moved, old.lists.shape[1])
    for i in range(moved.shape[0]):
        want = (want_lists[i], want_floors[i]) if i in renewed else (old.lists[i], old.floors[i].double())
        assert torch.equal(regularizer.candidate_lists[i], want[0]), i
        torch.testing.assert_close(regularizer.candidate_floors[i].double(), want[1])


def test_each_probe_renews_the_lists_of_the_probed_latents():
    rows = random_rows(120, 6, seed=20)
    regularizer = C2R(coef=1, interval=1, candidates=3, refresh_every=1000, probe_latents=10,
                      target_agreement=0.01)  # tolerate any miss: no renewal beyond the probe's
    regularizer.neighbors(rows, 0)
    old = top_candidates(rows, 3)
    moved = rows + 0.3 * random_rows(120, 6, seed=21)
    regularizer.neighbors(moved, 1)
    assert regularizer.renewals == 0 and regularizer.refreshes == 1
    probed = set(regularizer._sample(1, "c2r.probe").tolist())
    assert len(probed) == 10
    assert_renewed_exactly(regularizer, moved, old, probed)
    assert not torch.equal(regularizer.candidate_lists, old.lists)  # the move changed renewed lists: the test has teeth


def test_a_stale_probe_renews_the_renew_share_with_the_smallest_leads():
    rows = random_rows(160, 6, seed=24)
    regularizer = C2R(coef=1, interval=1, candidates=3, refresh_every=1000, probe_latents=8, renew_share=0.25)
    regularizer.neighbors(rows, 0)
    old = top_candidates(rows, 3)
    moved = rows + 0.15 * random_rows(160, 6, seed=25)
    leads = naive_leads(moved, old.lists, old.floors)
    probed = set(regularizer._sample(1, "c2r.probe").tolist())
    leads[list(probed)] = float("inf")  # renewed by the probe already
    smallest = set(leads.argsort()[:40].tolist())
    second = set(regularizer._sample(1, "c2r.renewal_probe").tolist())
    regularizer.neighbors(moved, 1)
    assert regularizer.renewals == 1 and regularizer.refreshes == 1  # the second probe found no more misses
    assert_renewed_exactly(regularizer, moved, old, probed | smallest | second)


def half_circle(count, seed):
    """Latents at random angles on a half circle: each one's nearest neighbours are the two adjacent ones."""
    angles = torch.rand(count, generator=torch.Generator().manual_seed(seed)).sort().values * math.pi
    return torch.stack([angles.cos(), angles.sin()], dim=1).double(), angles


# ---------------------------------------------------------------- the regularizer between refreshes
def test_candidates_equal_exact_right_after_a_refresh_and_re_rank_the_old_lists_in_between():
    acts = torch.relu(random_rows(16, 24, seed=4).double())
    rows = random_rows(24, 8, seed=5).double()
    regularizer = C2R(coef=1, interval=1, candidates=3, refresh_every=3, probe_latents=0, tile_size=5)
    exact = lambda a, w: c2r_loss(a, w, neighbor_search="exact")  # noqa: E731
    for got, want in zip(loss_and_grads(lambda a, w: regularizer(a, w, 0), acts, rows), loss_and_grads(exact, acts, rows)):
        torch.testing.assert_close(got, want)
    lists_at_0 = top_candidates(rows, 3).lists
    assert torch.equal(regularizer.candidate_lists, lists_at_0)

    moved = rows + 0.8 * random_rows(24, 8, seed=6).double()
    assert not torch.equal(best_candidates(moved, lists_at_0).neighbors, nearest_neighbors_exact(moved))  # stale lists miss some
    for step in (1, 2):  # between refreshes: the best of the step-0 lists by today's cosines
        listed = lambda a, w: pair_loss(a, w, best_candidates(moved, lists_at_0).neighbors)  # noqa: E731
        for got, want in zip(loss_and_grads(lambda a, w: regularizer(a, w, step), acts, moved), loss_and_grads(listed, acts, moved)):
            torch.testing.assert_close(got, want)
    for got, want in zip(loss_and_grads(lambda a, w: regularizer(a, w, 3), acts, moved), loss_and_grads(exact, acts, moved)):
        torch.testing.assert_close(got, want)


def test_candidate_recall_on_a_constructed_case():
    # Pairs (0, 1) and (2, 3) are close; with one candidate each the lists are [[1], [0], [3], [2]].
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9]])
    acts = torch.ones(4, 4)
    regularizer = C2R(coef=1, interval=1, candidates=1, refresh_every=10, probe_latents=0)
    regularizer(acts, rows, 0)
    assert regularizer.candidate_lists.tolist() == [[1], [0], [3], [2]]
    assert "candidate_recall" not in regularizer.metrics  # the first lists have no predecessor
    # Row 2 moves next to row 0: the exact neighbours become [2, 0, 0, 2]; the old lists held those of rows 1 and 3.
    rows[2] = torch.tensor([0.99, 0.0, 0.05])
    assert nearest_neighbors_exact(rows).tolist() == [2, 0, 0, 2]
    regularizer(acts, rows, 5)
    assert "candidate_recall" not in regularizer.metrics  # no refresh yet
    regularizer(acts, rows, 10)
    assert regularizer.metrics["candidate_recall"].item() == pytest.approx(0.5)
    regularizer(acts, rows, 11)  # reported until the next refresh, so any logging interval sees it
    assert regularizer.metrics["candidate_recall"].item() == pytest.approx(0.5)


def test_the_probe_refreshes_stale_lists_as_soon_as_it_finds_misses():
    rows = random_rows(400, 8, seed=12)
    acts = torch.relu(random_rows(16, 400, seed=13))
    regularizer = C2R(coef=1, interval=1, candidates=2, refresh_every=1000, probe_latents=100, probe_every=1)
    regularizer(acts, rows, 0)
    assert regularizer.refreshes == 1 and "probe_agreement" not in regularizer.metrics  # a refresh step: no probe
    regularizer(acts, rows, 1)  # nothing moved: every probed latent's chosen neighbour is exact
    assert regularizer.refreshes == 1 and regularizer.metrics["probe_agreement"].item() == 1.0

    moved = rows + 0.5 * random_rows(400, 8, seed=14)
    stale = best_candidates(moved, regularizer.candidate_lists).neighbors
    assert (stale != nearest_neighbors_exact(moved)).float().mean() > 0.05
    neighbors = regularizer.neighbors(moved, 2)
    # The probe saw misses, the renewal could not remove them all: refreshed now.
    assert regularizer.refreshes == 2 and regularizer.renewals == 1 and regularizer.refreshed_at == 2
    assert regularizer.probe_metrics["probe_agreement"].item() < 0.95
    assert torch.equal(neighbors, nearest_neighbors_exact(moved))  # ... so this step's pairs are exact


def test_a_stale_probe_first_renews_the_lists_and_refreshes_only_if_misses_remain():
    rows, angles = half_circle(60, seed=0)
    regularizer = C2R(coef=1, interval=1, candidates=2, refresh_every=1000, probe_latents=60)
    regularizer.neighbors(rows, 0)
    moved = rows.clone()
    jump = 0.6 * angles[20] + 0.4 * angles[21]  # latent 19 jumps over latent 20: a neighbour of a neighbour
    moved[19] = torch.stack([jump.cos(), jump.sin()])
    exact = nearest_neighbors_exact(moved)
    assert (best_candidates(moved, regularizer.candidate_lists).neighbors != exact).sum() == 1  # latent 21's is stale
    assert torch.equal(regularizer.neighbors(moved, 1), exact)
    assert (regularizer.refreshes, regularizer.renewals) == (1, 1)  # the renewal was enough: no O(F²) refresh
    assert regularizer.probe_metrics["probe_agreement"].item() == pytest.approx(59 / 60)  # before the renewal
    restored = C2R(coef=1, interval=1, candidates=2, refresh_every=1000, probe_latents=60)
    restored.load_state_dict(regularizer.state_dict())
    assert restored.renewals == 1 and torch.equal(restored.candidate_lists, regularizer.candidate_lists)
    assert torch.equal(restored.candidate_floors, regularizer.candidate_floors)


def test_the_probe_runs_on_every_probe_every_th_c2r_step_only():
    rows = random_rows(400, 8, seed=12)
    acts = torch.relu(random_rows(16, 400, seed=13))
    regularizer = C2R(coef=1, interval=1, candidates=2, refresh_every=1000, probe_latents=400, probe_every=2)
    regularizer(acts, rows, 0)  # call 0: the first refresh
    moved = rows + 0.5 * random_rows(400, 8, seed=14)
    regularizer(acts, moved, 1)  # call 1: no probe, the stale lists are used
    assert regularizer.refreshes == 1 and "probe_agreement" not in regularizer.metrics
    regularizer(acts, moved, 2)  # call 2: the probe finds the misses (every latent is probed: renewing them is enough)
    assert (regularizer.refreshes, regularizer.renewals) == (1, 1)
    assert regularizer.metrics["probe_agreement"].item() < 0.95


def test_the_probe_tolerates_misses_below_a_quarter_of_the_target():
    rows = random_rows(400, 8, seed=12)
    regularizer = C2R(coef=1, interval=1, candidates=2, refresh_every=1000, probe_latents=400, target_agreement=0.5)
    regularizer.neighbors(rows, 0)
    moved = rows + 0.05 * random_rows(400, 8, seed=14)
    misses = (best_candidates(moved, regularizer.candidate_lists).neighbors != nearest_neighbors_exact(moved)).float().mean()
    assert 0 < misses < (1 - 0.5) / 4
    regularizer.neighbors(moved, 1)
    assert regularizer.refreshes == 1
    assert regularizer.probe_metrics["probe_agreement"].item() == pytest.approx(1 - misses.item())


def test_without_the_probe_the_lists_are_refreshed_every_refresh_every_steps():
    rows = random_rows(50, 8, seed=15)
    regularizer = C2R(coef=1, interval=1, candidates=2, refresh_every=3, probe_latents=0)
    for step in range(7):
        regularizer.neighbors(rows + step * random_rows(50, 8, seed=16), step)
    assert regularizer.refreshes == 3 and regularizer.refreshed_at == 6  # steps 0, 3 and 6


def test_audit_reports_agreement_and_loss_ratio_against_the_exact_search():
    acts = torch.relu(random_rows(32, 40, seed=7))
    rows = random_rows(40, 6, seed=8)
    regularizer = C2R(coef=1, interval=1, candidates=2, refresh_every=100, probe_latents=0, audit_every=2)
    regularizer(acts, rows, 0)
    assert regularizer.metrics["exact_agreement"].item() == 1.0
    assert regularizer.metrics["exact_loss_ratio"].item() == pytest.approx(1.0)
    moved = rows + 0.7 * random_rows(40, 6, seed=9)
    regularizer(acts, moved, 1)
    assert "exact_agreement" not in regularizer.metrics  # every 2nd call only
    regularizer(acts, moved, 2)
    chosen, exact = best_candidates(moved, regularizer.candidate_lists).neighbors, nearest_neighbors_exact(moved)
    assert regularizer.metrics["exact_agreement"].item() == pytest.approx((chosen == exact).float().mean().item())
    ratio = pair_loss(acts, moved, chosen) / pair_loss(acts, moved, exact)
    assert 0 < ratio < 1  # the stale lists miss neighbours here
    assert regularizer.metrics["exact_loss_ratio"].item() == pytest.approx(ratio.item())
    assert regularizer.metrics["steps_since_refresh"].item() == 2


def test_candidate_state_survives_a_checkpoint():
    rows, acts = random_rows(10, 4, seed=10), torch.ones(3, 10)
    trained = C2R(candidates=3, refresh_every=50, probe_every=2)
    trained(acts, rows, 7)
    restored = C2R(candidates=3, refresh_every=50, probe_every=2)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.candidate_lists, trained.candidate_lists)
    assert torch.equal(restored.candidate_floors, trained.candidate_floors)
    assert (restored.refreshed_at, restored.refreshes, restored.calls) == (7, 1, 1)
    # The next steps go on alike: the restored module re-ranks the saved lists, and probes (and renews them) on the
    # same call as the uninterrupted one.
    for step, rows_now in ((8, rows + 0.01 * random_rows(10, 4, seed=11)), (9, random_rows(10, 4, seed=12))):
        assert torch.equal(restored(acts, rows_now, step), trained(acts, rows_now, step))
        assert torch.equal(restored.candidate_lists, trained.candidate_lists)
    assert (restored.refreshes, restored.renewals) == (trained.refreshes, trained.renewals) == (1, 1)  # renewed at step 9


def test_a_checkpoint_from_before_floors_loads_with_unknown_floors_and_keeps_training():
    rows, acts = random_rows(40, 4, seed=30), torch.ones(3, 40)
    trained = C2R(candidates=3, refresh_every=50)
    trained(acts, rows, 0)
    state = {name: value for name, value in trained.state_dict().items() if name != "candidate_floors"}
    restored = C2R(candidates=3, refresh_every=50)
    restored.load_state_dict(state)
    assert torch.equal(restored.candidate_lists, trained.candidate_lists)
    assert torch.isinf(restored.candidate_floors).all() and restored.candidate_floors.shape == (40,)
    moved = rows + 0.5 * random_rows(40, 4, seed=31)
    assert torch.equal(restored.neighbors(moved, 1), trained.neighbors(moved, 1))  # the probe renews both alike


# ---------------------------------------------------------------- in a real training run
def c2r_audit_rows(compose_train, *overrides):
    from c2r.train import train
    from conftest import TINY

    cfg = compose_train(
        *TINY, "dict_size=256", "regularizer=c2r", "regularizer.coef=0.3", "regularizer.interval=1", "regularizer.audit_every=1",
        *overrides, "logger=csv", "trainer.log_every_n_steps=1",
        "train_tokens=12800", "trainer.val_check_interval=1000", "evaluation=none",
    )
    train(cfg)
    run_dir = cfg.hydra.runtime.output_dir
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("details/c2r/exact_agreement")]
    shutil.rmtree(run_dir)  # the next job of the test gets the same run folder
    return rows


def test_the_default_search_is_exact_on_every_step_of_a_training_run(compose_train):
    """100 steps with the default search settings (16 candidates, the probe) and C²R on every step, at a weight
    that pushes the chosen pairs apart fast (coef 0.3 at 256 latents): on every step the pairs the default
    chooses are the exact ones for >= 99% of latents and their loss is >= 0.99 of the exact pairs' loss. A single
    kept neighbour per latent refreshed every 100 steps (the old "cached" search) is far from that."""
    rows = c2r_audit_rows(compose_train)
    assert len(rows) == 100
    assert min(float(r["details/c2r/exact_agreement"]) for r in rows) >= 0.99
    assert min(float(r["details/c2r/exact_loss_ratio"]) for r in rows) >= 0.99

    single = c2r_audit_rows(compose_train, "regularizer.candidates=1", "regularizer.probe_latents=0")
    assert min(float(r["details/c2r/exact_agreement"]) for r in single) < 0.5
    assert min(float(r["details/c2r/exact_loss_ratio"]) for r in single) < 0.8


# ---------------------------------------------------------------- DDP: 2 processes equal one on the whole batch
D, F, B = 8, 32, 12


def make_sae_and_batch():
    torch.manual_seed(3)
    sae = TopKSAE(D, F, k=6, seed=1)
    return sae, torch.randn(2 * B, D)


def c2r_loss_and_grads(sae, x, neighbor_search, steps=(0, 5)):
    """Loss and gradients at the last of ``steps`` (earlier ones build the candidate lists)."""
    regularizer = C2R(coef=1, interval=1, neighbor_search=neighbor_search, candidates=4, refresh_every=4,
                      probe_latents=8, chunk_size=8, seed=2)
    for step in steps:
        loss = regularizer(sae.forward_pass(x).codes, sae.W_dec, step)
    sae.zero_grad()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}, regularizer.candidate_lists


NEIGHBOR_SEARCHES = ["candidates", "exact", "chunked"]


def ddp_worker(rank, world_size, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    for neighbor_search in NEIGHBOR_SEARCHES:
        sae, x = make_sae_and_batch()
        loss, grads, lists = c2r_loss_and_grads(sae, x[rank * B : (rank + 1) * B], neighbor_search)
        for grad in grads.values():  # what DistributedDataParallel does with gradients: average over ranks
            torch.distributed.all_reduce(grad)
            grad /= world_size
        torch.save({"loss": loss, "grads": grads, "lists": lists}, os.path.join(out_dir, f"{neighbor_search}{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """The folder holding each rank's loss, gradients and lists for every search: one spawn of two processes
    (each start costs seconds of imports) for all of them."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("neighbor_search", NEIGHBOR_SEARCHES)
def test_two_process_c2r_equals_one_process_on_the_concatenated_batch(two_process_results, neighbor_search):
    sae, x = make_sae_and_batch()
    loss, grads, lists = c2r_loss_and_grads(sae, x, neighbor_search)
    for rank in range(2):
        result = torch.load(two_process_results / f"{neighbor_search}{rank}.pt")
        torch.testing.assert_close(result["loss"], loss)
        assert torch.equal(result["lists"], lists)
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name  # every parameter really receives a C²R gradient
            torch.testing.assert_close(result["grads"][name], grad, msg=name)
