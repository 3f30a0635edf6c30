"""C²R's cached neighbour search and its DDP semantics."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from c2r.regularizers import C2R, c2r_loss
from c2r.regularizers.c2r import nearest_neighbors_exact, pair_loss
from c2r.sae import TopKSAE


def loss_and_grads(loss_fn, acts, rows):
    acts = acts.clone().requires_grad_(True)
    rows = rows.clone().requires_grad_(True)
    loss = loss_fn(acts, rows)
    return (loss.detach(), *torch.autograd.grad(loss, (acts, rows)))


def test_cached_equals_exact_right_after_each_refresh_and_reuses_indices_in_between():
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(16, 24, dtype=torch.float64))
    rows = torch.randn(24, 8, dtype=torch.float64)
    cached = C2R(coef=1, interval=1, neighbor_search="cached", refresh_every=3, tile_size=5)

    exact = lambda a, w: c2r_loss(a, w, neighbor_search="exact")  # noqa: E731
    for got, want in zip(loss_and_grads(lambda a, w: cached(a, w, 0), acts, rows), loss_and_grads(exact, acts, rows)):
        torch.testing.assert_close(got, want)
    neighbors_at_0 = nearest_neighbors_exact(rows)

    moved = rows + 0.8 * torch.randn_like(rows)  # the decoder moves: the true neighbours change
    assert not torch.equal(nearest_neighbors_exact(moved), neighbors_at_0)
    for step in (1, 2):  # stale steps: the step-0 pairs, with today's rows and activations
        stale = lambda a, w: pair_loss(a, w, neighbors_at_0)  # noqa: E731
        for got, want in zip(loss_and_grads(lambda a, w: cached(a, w, step), acts, moved), loss_and_grads(stale, acts, moved)):
            torch.testing.assert_close(got, want)
        assert cached.metrics == {}
    for got, want in zip(loss_and_grads(lambda a, w: cached(a, w, 3), acts, moved), loss_and_grads(exact, acts, moved)):
        torch.testing.assert_close(got, want)


def test_staleness_counts_the_neighbours_that_changed():
    # Rows 0/1 are close, rows 2/3 are close: neighbours (1, 0, 3, 2).
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9]])
    acts = torch.ones(4, 4)
    regularizer = C2R(coef=1, interval=1, neighbor_search="cached", refresh_every=10)
    regularizer(acts, rows, 0)
    assert regularizer.cached_neighbors.tolist() == [1, 0, 3, 2]
    assert regularizer.metrics["neighbors_changed"].item() == 4  # the first search: all of them are new
    # Row 2 moves next to row 0: row 0's neighbour becomes 2 and row 2's becomes 0; row 1 keeps 0 and row 3
    # keeps 2 (still its most similar row, at cosine ≈ 0.05).
    rows[2] = torch.tensor([0.99, 0.0, 0.05])
    assert nearest_neighbors_exact(rows).tolist() == [2, 0, 0, 2]
    regularizer(acts, rows, 5)
    assert regularizer.metrics == {}  # not a refresh step
    regularizer(acts, rows, 10)
    assert regularizer.cached_neighbors.tolist() == [2, 0, 0, 2]
    assert regularizer.metrics["neighbors_changed"].item() == 2
    assert regularizer.metrics["neighbors_changed_fraction"].item() == pytest.approx(0.5)


def test_cached_neighbours_survive_a_checkpoint():
    rows = torch.randn(10, 4)
    trained = C2R(neighbor_search="cached", refresh_every=50)
    trained(torch.ones(3, 10), rows, 7)
    restored = C2R(neighbor_search="cached", refresh_every=50)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.cached_neighbors, trained.cached_neighbors)
    assert int(restored.refreshed_at) == 7
    # Within the refresh window the restored module reuses the saved pairs instead of searching again.
    restored(torch.ones(3, 10), torch.randn(10, 4), 8)
    assert torch.equal(restored.cached_neighbors, trained.cached_neighbors)


def test_refresh_every_must_be_positive():
    with pytest.raises(ValueError, match="refresh_every must be >= 1"):
        C2R(refresh_every=0)


# --- DDP: the C²R term over 2 processes equals one process on the concatenated batch ----------------------------

D, F, B = 8, 32, 12


def make_sae_and_batch():
    torch.manual_seed(3)
    sae = TopKSAE(D, F, k=6, seed=1)
    return sae, torch.randn(2 * B, D)


def c2r_loss_and_grads(sae, x, neighbor_search, step=5):
    regularizer = C2R(coef=1, interval=1, neighbor_search=neighbor_search, chunk_size=8, seed=2)
    loss = regularizer(sae(x).acts, sae.W_dec, step)
    sae.zero_grad()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}


def ddp_worker(rank, world_size, init_file, neighbor_search, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    sae, x = make_sae_and_batch()
    loss, grads = c2r_loss_and_grads(sae, x[rank * B : (rank + 1) * B], neighbor_search)
    for grad in grads.values():  # what DistributedDataParallel does with gradients: average over ranks
        torch.distributed.all_reduce(grad)
        grad /= world_size
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("neighbor_search", ["exact", "cached", "chunked"])
def test_two_process_c2r_equals_one_process_on_the_concatenated_batch(tmp_path, neighbor_search):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), neighbor_search, str(tmp_path)), nprocs=2, join=True)
    sae, x = make_sae_and_batch()
    loss, grads = c2r_loss_and_grads(sae, x, neighbor_search)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss)
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name  # every parameter really receives a C²R gradient
            torch.testing.assert_close(result["grads"][name], grad, msg=name)


def test_cached_trains_like_exact(compose_train):
    """Quality check behind making ``cached`` the default: same data, seed and coef, the cached search
    (refreshed every 20 steps) ends where the exact one does."""
    from c2r.train import train
    from conftest import TINY

    results = {}
    for search in ("exact", "cached"):
        cfg = compose_train(
            *TINY, "regularizer=c2r", "regularizer.coef=0.01", "regularizer.interval=1",
            f"regularizer.neighbor_search={search}", "regularizer.refresh_every=20", "data.source.rows=16384",
            "train_tokens=76800", "batch_size=256", "optim.lr=3e-3", "trainer.val_check_interval=1000",
        )
        results[search] = train(cfg)
    assert results["exact"]["fvu"] < 0.3  # it trained (untrained: ~1)
    assert abs(results["cached"]["fvu"] - results["exact"]["fvu"]) < 0.01, results
