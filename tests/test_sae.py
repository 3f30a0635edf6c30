"""SAE architectures: sparsity semantics, unit-norm decoder, decoder-bias init, AuxK."""

import lightning as L
import pytest
import torch

from c2r.module import SAEModule
from c2r.sae import BatchTopKSAE, TopKSAE


def test_topk_keeps_exactly_k_per_row():
    sae = TopKSAE(16, 64, k=8, seed=0)
    x = torch.randn(32, 16)
    acts = sae.encode(x)
    assert ((acts != 0).sum(dim=1) == 8).all()
    # The kept values are the k largest pre-activations of each row.
    pre = sae.pre_activations(x)
    kth_largest = pre.topk(8, dim=1).values[:, -1:]
    assert torch.equal(acts != 0, pre >= kth_largest)
    assert torch.allclose(acts[acts != 0], pre[acts != 0])


def test_batchtopk_keeps_k_per_row_on_average_and_learns_its_threshold():
    sae = BatchTopKSAE(16, 64, k=4, threshold_momentum=0.0, seed=0)
    x = torch.randn(50, 16)
    acts = sae.encode(x)
    assert int((acts != 0).sum()) == 4 * 50
    assert (acts != 0).sum(dim=1).float().std() > 0  # not k per row: the batch decides
    smallest_kept = acts[acts > 0].min()
    assert sae.threshold.item() == pytest.approx(smallest_kept.item())

    sae.eval()
    eval_acts = sae.encode(x)
    pre = sae.pre_activations(x)
    assert torch.equal(eval_acts != 0, pre > sae.threshold)


def test_batchtopk_threshold_is_a_running_average():
    sae = BatchTopKSAE(8, 32, k=2, threshold_momentum=0.9, seed=0)
    first = sae.encode(torch.randn(20, 8))
    t1 = first[first > 0].min().item()
    second = sae.encode(torch.randn(20, 8) * 3)
    t2 = second[second > 0].min().item()
    assert sae.threshold.item() == pytest.approx(0.9 * t1 + 0.1 * t2, rel=1e-5)


def test_batchtopk_eval_before_any_training_batch_uses_the_batch_selection():
    sae = BatchTopKSAE(8, 32, k=2).eval()
    acts = sae.encode(torch.randn(3, 8))
    assert int((acts != 0).sum()) == 6
    assert sae.threshold.item() == -1.0  # eval batches never set the threshold


def test_batchtopk_encoder_starts_as_the_scaled_decoder_transpose():
    plain = TopKSAE(16, 64, k=4, seed=3)
    default = BatchTopKSAE(16, 64, k=4, seed=3)
    assert torch.equal(default.W_dec, plain.W_dec)
    assert torch.allclose(default.W_enc, 0.01 * plain.W_dec.t())
    assert torch.equal(BatchTopKSAE(16, 64, k=4, seed=3, encoder_init_scale=1.0).W_enc, plain.W_enc)
    with pytest.raises(ValueError, match="encoder_init_scale must be > 0"):
        BatchTopKSAE(16, 64, k=4, encoder_init_scale=0.0)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_k_larger_than_dict_size_is_refused(cls):
    with pytest.raises(ValueError, match="k must be in"):
        cls(8, 16, k=17)


def test_nonpositive_dict_size_is_refused():
    with pytest.raises(ValueError, match="dict_size must be positive"):
        TopKSAE(8, 0, k=1)


def test_remove_parallel_gradient_leaves_only_the_tangent_part():
    sae = TopKSAE(8, 16, k=2)
    sae.W_dec.grad = torch.randn(16, 8)
    original = sae.W_dec.grad.clone()
    sae.remove_parallel_gradient()
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert torch.allclose((sae.W_dec.grad * rows).sum(dim=1), torch.zeros(16), atol=1e-6)
    # What was removed is parallel to the rows.
    removed = original - sae.W_dec.grad
    assert torch.allclose(removed, (original * rows).sum(dim=1, keepdim=True) * rows, atol=1e-6)


def test_decoder_bias_starts_at_the_geometric_median():
    # On a line, the geometric median is the median: 0 here, while the mean is 10.2.
    sample = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [50.0, 0.0]])
    sae = TopKSAE(2, 4, k=1)
    sae.init_decoder_bias(sample, iterations=200)
    assert sae.b_dec.abs().max() < 1e-3
    # Four symmetric points: the median is their centre.
    square = torch.tensor([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0], [3.0, 3.0]])
    sae.init_decoder_bias(square)
    assert torch.allclose(sae.b_dec, torch.tensor([2.0, 2.0]), atol=1e-5)


def test_auxk_is_zero_without_dead_latents_and_matches_the_formula_with_them():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=2, aux_k=3, dead_tokens=100)
    x = torch.randn(10, 8)
    out = sae.forward_pass(x)
    assert sae.auxk_loss(x, out).item() == 0.0

    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 20]] = True
    sae.update_firing(~dead, 100)
    loss = sae.auxk_loss(x, out)

    residual = x - out.recon.detach()
    expected_num, expected_den = 0.0, 0.0
    for b in range(10):
        pre_dead = {i: out.pre_acts[b, i].item() for i in (1, 5, 9, 20)}
        top3 = sorted(pre_dead, key=pre_dead.get, reverse=True)[:3]
        recon = sum(max(pre_dead[i], 0.0) * sae.W_dec[i] for i in top3)
        expected_num += ((recon - residual[b]) ** 2).sum().item()
        expected_den += ((residual[b] - residual.mean(0)) ** 2).sum().item()
    assert loss.item() == pytest.approx(expected_num / expected_den, rel=1e-5)


def test_firing_tracking_marks_latents_dead_after_dead_tokens():
    sae = TopKSAE(4, 6, k=1, dead_tokens=20)
    fired = torch.tensor([True, False, False, True, False, False])
    sae.update_firing(fired, 10)
    sae.update_firing(torch.tensor([True, False, False, False, False, False]), 10)
    assert sae.tokens_since_fired.tolist() == [0, 20, 20, 10, 20, 20]
    assert sae.dead_mask().tolist() == [False, True, True, False, True, True]


def test_decoder_rows_stay_unit_norm_through_training():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, k=4, seed=1)
    before = sae.W_dec.detach().clone()
    module = SAEModule(sae, lr=1e-2, warmup_steps=0, total_steps=20)
    batches = [torch.randn(64, 16) * 3 for _ in range(20)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(
        max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        accelerator="cpu", limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 20
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(64), atol=1e-5)
    assert (sae.W_dec.detach() - before).abs().max() > 1e-2  # it did train
