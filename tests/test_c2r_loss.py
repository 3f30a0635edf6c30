"""C²R loss: value and gradients against a naive loop-over-latents reference written from docs/design.md §1."""

from __future__ import annotations

import pytest
import torch

from c2r.regularizers import C2R, Regularizer, c2r_loss
from c2r.geometry import nearest_neighbors_chunked, nearest_neighbors_exact
from c2r.regularizers.c2r import pair_loss
from c2r.schedule import Schedule


# ---------------------------------------------------------------- naive reference (float64, python loops)
def naive_c2r(
    acts: torch.Tensor, decoder_rows: torch.Tensor, alpha: float, groups: list[list[int]] | None = None
) -> tuple[torch.Tensor, list[int | None]]:
    """L = (1/F) Σ_i max(0, ŵ_i·ŵ_j(i))² (n_i + n_j(i))^α, one latent at a time.

    ``groups`` restricts each latent's candidates to its own group (the chunks); None = all latents.
    Returns the loss (differentiable w.r.t. both inputs) and j(i) (None where there is no candidate).
    """
    acts, decoder_rows = acts.double(), decoder_rows.double()
    count = decoder_rows.shape[0]
    if groups is None:
        groups = [list(range(count))]
    group_of = {i: sorted(group) for group in groups for i in group}

    unit = [decoder_rows[i] / torch.sqrt((decoder_rows[i] ** 2).sum()) for i in range(count)]
    with torch.no_grad():
        cosines = [[(unit[i] * unit[j]).sum().item() for j in range(count)] for i in range(count)]
    norms = []
    for i in range(count):
        sum_sq = (acts[:, i] ** 2).sum()
        # ‖·‖ has no derivative at 0: a dead latent's norm is the constant 0.
        norms.append(torch.sqrt(sum_sq) if sum_sq.item() > 0 else acts.new_zeros(()))

    total = acts.new_zeros(())
    neighbors: list[int | None] = []
    for i in range(count):
        best_j, best_cos = None, float("-inf")
        for j in group_of[i]:  # ascending, strict ">" → ties go to the smallest j
            if j != i and cosines[i][j] > best_cos:
                best_j, best_cos = j, cosines[i][j]
        neighbors.append(best_j)
        if best_j is None:
            continue
        s = torch.clamp((unit[i] * unit[best_j]).sum(), min=0) ** 2
        base = norms[i] + norms[best_j]
        if base.item() > 0:
            total = total + s * base**alpha
    return total / count, neighbors


def chunk_groups(count: int, chunk_size: int, seed: int) -> list[list[int]]:
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return [chunk.tolist() for chunk in perm.split(chunk_size)]


def random_inputs(batch: int, count: int, dim: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # Sparse, non-negative activations, like post-ReLU/TopK latents.
    acts = torch.randn(batch, count, generator=gen, dtype=dtype).relu()
    decoder_rows = torch.randn(count, dim, generator=gen, dtype=dtype)
    return acts.requires_grad_(), decoder_rows.requires_grad_()


def value_and_grads(loss: torch.Tensor, acts: torch.Tensor, decoder_rows: torch.Tensor):
    return (loss.detach(), *torch.autograd.grad(loss, (acts, decoder_rows)))


def assert_matches_naive(acts, decoder_rows, alpha, groups=None, rtol=1e-10, atol=1e-12, **kwargs):
    got = value_and_grads(c2r_loss(acts, decoder_rows, alpha=alpha, **kwargs), acts, decoder_rows)
    loss, neighbors = naive_c2r(acts, decoder_rows, alpha, groups)
    want = value_and_grads(loss, acts, decoder_rows)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol)
    return neighbors


# ---------------------------------------------------------------- exact search
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(
    ("batch", "count", "dim", "tile_size"),
    [(8, 12, 5, 5), (4, 7, 3, 4096), (16, 20, 6, 3), (3, 9, 4, 1), (5, 2, 3, 4096)],
)
def test_exact_matches_naive(batch, count, dim, tile_size, alpha):
    acts, decoder_rows = random_inputs(batch, count, dim, seed=count * 100 + dim)
    neighbors = assert_matches_naive(acts, decoder_rows, alpha, tile_size=tile_size)
    assert nearest_neighbors_exact(decoder_rows, tile_size=tile_size).tolist() == neighbors


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_exact_float32_matches_naive(alpha):
    acts, decoder_rows = random_inputs(32, 24, 8, seed=7, dtype=torch.float32)
    loss = c2r_loss(acts, decoder_rows, alpha=alpha, tile_size=7)
    assert loss.dtype == torch.float32
    assert_matches_naive(acts, decoder_rows, alpha, rtol=1e-5, atol=1e-6, tile_size=7)


# ---------------------------------------------------------------- chunked search
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(
    ("count", "chunk_size"),
    [(13, 4), (10, 3), (11, 4), (10, 16), (9, 2)],  # chunks 4,4,4,1 | 3,3,3,1 | 4,4,3 | one | 2,2,2,2,1
)
def test_chunked_matches_naive(count, chunk_size, alpha):
    acts, decoder_rows = random_inputs(6, count, 4, seed=count + chunk_size)
    groups = chunk_groups(count, chunk_size, seed=123)
    generator = torch.Generator().manual_seed(123)
    neighbors = assert_matches_naive(
        acts, decoder_rows, alpha, groups, neighbor_search="chunked", chunk_size=chunk_size, generator=generator
    )
    got = nearest_neighbors_chunked(decoder_rows, chunk_size=chunk_size, generator=torch.Generator().manual_seed(123))
    # A latent alone in its chunk gets the sentinel j(i) = i (and contributes 0, checked above).
    assert got.tolist() == [i if j is None else j for i, j in enumerate(neighbors)]
    if count % chunk_size == 1:
        alone = groups[-1][0]
        assert neighbors[alone] is None and got[alone] == alone


def test_chunked_float32_matches_naive():
    acts, decoder_rows = random_inputs(16, 21, 6, seed=3, dtype=torch.float32)
    groups = chunk_groups(21, 5, seed=9)
    assert_matches_naive(
        acts, decoder_rows, 1.0, groups, rtol=1e-5, atol=1e-6,
        neighbor_search="chunked", chunk_size=5, generator=torch.Generator().manual_seed(9),
    )


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("neighbor_search", ["exact", "chunked"])
@pytest.mark.parametrize("tile_size", [2, 4096])
def test_ties_go_to_smallest_index(neighbor_search, tile_size):
    acts, decoder_rows = random_inputs(8, 12, 4, seed=11)
    with torch.no_grad():
        decoder_rows[7] = decoder_rows[3]
        decoder_rows[9] = decoder_rows[3] * 2.5  # same direction, different norm
    kwargs = dict(neighbor_search=neighbor_search, tile_size=tile_size, chunk_size=64)
    neighbors = assert_matches_naive(acts, decoder_rows, 1.0, **kwargs)
    assert neighbors[3] == 7 and neighbors[7] == 3 and neighbors[9] == 3
    got = nearest_neighbors_exact(decoder_rows, tile_size=tile_size)
    assert got[3] == 7 and got[7] == 3 and got[9] == 3


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_dead_latents(alpha):
    acts, decoder_rows = random_inputs(8, 10, 4, seed=5)
    with torch.no_grad():
        acts[:, [2, 5, 6]] = 0.0
        decoder_rows[5] = decoder_rows[2] * 3  # 2 and 5 are each other's neighbours: n_2 + n_5 = 0
    neighbors = assert_matches_naive(acts, decoder_rows, alpha)
    assert neighbors[2] == 5 and neighbors[5] == 2


def test_all_dead_gives_zero_and_finite_grads():
    acts, decoder_rows = random_inputs(4, 6, 3, seed=1)
    acts = torch.zeros_like(acts, requires_grad=True)
    value, grad_acts, grad_rows = value_and_grads(c2r_loss(acts, decoder_rows, alpha=0.5), acts, decoder_rows)
    assert value == 0
    assert torch.isfinite(grad_acts).all() and torch.isfinite(grad_rows).all()


def test_single_latent_has_no_neighbor():
    acts, decoder_rows = random_inputs(4, 1, 3, seed=2)
    assert nearest_neighbors_exact(decoder_rows).tolist() == [0]
    value, grad_acts, grad_rows = value_and_grads(c2r_loss(acts, decoder_rows), acts, decoder_rows)
    assert value == 0
    assert (grad_acts == 0).all() and (grad_rows == 0).all()


def test_negative_cosines_only_give_zero():
    decoder_rows = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], requires_grad=True)
    acts = torch.tensor([[1.0, 3.0], [2.0, 0.5]], requires_grad=True)
    value, grad_acts, grad_rows = value_and_grads(c2r_loss(acts, decoder_rows), acts, decoder_rows)
    assert value == 0
    assert (grad_acts == 0).all() and (grad_rows == 0).all()


def test_hand_computed():
    # ŵ_0 = (1, 0), ŵ_1 = (3, 4)/5 = (0.6, 0.8), ŵ_2 = (0, -1).
    # cos01 = 0.6, cos02 = 0, cos12 = -0.8  →  j(0) = 1, j(1) = 0, j(2) = 0 (cos 0 beats -0.8).
    # s = (0.36, 0.36, 0).  Column norms: n_0 = ‖(3, 4)‖ = 5, n_1 = ‖(0, 1)‖ = 1, n_2 = ‖(2, 0)‖ = 2.
    # α=1: L = (0.36·(5+1) + 0.36·(1+5) + 0·(2+5)) / 3 = 4.32 / 3 = 1.44.
    # α=2: L = (0.36·36 + 0.36·36) / 3 = 8.64.
    # dL/df[:, 0] (α=1) = (s_0 + s_1)/3 · f[:, 0]/n_0 = 0.24·(0.6, 0.8) = (0.144, 0.192); dL/df[:, 2] = 0.
    decoder_rows = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, -2.0]], dtype=torch.float64, requires_grad=True)
    acts = torch.tensor([[3.0, 0.0, 2.0], [4.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    assert nearest_neighbors_exact(decoder_rows).tolist() == [1, 0, 0]
    value, grad_acts, _ = value_and_grads(c2r_loss(acts, decoder_rows), acts, decoder_rows)
    assert value.item() == pytest.approx(1.44, abs=1e-12)
    torch.testing.assert_close(grad_acts[:, 0], torch.tensor([0.144, 0.192], dtype=torch.float64))
    assert (grad_acts[:, 2] == 0).all()
    assert c2r_loss(acts, decoder_rows, alpha=2.0).item() == pytest.approx(8.64, abs=1e-12)


# ---------------------------------------------------------------- module: schedule, validation, determinism
def test_schedule():
    module = C2R(coef=2, interval=5, start_step=3)
    assert isinstance(module, Regularizer)
    expected = [0, 0, 0, 10, 0, 0, 0, 0, 10, 0, 0, 0, 0, 10, 0, 0]
    assert [module.weight(t) for t in range(16)] == expected
    assert all(C2R(coef=0).weight(t) == 0 for t in range(16))


def test_defaults():
    module = C2R()
    assert module.schedule == Schedule(coef=5.0, interval=5) and module.alpha == 1.0
    assert module.neighbor_search == "candidates" and module.candidates == 16 and module.refresh_every == 100
    assert module.probe_latents == 512 and module.probe_every == 1 and module.target_agreement == 0.99
    assert module.renew_share == 0.125
    assert module.chunk_size == 8192 and module.audit_every == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(coef=-1), "coef must be >= 0"),
        (dict(interval=0), "interval must be >= 1"),
        (dict(start_step=-1), "start_step must be >= 0"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(alpha=-0.5), "alpha must be > 0"),
        (dict(neighbor_search="global"), "choose one of 'candidates', 'exact', 'chunked'"),
        (dict(neighbor_search="cached"), "replaced by 'candidates'"),
        (dict(candidates=0), "candidates must be >= 1"),
        (dict(refresh_every=0), "refresh_every must be >= 1"),
        (dict(probe_latents=-1), "probe_latents must be >= 0"),
        (dict(probe_every=0), "probe_every must be >= 1"),
        (dict(target_agreement=1), "target_agreement must be in"),
        (dict(renew_share=0), "renew_share must be in"),
        (dict(refresh_precision="fp8"), "unknown C2R refresh_precision 'fp8'"),
        (dict(audit_every=-1), "audit_every must be >= 0"),
        (dict(chunk_size=1), "chunk_size must be >= 2"),
        (dict(tile_size=0), "tile_size must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        C2R(**kwargs)


def test_c2r_loss_rejects_unknown_search():
    acts, decoder_rows = random_inputs(2, 4, 3, seed=0)
    with pytest.raises(ValueError, match=r"unknown C2R neighbor_search 'nope'.*'exact', 'chunked'"):
        c2r_loss(acts, decoder_rows, neighbor_search="nope")


def test_module_forward_equals_function():
    acts, decoder_rows = random_inputs(8, 16, 4, seed=4)
    module = C2R(alpha=2.0, tile_size=5)
    torch.testing.assert_close(module(acts, decoder_rows, step=0), c2r_loss(acts, decoder_rows, alpha=2.0))


def test_a_c2r_step_normalises_the_rows_once_with_the_plain_value_and_gradients(monkeypatch):
    """The re-rank, the probe and the pair cosines share one normalisation (c2r.geometry.UnitRows); the loss and
    its gradients equal the plain function, which normalises on its own."""
    import c2r.regularizers.c2r as c2r_module

    acts, decoder_rows = random_inputs(8, 64, 5, seed=12)
    module = C2R(interval=1, probe_latents=16, alpha=1.5)
    module(acts, decoder_rows, step=0)  # the first call builds the candidate lists
    calls, original = [], c2r_module.unit_and_norms

    def counted(rows):
        calls.append(rows.shape)
        return original(rows)

    monkeypatch.setattr(c2r_module, "unit_and_norms", counted)
    rows = decoder_rows.clone().requires_grad_()
    codes = acts.clone().requires_grad_()
    shared = module(codes, rows, step=1)
    assert calls == [rows.shape] and module.probe_metrics["probe_agreement"] == 1
    plain_rows, plain_codes = decoder_rows.clone().requires_grad_(), acts.clone().requires_grad_()
    plain = c2r_loss(plain_codes, plain_rows, alpha=1.5)
    torch.testing.assert_close(shared, plain)
    for got, expected in zip(torch.autograd.grad(shared, (codes, rows)), torch.autograd.grad(plain, (plain_codes, plain_rows))):
        torch.testing.assert_close(got, expected)


def test_chunked_module_is_deterministic_per_step():
    acts, decoder_rows = random_inputs(8, 64, 4, seed=8)
    module = C2R(neighbor_search="chunked", chunk_size=16, seed=3)
    assert module(acts, decoder_rows, step=10).item() == module(acts, decoder_rows, step=10).item()
    assert torch.equal(module.neighbors(decoder_rows, 10), module.neighbors(decoder_rows, 10))
    assert not torch.equal(module.neighbors(decoder_rows, 10), module.neighbors(decoder_rows, 11))
    other_seed = C2R(neighbor_search="chunked", chunk_size=16, seed=4)
    assert not torch.equal(module.neighbors(decoder_rows, 10), other_seed.neighbors(decoder_rows, 10))


# ---------------------------------------------------------------- scale and precision
def test_exact_tiled_matches_dense_at_scale():
    gen = torch.Generator().manual_seed(0)
    decoder_rows = torch.randn(8192, 16, generator=gen)
    got = nearest_neighbors_exact(decoder_rows, tile_size=512)

    unit = torch.nn.functional.normalize(decoder_rows, dim=1)
    dense = unit @ unit.T  # 8192² fp32 = 256 MiB, fine for a reference
    dense.fill_diagonal_(float("-inf"))
    best, reference = dense.max(dim=1)
    del dense
    assert (got != torch.arange(8192)).all()
    # Rounding may differ between tiled and dense matmuls, so a differing index must be an exact-in-fp64 tie.
    unit64 = unit.double()
    got_cos = (unit64 * unit64[got]).sum(1)
    ref_cos = (unit64 * unit64[reference]).sum(1)
    assert (got == reference).float().mean() > 0.999
    torch.testing.assert_close(got_cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_cos.float(), best, rtol=0, atol=1e-6)

    chunked = nearest_neighbors_chunked(decoder_rows, chunk_size=8192, generator=torch.Generator().manual_seed(1))
    assert torch.equal(chunked, nearest_neighbors_exact(decoder_rows))


def test_bf16_autocast_uses_fp32_neighbors():
    gen = torch.Generator().manual_seed(0)
    decoder_rows = torch.randn(1024, 32, generator=gen)
    acts = torch.randn(16, 1024, generator=gen).relu()
    fp32_neighbors = nearest_neighbors_exact(decoder_rows)
    bf16_rows = decoder_rows.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Sanity: a bf16 cosine matrix really picks other neighbours, so this test has teeth.
        unit = torch.nn.functional.normalize(decoder_rows, dim=1)
        assert (unit @ unit.T).dtype == torch.bfloat16
        assert torch.equal(nearest_neighbors_exact(decoder_rows, tile_size=100), fp32_neighbors)
        assert torch.equal(nearest_neighbors_exact(bf16_rows), nearest_neighbors_exact(bf16_rows.float()))
        assert torch.equal(
            nearest_neighbors_chunked(decoder_rows, chunk_size=2048, generator=torch.Generator().manual_seed(0)),
            fp32_neighbors,
        )
        loss = pair_loss(acts.bfloat16(), bf16_rows, fp32_neighbors)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, pair_loss(acts.bfloat16().float(), bf16_rows.float(), fp32_neighbors))
    bf16_argmax = (unit.bfloat16() @ unit.bfloat16().T).float().fill_diagonal_(float("-inf")).argmax(dim=1)
    assert not torch.equal(bf16_argmax, fp32_neighbors)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka"])
def test_sparse_codes_give_the_dense_loss_and_gradients(architecture):
    """K-sparse SAEs hand C²R their selected entries (O(B·k)); value and every parameter gradient must equal the
    loss on the dense codes, and the entries must rebuild the dense codes exactly."""
    from c2r.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, SparseCodes, TopKSAE

    kwargs = {"group_sizes": [8, 24]} if architecture == "matryoshka" else {}
    cls = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka": MatryoshkaBatchTopKSAE}[architecture]
    sae = cls(12, 32, k=3, seed=0, **kwargs)
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    neighbors = nearest_neighbors_exact(sae.W_dec.detach())

    grads = []
    for use_sparse in (False, True):
        sae.zero_grad()
        out = sae.forward_pass(x)
        assert isinstance(out.sparse, SparseCodes) and out.codes is out.sparse
        rebuilt = torch.zeros(32).index_add(0, out.sparse.latents, out.sparse.values.detach().square())
        assert torch.allclose(rebuilt, out.acts.detach().square().sum(dim=0))
        loss = pair_loss(out.codes if use_sparse else out.acts, sae.W_dec, neighbors, alpha=1.0)
        loss.backward()
        grads.append((loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = grads
    assert sparse_loss == pytest.approx(dense_loss.item(), rel=1e-6)
    for name in dense_grads:
        assert torch.allclose(sparse_grads[name], dense_grads[name], atol=1e-6), name


def test_architectures_without_explicit_selection_pass_dense_codes():
    from c2r.sae import JumpReLUSAE, ReLUSAE

    for sae in (ReLUSAE(8, 16, seed=0), JumpReLUSAE(8, 16, seed=0)):
        out = sae.forward_pass(torch.randn(4, 8))
        assert out.sparse is None and out.codes is out.acts


# ---------------------------------------------------------------- the written-out gradient of the pair cosines
def test_pair_cosines_and_their_written_out_gradient_equal_autograd_on_the_plain_formula():
    from c2r.geometry import unit_and_norms
    from c2r.regularizers.c2r import PairCosines

    gen = torch.Generator().manual_seed(3)
    rows = (torch.randn(30, 7, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    neighbors = torch.randint(0, 30, (30,), generator=gen)
    neighbors[:3] = 5  # a row that is the partner of several rows (gradients add up)
    neighbors[7] = 7  # a row paired with itself (the "no neighbour" sentinel)
    upstream = torch.randn(30, generator=gen, dtype=torch.float64)
    unit = torch.nn.functional.normalize(rows, dim=1)
    plain = (unit * unit[neighbors]).sum(dim=1)
    got = PairCosines.apply(rows, neighbors, unit_and_norms(rows))
    torch.testing.assert_close(got, plain)
    torch.testing.assert_close(*(torch.autograd.grad(c, rows, upstream)[0] for c in (got, plain)))
    assert torch.autograd.gradcheck(lambda r: PairCosines.apply(r, neighbors, unit_and_norms(r)), (rows,))
