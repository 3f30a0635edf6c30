"""Every SAE architecture (sparsity semantics, straight-through gradients, loss terms, decoder norms, training
through the real entrypoint, recovery of known features) and the OrtSAE baseline regularizer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from c2r import load_sae
from c2r.data import SyntheticShards
from c2r.regularizers import Ortho, ortho_loss
from c2r.seeds import stream_generator
from c2r.sae import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    KSparseAutoencoder,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    TopKSAE,
)
from c2r.sae.jumprelu import heaviside, jumprelu
from c2r.sae.matryoshka import group_sizes_from_fractions
from c2r.schedule import Schedule
from c2r.step import apply_gradients, loss_terms, total_loss
from c2r.train import train
from conftest import TINY

D, F_ = 16, 64

BUILDERS = {
    "topk": lambda **kw: TopKSAE(D, F_, k=4, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(D, F_, k=4, **kw),
    "matryoshka": lambda **kw: MatryoshkaBatchTopKSAE(D, F_, k=4, group_sizes=[8, 24, 32], **kw),
    "relu": lambda **kw: ReLUSAE(D, F_, l1_coef=0.1, **kw),
    "jumprelu": lambda **kw: JumpReLUSAE(D, F_, bandwidth=0.05, threshold_init=0.05, **kw),
    "gated": lambda **kw: GatedSAE(D, F_, l1_coef=0.1, **kw),
}
ARCHITECTURES = list(BUILDERS)
K_FREE = ("relu", "jumprelu", "gated")  # no model.k in their configs


# --- every architecture -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_shapes_and_the_decoder_sees_the_codes(name):
    torch.manual_seed(0)
    sae = BUILDERS[name](seed=1)
    x = torch.randn(10, D)
    out = sae.forward_pass(x)
    assert out.pre_acts.shape == out.acts.shape == (10, F_)
    assert out.recon.shape == (10, D)
    assert sae.W_enc.shape == (D, F_) and sae.W_dec.shape == (F_, D)
    assert (out.acts >= 0).all() and (out.acts == 0).any()
    # The reconstruction is the decoder applied to `acts`: what C²R receives is what the decoder uses.
    assert torch.allclose(out.recon, out.acts @ sae.W_dec + sae.b_dec, atol=1e-6)
    terms = sae.losses(x, out, step=0)
    assert "mse" in terms and all(torch.isfinite(value) for value, _ in terms.values())
    total_loss(terms).backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_decoder_norms_follow_the_architecture_policy(name):
    torch.manual_seed(0)
    sae = BUILDERS[name](seed=1)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(10):
        x = torch.randn(32, D) * 2
        terms, out = loss_terms(sae, {}, x, step)
        optimizer.zero_grad()
        total_loss(terms).backward()
        grad = sae.W_dec.grad.clone()
        sae.remove_parallel_gradient()
        if not sae.unit_norm_decoder:
            assert torch.equal(sae.W_dec.grad, grad)  # floating rows: the radial gradient is kept
        optimizer.step()
        sae.normalize_decoder()
    norms = sae.W_dec.detach().norm(dim=1)
    if name == "relu":
        assert not sae.unit_norm_decoder
        assert norms.max() < 0.5 and norms.std() > 1e-3  # initialised at 0.1, then each row floats on its own
    else:
        assert sae.unit_norm_decoder
        assert torch.allclose(norms, torch.ones(F_), atol=1e-5)


# --- TopK family: k annealing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_k_anneals_linearly_from_k_start_to_k(cls):
    sae = cls(8, 64, k=4, k_start=20, k_anneal_steps=8)
    assert [sae.current_k(t) for t in (0, 1, 2, 4, 7, 8, 9, 1000)] == [20, 18, 16, 12, 6, 4, 4, 4]
    x = torch.randn(16, 8)
    for step, expected in ((0, 20), (1, 18), (2, 16), (None, 4)):  # the step given drives it; none: trained SAE
        acts = sae.forward_pass(x, step).acts
        if cls is TopKSAE:
            assert ((acts != 0).sum(dim=1) == expected).all()
        else:
            assert int((acts != 0).sum()) == expected * 16
    if cls is TopKSAE:
        assert sae.export_state()[2] == {"k": 4}  # exported as trained: at the target k


def test_training_anneals_k_at_the_trainers_step_and_validates_the_trained_sae(compose_train, monkeypatch):
    seen = []  # (step given to the forward, k used)
    current_k = KSparseAutoencoder.current_k

    def recording(self, step=None):
        seen.append((step, current_k(self, step)))
        return seen[-1][1]

    monkeypatch.setattr(KSparseAutoencoder, "current_k", recording)
    train(compose_train(*tiny("topk"), "model.k_start=16", "model.k_anneal_steps=10", "evaluation=none"))
    training = [entry for entry in seen if entry[0] is not None]
    assert [step for step, _ in training] == list(range(20))  # Lightning's global_step, one call per step
    assert [k for _, k in training[:11:5]] == [16, 10, 4] and {k for _, k in training[10:]} == {4}
    assert {k for step, k in seen if step is None} == {4}  # validation: the trained SAE


def test_k_annealing_is_off_by_default_and_its_settings_are_checked():
    sae = TopKSAE(8, 64, k=4)
    assert [sae.current_k(t) for t in (0, 10**6)] == [4, 4]
    with pytest.raises(ValueError, match="needs k_start"):
        TopKSAE(8, 64, k=4, k_anneal_steps=10)
    with pytest.raises(ValueError, match="k_anneal_steps=0"):
        TopKSAE(8, 64, k=4, k_start=16)
    with pytest.raises(ValueError, match="k_start must be in"):
        TopKSAE(8, 64, k=4, k_start=2, k_anneal_steps=10)


# --- Matryoshka -------------------------------------------------------------------------------------------------


def test_matryoshka_groups_from_fractions_or_sizes():
    assert group_sizes_from_fractions([0.0625, 0.0625, 0.125, 0.25, 0.5], 1024) == [64, 64, 128, 256, 512]
    assert sum(group_sizes_from_fractions([1 / 3, 1 / 3, 1 / 3], 100)) == 100
    assert MatryoshkaBatchTopKSAE(8, 40, k=2, group_fractions=[0.25, 0.75]).group_sizes == [10, 30]
    with pytest.raises(ValueError, match="exactly one"):
        MatryoshkaBatchTopKSAE(8, 40, k=2)
    with pytest.raises(ValueError, match="sum to dict_size=40"):
        MatryoshkaBatchTopKSAE(8, 40, k=2, group_sizes=[10, 20])
    with pytest.raises(ValueError, match="sum to 1"):
        MatryoshkaBatchTopKSAE(8, 40, k=2, group_fractions=[0.5, 0.6])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matryoshka_prefix_losses_equal_a_naive_per_prefix_computation(reduction):
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(D, F_, k=6, group_sizes=[8, 24, 32], prefix_reduction=reduction, aux_coef=0)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(20, D)
    out = sae.forward_pass(x)
    assert int((out.acts != 0).sum()) == 6 * 20  # one BatchTopK over the whole dictionary

    naive = []
    for end in (8, 32, 64):
        recon = torch.stack([sum(out.acts[b, i] * sae.W_dec[i] for i in range(end)) + sae.b_dec for b in range(20)])
        naive.append(((recon - x) ** 2).sum(dim=1).mean())
    expected = sum(naive) / 3 if reduction == "mean" else sum(naive)

    terms = sae.losses(x, out, step=0)
    assert set(terms) == {"mse", "prefix_mse"}
    assert terms["mse"][0].item() == pytest.approx(naive[-1].item(), rel=1e-5)  # the full reconstruction
    assert total_loss(terms).item() == pytest.approx(expected.item(), rel=1e-5)
    # And its gradient is the naive one.
    grad = torch.autograd.grad(total_loss(terms), sae.W_dec, retain_graph=True)[0]
    naive_grad = torch.autograd.grad(expected, sae.W_dec)[0]
    assert torch.allclose(grad, naive_grad, atol=1e-5)


def test_matryoshka_infers_and_exports_like_batchtopk():
    sae = MatryoshkaBatchTopKSAE(8, 32, k=2, group_sizes=[8, 24], threshold_momentum=0.0)
    x = torch.randn(30, 8)
    train_acts = sae.encode(x)
    assert sae.threshold.item() == pytest.approx(train_acts[train_acts > 0].min().item())
    sae.eval()
    pre = sae.pre_activations(x)
    assert torch.equal(sae.encode(x) != 0, pre > sae.threshold)
    architecture, tensors, fields = sae.export_state()
    assert architecture == "jumprelu" and tensors["threshold"].shape == (32,)
    assert fields["c2r_matryoshka_group_sizes"] == [8, 24]


# --- JumpReLU ---------------------------------------------------------------------------------------------------


def test_jumprelu_is_zero_below_the_threshold_and_the_identity_above():
    sae = JumpReLUSAE(D, F_, threshold_init=0.05)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-4, 0, F_))
    x = torch.randn(50, D)
    pre = sae.pre_activations(x)
    acts = sae.encode(x)
    above = pre > sae.threshold
    assert torch.equal(acts[above], pre[above])
    assert (acts[~above] == 0).all()
    assert torch.allclose(sae.threshold, torch.linspace(-4, 0, F_).exp())


def test_jumprelu_straight_through_gradients_match_hand_derived_values():
    # Rectangle kernel of width ε = 0.1 around θ: only |z − θ| < 0.05 contributes.
    z = torch.tensor([[0.52, 0.10], [0.49, 0.30], [0.70, 0.305]], requires_grad=True)
    theta = torch.tensor([0.5, 0.3], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])

    out = jumprelu(z, theta, 0.1)
    assert torch.equal(out.detach(), torch.tensor([[0.52, 0.0], [0.0, 0.0], [0.70, 0.305]]))
    (out * upstream).sum().backward()
    # ∂/∂θ_i = −(θ_i/ε) Σ_b K((z_bi − θ_i)/ε) g_bi: latent 0 rows 0, 1 (g = 1, 3); latent 1 rows 1, 2 (g = 4, 6).
    assert torch.allclose(theta.grad, torch.tensor([-(0.5 / 0.1) * (1 + 3), -(0.3 / 0.1) * (4 + 6)]))
    # ∂/∂z = H(z − θ) g.
    assert torch.equal(z.grad, upstream * torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))

    z.grad, theta.grad = None, None
    (heaviside(z, theta, 0.1) * upstream).sum().backward()
    # ∂/∂θ_i = −(1/ε) Σ_b K(...) g_bi; no gradient to z.
    assert torch.allclose(theta.grad, torch.tensor([-(1 / 0.1) * (1 + 3), -(1 / 0.1) * (4 + 6)]))
    assert z.grad is None


def test_jumprelu_l0_loss_and_its_threshold_gradient():
    torch.manual_seed(0)
    sae = JumpReLUSAE(D, F_, l0_coef=0.5, l0_warmup_steps=4, bandwidth=0.2, threshold_init=0.3, aux_coef=0)
    x = torch.randn(40, D)
    out = sae.forward_pass(x)
    terms = sae.losses(x, out, step=1)
    value, weight = terms["l0"]
    assert weight == pytest.approx(0.5 * 2 / 4)  # linear warm-up: (step + 1) / l0_warmup_steps
    assert value.item() == pytest.approx((out.acts != 0).sum(dim=1).float().mean().item())
    value.backward()
    pre, theta = out.pre_acts.detach(), sae.threshold.detach()
    in_window = ((pre - theta).abs() < 0.1).float()
    assert in_window.sum() > 0  # the check is not vacuous
    # d L0 / d log θ = θ · d L0 / d θ = θ · (−1/ε) · (1/B) Σ_b K(...)
    expected = theta * (-1 / 0.2) * in_window.sum(dim=0) / 40
    assert torch.allclose(sae.log_threshold.grad, expected, atol=1e-6)
    assert sae.W_enc.grad is None or (sae.W_enc.grad == 0).all()  # the L0 reaches the encoder only via θ


# --- ReLU + L1 ---------------------------------------------------------------------------------------------------


def test_relu_l1_is_weighted_by_decoder_norms_and_warms_up():
    torch.manual_seed(0)
    sae = ReLUSAE(D, F_, l1_coef=0.3, l1_warmup_steps=10, aux_coef=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F_, 1) * 3)
    x = torch.randn(12, D)
    out = sae.forward_pass(x)
    assert torch.equal(out.acts, out.pre_acts.relu())
    terms = sae.losses(x, out, step=4)
    naive = sum(out.acts[b, i] * sae.W_dec[i].norm() for b in range(12) for i in range(F_)) / 12
    assert terms["l1"][0].item() == pytest.approx(naive.item(), rel=1e-5)
    assert [sae.losses(x, out, step=t)["l1"][1] for t in (0, 4, 9, 50)] == pytest.approx([0.03, 0.15, 0.3, 0.3])


def test_relu_starts_with_small_decoder_rows_and_tied_encoder():
    sae = ReLUSAE(D, F_, decoder_init_norm=0.1)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((F_,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.t())


# --- Gated -------------------------------------------------------------------------------------------------------


def gated_trained_like(sae):
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_mag.normal_(0, 0.3)
        sae.r_mag.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
    return sae


def test_gated_codes_are_the_gated_magnitudes():
    torch.manual_seed(0)
    sae = gated_trained_like(GatedSAE(D, F_))
    x = torch.randn(30, D)
    out = sae.forward_pass(x)
    centred = x - sae.b_dec
    gate = centred @ sae.W_enc + sae.b_enc
    magnitude = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag  # the paper's rescaled encoder
    assert torch.allclose(out.pre_acts, gate, atol=1e-6)
    assert torch.allclose(out.acts, (gate > 0) * magnitude.relu(), atol=1e-5)
    assert torch.allclose(sae.encode(x), out.acts)


def test_gated_aux_loss_matches_a_naive_computation_and_leaves_the_decoder_alone():
    torch.manual_seed(0)
    sae = gated_trained_like(GatedSAE(D, F_, l1_coef=0.7, l1_warmup_steps=0, gate_aux_coef=1.0, aux_coef=0))
    x = torch.randn(9, D)
    out = sae.forward_pass(x)
    terms = sae.losses(x, out, step=0)
    assert set(terms) == {"mse", "l1", "gate_aux"}

    gate = out.pre_acts.detach().relu()
    naive_aux = 0.0
    for b in range(9):
        via_gate = sum(gate[b, i] * sae.W_dec[i] for i in range(F_)) + sae.b_dec
        naive_aux += ((x[b] - via_gate) ** 2).sum().item()
    assert terms["gate_aux"][0].item() == pytest.approx(naive_aux / 9, rel=1e-5)
    assert terms["l1"][0].item() == pytest.approx(gate.sum(dim=1).mean().item(), rel=1e-6)
    assert terms["l1"][1] == 0.7

    terms["gate_aux"][0].backward()
    assert sae.W_dec.grad is None  # reconstructs through a detached decoder
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_enc.grad.abs().sum() > 0  # it trains the gate path
    assert sae.r_mag.grad is None and sae.b_mag.grad is None  # not the magnitude path


# --- OrtSAE ------------------------------------------------------------------------------------------------------


def naive_ortho(rows, perm, chunk_size):
    """The OrtSAE penalty by loops: for each chunk of ``perm``, each latent's largest cosine to another member."""
    total_ = 0.0
    for start in range(0, len(perm), chunk_size):
        chunk = perm[start : start + chunk_size].tolist()
        for i in chunk:
            others = [F.cosine_similarity(rows[i], rows[j], dim=0) for j in chunk if j != i]
            if others:
                total_ = total_ + torch.clamp(max(others), min=0) ** 2
    return total_ / rows.shape[0]


@pytest.mark.parametrize("chunk_size, step", [(7, 0), (7, 3), (64, 5), (1000, 0)])
def test_ortho_loss_matches_a_naive_loop(chunk_size, step):
    torch.manual_seed(0)
    rows = torch.randn(40, 6, requires_grad=True)  # 40 = 5 chunks of 7 + one of 5 (or one chunk)
    regularizer = Ortho(coef=0.25, chunk_size=chunk_size, seed=3)
    loss = regularizer(torch.randn(8, 40), rows, step)

    perm = torch.randperm(40, generator=stream_generator(3, "ortho.chunks", step))
    expected = naive_ortho(rows, perm, chunk_size)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad = torch.autograd.grad(loss, rows)[0]
    naive_grad = torch.autograd.grad(expected, rows)[0]
    assert torch.allclose(grad, naive_grad, atol=1e-6)


def test_ortho_ignores_activations_and_redraws_chunks_each_step():
    torch.manual_seed(0)
    rows = torch.randn(64, 8)
    regularizer = Ortho(chunk_size=8, seed=0)
    assert regularizer(torch.zeros(4, 64), rows, 2) == regularizer(torch.rand(4, 64) * 9, rows, 2)
    assert not torch.equal(regularizer.neighbors(rows, 2), regularizer.neighbors(rows, 3))
    # With one chunk holding every latent, it is the global max-cosine penalty.
    unit = F.normalize(rows, dim=1)
    cosines = (unit @ unit.T).fill_diagonal_(-math.inf)
    expected = cosines.max(dim=1).values.clamp_min(0).square().mean()
    assert ortho_loss(rows, Ortho(chunk_size=64).neighbors(rows, 0)).item() == pytest.approx(expected.item())


def test_ortho_schedule_and_defaults():
    regularizer = Ortho()
    assert regularizer.schedule == Schedule(coef=0.25) and regularizer.chunk_size == 8192
    assert [regularizer.weight(t) for t in (0, 1, 2)] == [0.25, 0.25, 0.25]
    scheduled = Ortho(coef=0.5, interval=3, start_step=2)
    assert [scheduled.weight(t) for t in range(9)] == [0, 0, 1.5, 0, 0, 1.5, 0, 0, 1.5]
    with pytest.raises(ValueError, match="chunk_size must be >= 2"):
        Ortho(chunk_size=1)


# --- through the real entrypoint ---------------------------------------------------------------------------------


def tiny(model):
    return [o for o in TINY if not (model in K_FREE and o.startswith("model.k="))] + [f"model={model}"]


@pytest.mark.parametrize("regularizer", ["none", "c2r", "ortho"])
@pytest.mark.parametrize("model", ARCHITECTURES)
def test_every_architecture_trains_with_every_regularizer(compose_train, tmp_path, model, regularizer):
    # The end-of-training evaluation reads the exported SAE, which depends on the architecture only: once each.
    evaluated = regularizer == "none"
    cfg = compose_train(*tiny(model), f"regularizer={regularizer}", *([] if evaluated else ["evaluation=none"]))
    metrics = train(cfg)
    assert metrics["steps"] == 20
    assert all(math.isfinite(metrics[key]) for key in ("fvu", "mse", "l0"))
    sae = load_sae(tmp_path / "run" / "sae")
    assert sae.W_dec.shape == (128, 32)
    assert sae.cfg["c2r_training_architecture"] == model
    if evaluated:
        evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
        assert evaluation["evals"] == ["core", "ground_truth"] and math.isfinite(evaluation["core"]["fvu"])


def test_extra_regularizers_add_terms_next_to_the_selected_one(compose_train):
    from c2r.train import build_regularizers

    cfg = compose_train(
        *tiny("topk"), "regularizer=c2r", "+regularizer@extra_regularizers.ortho=ortho",
        "extra_regularizers.ortho.coef=0.5",
    )
    regularizers = build_regularizers(cfg)
    assert list(regularizers) == ["c2r", "ortho"] and regularizers["ortho"].schedule.coef == 0.5
    assert list(build_regularizers(compose_train(*tiny("topk")))) == []  # regularizer=none, nothing extra
    with pytest.raises(ValueError, match="two regularizers are named 'ortho'"):
        build_regularizers(compose_train(*tiny("topk"), "regularizer=ortho", "+regularizer@extra_regularizers.ortho=ortho"))


def test_c2r_and_ortho_train_together_and_each_term_is_logged(compose_train, tmp_path):
    train(compose_train(
        *tiny("gated"), "regularizer=c2r", "regularizer.coef=0.01", "+regularizer@extra_regularizers.ortho=ortho",
        "logger=csv", "trainer.log_every_n_steps=1", "evaluation=none",
    ))
    run_dir = tmp_path / "run"
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for term in ("mse", "l1", "gate_aux", "c2r", "ortho"):
        assert f"losses/{term}" in header and f"losses/{term}_weighted" in header
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 20


# --- recovery of known features ----------------------------------------------------------------------------------

# 32-d data from 64 independent unit directions, exactly 4 active per row, magnitudes U(0.5, 1.5), normalised to
# E‖x‖² = 1; 128 latents, 500 Adam steps of 256 rows at lr 1e-2. The L1/L0 weights were tuned so that L0 lands
# near the true 4; they warm up over the first 100 steps.
RECOVERY = {
    "topk": lambda: TopKSAE(32, 128, k=4, dead_tokens=5000),
    "batchtopk": lambda: BatchTopKSAE(32, 128, k=4, dead_tokens=5000),
    "matryoshka": lambda: MatryoshkaBatchTopKSAE(32, 128, k=4, group_sizes=[96, 32], dead_tokens=5000),
    "relu": lambda: ReLUSAE(32, 128, l1_coef=0.6, l1_warmup_steps=100),
    "jumprelu": lambda: JumpReLUSAE(
        32, 128, l0_coef=0.02, l0_warmup_steps=100, bandwidth=0.05, threshold_init=0.1
    ),
    "gated": lambda: GatedSAE(32, 128, l1_coef=0.5, l1_warmup_steps=100),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    source = SyntheticShards(
        d=32, n_features=64, l0=4, rows=32768, rows_per_shard=16384, seed=0, cache_dir=tmp_path_factory.mktemp("s")
    )
    x = source.sample_shard(0)[0]
    return source.features(), x / x.pow(2).sum(dim=1).mean().sqrt()


def fit(sae, x, steps=500, batch=256, lr=1e-2):
    """A plain training loop with the training step of SAEModule (``c2r.step``)."""
    generator = torch.Generator().manual_seed(0)
    sae.init_decoder_bias(x[:4096])
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        rows = x[torch.randint(0, x.shape[0], (batch,), generator=generator)]
        terms, out = loss_terms(sae, {}, rows, step)
        optimizer.zero_grad()
        total_loss(terms).backward()
        apply_gradients(sae, optimizer)
        sae.update_firing((out.acts != 0).any(dim=0), batch)
    return sae.eval()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_recovers_the_ground_truth_features_at_the_true_l0(synthetic, name):
    features, x = synthetic
    torch.manual_seed(0)
    sae = fit(RECOVERY[name](), x)
    with torch.no_grad():
        l0 = (sae.encode(x[:8192]) != 0).sum(dim=1).float().mean().item()
    best_cosine = (features @ F.normalize(sae.W_dec.detach(), dim=1).T).max(dim=1).values
    recovered = (best_cosine >= 0.9).float().mean().item()
    assert 3.0 <= l0 <= 5.0, l0
    assert recovered >= 0.9, (recovered, l0)
