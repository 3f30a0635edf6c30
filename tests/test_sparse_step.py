"""The sparse TopK-family step (c2r.sae.sparse) equals the dense reference: every loss term and every gradient,
for TopK, BatchTopK and Matryoshka, with and without C²R, with AuxK active (dead latents present)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from c2r.regularizers import C2R
from c2r.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE, sparse
from c2r.step import loss_terms, total_loss

D, F_, K, B = 12, 32, 3, 20
ARCHITECTURES = {
    "topk": lambda: TopKSAE(D, F_, k=K, aux_k=5, dead_tokens=40, seed=0),
    "batchtopk": lambda: BatchTopKSAE(D, F_, k=K, aux_k=5, dead_tokens=40, seed=0),
    "matryoshka": lambda: MatryoshkaBatchTopKSAE(D, F_, k=K, aux_k=5, dead_tokens=40, group_sizes=[4, 12, 16], seed=0),
}


def step(architecture: str, with_c2r: bool, dense: bool):
    """Loss terms and parameter gradients of one training step (fp64, half the latents dead)."""
    sae = ARCHITECTURES[architecture]().double()
    sae.update_firing(torch.arange(F_) % 2 == 0, 40)
    regularizers = {"c2r": C2R(coef=1.0, interval=1, neighbor_search="exact")} if with_c2r else {}
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with sparse.dense_reference() if dense else nullcontext():
        terms, out = loss_terms(sae, regularizers, x, step=0)
        total_loss(terms).backward()
    values = {name: value.detach() for name, (value, _) in terms.items()}
    return values, {name: p.grad for name, p in sae.named_parameters()}, out


@pytest.mark.parametrize("with_c2r", [False, True], ids=["plain", "c2r"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_sparse_step_equals_the_dense_reference(architecture, with_c2r):
    sparse_terms, sparse_grads, out = step(architecture, with_c2r, dense=False)
    dense_terms, dense_grads, _ = step(architecture, with_c2r, dense=True)
    assert sparse_terms.keys() == dense_terms.keys()
    assert sparse_terms["auxk"] > 0  # AuxK is exercised
    for name in dense_terms:
        torch.testing.assert_close(sparse_terms[name], dense_terms[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert out.pre_acts.grad_fn is None  # the dense pre-activations carry no graph


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_entries_rebuild_the_dense_codes_and_reconstruction(architecture):
    sae = ARCHITECTURES[architecture]()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    out = sae.forward_pass(x)
    codes = out.sparse
    assert torch.all(codes.rows[1:] >= codes.rows[:-1])  # the decode's precondition
    assert int((out.acts != 0).sum()) == int((codes.values != 0).sum())
    torch.testing.assert_close(out.recon, out.acts @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.firing_counts(), (out.acts != 0).sum(dim=0))


def test_auxk_is_skipped_on_the_host_until_a_latent_can_be_dead_and_after_loading():
    sae = TopKSAE(D, F_, k=K, dead_tokens=40)
    x = torch.randn(B, D)
    assert sae.auxk_loss(x, sae.forward_pass(x)).item() == 0.0  # nothing read from the device
    sae.update_firing(torch.ones(F_, dtype=torch.bool), 40)  # may be dead now, but none is: zero on the device
    assert sae.auxk_loss(x, sae.forward_pass(x)).item() == 0.0
    state = sae.state_dict()
    state["tokens_since_fired"][:4] = 40
    restored = TopKSAE(D, F_, k=K, dead_tokens=40)
    restored.load_state_dict(state)
    assert restored.max_tokens_since_fired == 40
    assert restored.auxk_loss(x, restored.forward_pass(x)).item() > 0


def test_batchtopk_threshold_updates_on_the_device():
    sae = BatchTopKSAE(D, F_, k=K, threshold_momentum=0.5)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    out = sae.forward_pass(x)
    smallest = out.sparse.values[out.sparse.values > 0].min()
    assert sae.threshold.item() == pytest.approx(smallest.item())
    sae.forward_pass(x)
    assert sae.threshold.item() == pytest.approx(smallest.item())  # lerp between equal values


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_sparse_step_under_bf16_autocast_keeps_fp32_gradients_near_the_reference(architecture):
    """What a GPU run does (bf16 autocast, fp32 weights), on CPU: the same selection, fp32 gradients, close."""
    grads = []
    for dense in (False, True):
        sae = ARCHITECTURES[architecture]()
        sae.update_firing(torch.arange(F_) % 2 == 0, 40)
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16), sparse.dense_reference() if dense else nullcontext():
            terms, _ = loss_terms(sae, {"c2r": C2R(coef=1.0, interval=1, neighbor_search="exact")}, x, step=0)
            loss = total_loss(terms)
        loss.backward()
        grads.append({name: p.grad for name, p in sae.named_parameters()})
    for name, grad in grads[0].items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, grads[1][name], rtol=0.05, atol=0.05 * grads[1][name].abs().max().item(), msg=name)
