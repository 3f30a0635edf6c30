"""Every evaluation metric on hand-built SAEs with known answers, and the core metrics against naive formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c2r.data import ShardWriter, SyntheticShards
from c2r.data.hierarchy import HierarchicalShards, load_ground_truth
from c2r.data.shards import Manifest
from c2r.evaluation import evaluate_rows, run_evaluation, select_rows
from c2r.export import sae_from_export
from c2r.sae import SparseAutoencoder


def jumprelu_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, threshold: float = 0.25) -> SparseAutoencoder:
    """An exported-form SAE with the given encoder [d, F] and decoder [F, d], no biases."""
    n_latents, d = W_dec.shape
    tensors = {
        "W_enc": W_enc.clone().float(),
        "W_dec": W_dec.clone().float(),
        "b_enc": torch.zeros(n_latents),
        "b_dec": torch.zeros(d),
        "threshold": torch.full((n_latents,), threshold),
    }
    return sae_from_export({"architecture": "jumprelu", "d_in": d, "d_sae": n_latents}, tensors)


def orthogonal_source(cache, **overrides) -> HierarchicalShards:
    params = dict(d=32, n_parents=2, children_per_parent=3, n_independent=8, l0=3.0, orthogonal=True,
                  rows=8192, rows_per_shard=2048, val_shards=1, seed=0, cache_dir=cache)
    return HierarchicalShards(**{**params, **overrides})


def evaluate(sae, shard_dir, **kwargs):
    return run_evaluation(sae, shard_dir, None, split="all", batch_size=1000, plots=False, **kwargs)


@pytest.fixture(scope="module")
def unit_magnitudes(tmp_path_factory):
    """Orthonormal hierarchical features, every active coefficient exactly 1 (so hand-built encoders switch
    latents on and off exactly)."""
    source = orthogonal_source(tmp_path_factory.mktemp("cache"), magnitude_min=1.0, magnitude_max=1.0)
    return source.ensure(), source


def test_perfect_sae_has_no_absorption_no_splitting_and_full_coverage(tmp_path):
    source = orthogonal_source(tmp_path)  # magnitudes vary in [0.5, 1.5]
    shard_dir = source.ensure()
    features = source.features()
    result = evaluate(jumprelu_sae(features.T, features, threshold=1e-3), shard_dir)
    core, truth = result["core"], result["ground_truth"]["summary"]
    assert core["fvu"] < 1e-10 and core["cosine"] == pytest.approx(1.0) and core["shrinkage"] == pytest.approx(1.0)
    codes = torch.cat([load_ground_truth(shard_dir).codes(e.file) for e in Manifest.load(shard_dir).shards])
    assert core["l0"] == pytest.approx(float((codes > 0).sum(dim=1).double().mean()))
    assert core["dead_fraction"] == 0
    assert truth["coverage"] == 1 and truth["mmcs"] == pytest.approx(1.0)
    for t in (0.5, 0.7, 0.9):
        assert truth[f"splitting@{t}"] == 0
    assert truth["parents"] == 2 and truth["full_absorption_parents"] == 2
    for name in ("full_absorption", "partial_absorption", "absorption_fraction", "hedging_decoder",
                 "hedging_encoder", "child_alignment_encoder"):
        assert truth[name] == pytest.approx(0.0, abs=1e-6), name


def test_absorbing_sae_scores_full_absorption_one(unit_magnitudes):
    """Each child switches its parent's latent off (encoder −g_c components) and its own latent carries the
    parent's direction: a perfect reconstruction with complete absorption."""
    shard_dir, source = unit_magnitudes
    G = source.features()
    W_enc, W_dec = G.T.clone(), G.clone()
    children = source.ground_truth().children()
    for parent, kids in children.items():
        W_enc[:, parent] = G[parent] - G[kids].sum(dim=0)
        W_dec[kids] = G[kids] + G[parent]
    result = evaluate(jumprelu_sae(W_enc, W_dec), shard_dir)
    truth = result["ground_truth"]
    summary = truth["summary"]
    assert result["core"]["fvu"] < 1e-10
    assert summary["full_absorption"] == pytest.approx(1.0)
    assert summary["absorption_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert summary["partial_absorption"] is None  # the parent latent never fires next to a child
    assert all(p["latent"] == p["parent"] for p in truth["per_parent"])
    # Encoder: −Σ g_c added to g_p → a third of its norm... precisely ‖Q^T u‖ = √3/2, mean ⟨u, g_c⟩ = −1/2.
    assert summary["hedging_encoder"] == pytest.approx(math.sqrt(3) / 2)
    assert summary["child_alignment_encoder"] == pytest.approx(-0.5)
    assert summary["hedging_decoder"] == pytest.approx(0.0, abs=1e-6)
    # Child latents point at (g_p + g_c)/√2: cosine 0.707 to the parent, splits at τ ≤ 0.7 only; the children
    # themselves are no longer covered at 0.9.
    assert summary["splitting_parents@0.7"] == 3 and summary["splitting_parents@0.9"] == 0
    n_children = sum(len(k) for k in children.values())
    assert summary["coverage"] == pytest.approx(1 - n_children / G.shape[0])


def test_partially_absorbing_sae(unit_magnitudes):
    """Children halve the parent latent (encoder −g_c/2) and carry the other half: partial absorption 1/2,
    absorption fraction 1/2, no full absorption."""
    shard_dir, source = unit_magnitudes
    G = source.features()
    W_enc, W_dec = G.T.clone(), G.clone()
    for parent, kids in source.ground_truth().children().items():
        W_enc[:, parent] = G[parent] - 0.5 * G[kids].sum(dim=0)
        W_dec[kids] = G[kids] + 0.5 * G[parent]
    summary = evaluate(jumprelu_sae(W_enc, W_dec), shard_dir)["ground_truth"]["summary"]
    assert summary["full_absorption"] == pytest.approx(0.0, abs=1e-9)
    assert summary["partial_absorption"] == pytest.approx(0.5)
    assert summary["absorption_fraction"] == pytest.approx(0.5, abs=1e-6)


def test_hedging_decoder(unit_magnitudes):
    """A parent latent whose decoder mixes in one child at weight t has decoder hedging t/√(1+t²)."""
    shard_dir, source = unit_magnitudes
    G = source.features()
    W_dec = G.clone()
    children = source.ground_truth().children()
    for parent, kids in children.items():
        W_dec[parent] = G[parent] + 0.5 * G[kids[0]]
    per_parent = evaluate(jumprelu_sae(G.T, W_dec), shard_dir, evals=["ground_truth"])["ground_truth"]["per_parent"]
    for entry in per_parent:
        assert entry["hedging_decoder"] == pytest.approx(0.5 / math.sqrt(1.25))
        assert entry["child_alignment_decoder"] == pytest.approx(0.5 / math.sqrt(1.25) / 3)
        assert entry["hedging_encoder"] == pytest.approx(0.0, abs=1e-6)


def test_duplicated_latent_counts_as_a_split(unit_magnitudes):
    shard_dir, source = unit_magnitudes
    G = source.features()
    duplicated = G.shape[0] - 1  # an independent feature
    W_enc = torch.cat([G.T, G[duplicated, :, None]], dim=1)
    W_dec = torch.cat([G, G[duplicated][None]])
    W_dec[[duplicated, -1]] *= 0.5  # both copies fire; each reconstructs half
    result = evaluate(jumprelu_sae(W_enc, W_dec), shard_dir)
    summary = result["ground_truth"]["summary"]
    assert result["core"]["fvu"] < 1e-10
    for t in (0.5, 0.7, 0.9):
        assert summary[f"splitting@{t}"] == pytest.approx(1 / G.shape[0])
        assert summary[f"split_features@{t}"] == pytest.approx(1 / G.shape[0])
    assert summary["coverage"] == 1 and summary["full_absorption"] == pytest.approx(0.0)
    assert result["core"]["decoder_max_cos_above"]["0.9"] == pytest.approx(2 / (G.shape[0] + 1))


def test_dead_latents_are_not_matched(unit_magnitudes):
    """A latent that never fires does not count for coverage or splitting, even on the feature's direction."""
    shard_dir, source = unit_magnitudes
    G = source.features()
    W_enc = torch.cat([G.T, -G[:1].T], dim=1)  # the extra latent's encoder is negative: it never fires
    W_dec = torch.cat([G, G[:1]])
    result = evaluate(jumprelu_sae(W_enc, W_dec), shard_dir)
    assert result["core"]["dead_latents"] == 1
    assert result["ground_truth"]["summary"]["splitting@0.9"] == 0


def test_core_metrics_match_a_naive_computation(tmp_path):
    source = HierarchicalShards(d=16, n_parents=2, children_per_parent=2, n_independent=12, l0=3.0, noise_std=0.05,
                                rows=3000, rows_per_shard=1000, val_shards=1, cache_dir=tmp_path)
    shard_dir = source.ensure()
    gen = torch.Generator().manual_seed(0)
    d, n_latents = 16, 40
    tensors = {
        "W_enc": torch.randn(d, n_latents, generator=gen),
        "W_dec": torch.randn(n_latents, d, generator=gen) * 0.3,
        "b_enc": torch.randn(n_latents, generator=gen) * 0.1 - 0.3,
        "b_dec": torch.randn(d, generator=gen) * 0.1,
    }
    tensors["W_dec"][3] = tensors["W_dec"][7] * 2  # one pair of parallel decoder rows
    sae = sae_from_export({"architecture": "topk", "k": 3, "d_in": d, "d_sae": n_latents}, tensors)
    rows = select_rows(shard_dir, tokens=2500, split="all")
    settings = {"core": {"dead_threshold": 0.01, "dense_threshold": 0.05, "cos_thresholds": [0.5]}}
    core = evaluate_rows(sae, rows, evals=["core"], settings=settings, batch_size=333)["core"]

    x = torch.cat([torch.from_numpy(np.load(shard_dir / f"shard_0000{i}.npy")) for i in range(3)])[:2500].double()
    f = sae.encode(x.float()).double()
    x_hat = sae.decode(f.float()).double()
    error = (x - x_hat).pow(2).sum(dim=1)
    assert core["mse"] == pytest.approx(float(error.mean()), rel=1e-6)
    assert core["fvu"] == pytest.approx(float(error.sum() / (x - x.mean(dim=0)).pow(2).sum()), rel=1e-6)
    assert core["mse_normalized"] == pytest.approx(float(error.mean()) * Manifest.load(shard_dir).normalization_factor**2, rel=1e-6)
    nonzero = x.norm(dim=1) > 0
    assert core["cosine"] == pytest.approx(float(F.cosine_similarity(x, x_hat)[nonzero].mean()), rel=1e-6)
    assert core["shrinkage"] == pytest.approx(float((x_hat.norm(dim=1) / x.norm(dim=1))[nonzero].mean()), rel=1e-6)
    assert core["l0"] == pytest.approx(float((f != 0).sum(dim=1).double().mean()), rel=1e-9)
    frequency = (f != 0).double().mean(dim=0)
    assert core["dead_fraction"] == pytest.approx(float((frequency <= 0.01).double().mean()))
    assert core["dense_fraction"] == pytest.approx(float((frequency > 0.05).double().mean()))
    assert 0 < core["dead_fraction"] < 1 and 0 < core["dense_fraction"] < 1  # the thresholds matter here
    unit = F.normalize(tensors["W_dec"].double(), dim=1)
    cosines = (unit @ unit.T).fill_diagonal_(-2.0)
    max_cos = cosines.max(dim=1).values
    assert core["decoder_max_cos_mean"] == pytest.approx(float(max_cos.mean()), rel=1e-9)
    assert core["decoder_max_cos_above"]["0.5"] == pytest.approx(float((max_cos > 0.5).double().mean()))
    assert sum(core["decoder_max_cos_histogram"]["counts"]) == n_latents


def test_ground_truth_without_hierarchy_and_without_truth(tmp_path):
    """data=synthetic has features but no hierarchy: dictionary metrics only, with a note. Shards without any
    ground truth (harvested LM activations): the eval is left out, quietly under evals="auto", with a note when
    asked for by name."""
    plain = SyntheticShards(d=16, n_features=24, l0=3, rows=2048, rows_per_shard=1024, cache_dir=tmp_path)
    features = plain.features()
    result = evaluate(jumprelu_sae(features.T, features, threshold=0.0), plain.ensure())
    summary = result["ground_truth"]["summary"]
    assert summary["coverage"] == 1 and "full_absorption" not in summary
    assert any("no hierarchy" in note for note in result["notes"])

    writer = ShardWriter(tmp_path / "lm", d=16, rows_per_shard=512)
    writer.add(np.random.default_rng(0).normal(size=(1024, 16)).astype(np.float32))
    writer.finalize(val_shards=1)
    result = evaluate(jumprelu_sae(features.T, features), tmp_path / "lm")
    assert result["evals"] == ["core"] and "ground_truth" not in result and not result["notes"]
    assert "has no ground truth" in result["not_applicable"]["ground_truth"]
    result = evaluate(jumprelu_sae(features.T, features), tmp_path / "lm", evals=["core", "ground_truth"])
    assert result["evals"] == ["core"] and "ground_truth" not in result
    assert [note for note in result["notes"] if note.startswith("ground_truth skipped: ")]


def test_rows_selection_and_notes(unit_magnitudes):
    shard_dir, _ = unit_magnitudes  # 4 shards of 2048 rows, the last one held out
    rows = select_rows(shard_dir, tokens=3000, split="train")
    assert rows.rows == 3000 and not rows.notes
    assert [count for _, count in rows.shards] == [2048, 952]
    rows = select_rows(shard_dir, tokens=1_000_000)
    assert rows.split == "val" and rows.rows == 2048
    assert "only 2,048 rows" in rows.notes[0]
    rows = select_rows(shard_dir)  # no number asked for: all rows of the split, nothing to note
    assert rows.split == "val" and rows.rows == 2048 and rows.requested is None and not rows.notes


def test_unknown_evals_fail_clearly(unit_magnitudes):
    shard_dir, source = unit_magnitudes
    sae = jumprelu_sae(source.features().T, source.features())
    with pytest.raises(ValueError, match="unknown eval 'nope'"):
        evaluate(sae, shard_dir, evals=["nope"])
