"""Reconstruction metrics against naive formulas; the LR schedule against hand-computed values."""

import pytest
import torch

from c2r.metrics import ReconstructionStats, batch_metrics
from c2r.module import SAEModule
from c2r.sae import TopKSAE
from c2r.step import loss_terms


def naive_metrics(x, recon, acts):
    x, recon = x.double(), recon.double()
    n = x.shape[0]
    mean = sum(x[i] for i in range(n)) / n
    err = sum(((x[i] - recon[i]) ** 2).sum() for i in range(n)) / n
    var = sum(((x[i] - mean) ** 2).sum() for i in range(n)) / n
    l0 = sum(int((acts[i] != 0).sum()) for i in range(n)) / n
    return {"mse": float(err), "fvu": float(err / var), "explained_variance": float(1 - err / var), "l0": l0}


def test_batch_metrics_match_the_naive_formulas():
    torch.manual_seed(0)
    x = torch.randn(40, 6) + 3.0  # non-zero mean: FVU must subtract it
    recon = x + 0.3 * torch.randn(40, 6)
    acts = torch.relu(torch.randn(40, 10))
    got = {k: float(v) for k, v in batch_metrics(x, recon, acts).items()}
    assert got == pytest.approx(naive_metrics(x, recon, acts), rel=1e-10)


def test_perfect_and_mean_reconstructions():
    x = torch.randn(30, 4)
    assert float(batch_metrics(x, x, x)["fvu"]) == 0.0
    mean_recon = x.mean(0, keepdim=True).expand_as(x)
    assert float(batch_metrics(x, mean_recon, x)["fvu"]) == pytest.approx(1.0)


def test_accumulated_stats_equal_the_concatenated_batch():
    torch.manual_seed(1)
    xs = [torch.randn(n, 5) * 2 + 1 for n in (7, 13, 4)]
    recons = [x + 0.1 * torch.randn_like(x) for x in xs]
    acts = [torch.relu(torch.randn(x.shape[0], 9)) for x in xs]
    stats = ReconstructionStats()
    for x, r, a in zip(xs, recons, acts):
        stats.update(x, r, a)
    got = {k: float(v) for k, v in ReconstructionStats.compute(stats.sums).items()}
    expected = naive_metrics(torch.cat(xs), torch.cat(recons), torch.cat(acts))
    assert got == pytest.approx(expected, rel=1e-10)


def test_learning_rate_warms_up_then_decays_to_zero():
    module = SAEModule(TopKSAE(4, 8, k=1), warmup_steps=10, decay_fraction=0.2, total_steps=100)
    factors = [module.lr_factor(step) for step in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[4] == pytest.approx(0.5)
    assert factors[9:81] == pytest.approx([1.0] * 72)
    assert factors[90] == pytest.approx(0.5)
    assert factors[100] == 0.0


def test_a_regularizer_named_like_an_sae_loss_term_is_refused():
    from c2r.regularizers import C2R

    with pytest.raises(ValueError, match="named 'auxk' like one of the SAE's own loss terms"):
        loss_terms(TopKSAE(4, 8, k=1), {"auxk": C2R(coef=1, interval=1)}, torch.randn(5, 4), 0)
