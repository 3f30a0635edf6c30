"""Synthetic sparse-feature shards."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from c2r.data import Manifest, SyntheticShards, verify

SMALL = dict(d=16, n_features=64, l0=4, rows=3 * 512, rows_per_shard=512, val_shards=1, seed=7)


def test_writes_shards_and_dictionary(tmp_path):
    source = SyntheticShards(**SMALL, cache_dir=str(tmp_path))
    directory = source.ensure()
    assert directory == source.shard_dir and directory.parent == tmp_path / "synthetic"
    manifest = Manifest.load(directory)
    assert manifest.d == 16 and [s.rows for s in manifest.shards] == [512] * 3
    assert [s.split for s in manifest.shards] == ["train", "train", "val"]
    assert manifest.source["kind"] == "synthetic" and manifest.source["l0"] == 4
    assert manifest.source["seed"] == 7
    assert verify(directory) == []
    features = np.load(directory / "features.npy")
    assert features.shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-6)


def test_exactly_l0_active_features_per_row(tmp_path):
    source = SyntheticShards(**SMALL, cache_dir=str(tmp_path))
    directory = source.ensure()
    features = torch.from_numpy(np.load(directory / "features.npy"))
    stored = torch.from_numpy(np.load(directory / "shard_00001.npy"))
    x, active, magnitudes = source.sample_shard(1)
    torch.testing.assert_close(stored, x)  # the shard is reproducible from the seed
    assert active.shape == (512, 4)
    assert all(len(set(row)) == 4 for row in active.tolist())  # l0 distinct features per row
    assert magnitudes.min() >= 0.5 and magnitudes.max() <= 1.5
    codes = torch.zeros(512, 64).scatter_(1, active, magnitudes)
    assert ((codes > 0).sum(1) == 4).all()
    torch.testing.assert_close(codes @ features, stored, atol=1e-5, rtol=1e-5)


def test_same_params_reuse_cache_and_changed_params_do_not(tmp_path):
    first = SyntheticShards(**SMALL, cache_dir=str(tmp_path))
    directory = first.ensure()
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    time.sleep(0.01)
    again = SyntheticShards(**SMALL, cache_dir=str(tmp_path))
    assert again.ensure() == directory
    assert (directory / "manifest.json").stat().st_mtime_ns == stamp
    for change in ({"seed": 8}, {"l0": 5}, {"noise_std": 0.1}, {"zipf_exponent": 1.0}):
        other = SyntheticShards(**{**SMALL, **change}, cache_dir=str(tmp_path))
        assert other.shard_dir != directory, change
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [directory.name]  # no temp dirs left


def test_zipf_firing_frequencies_decrease(tmp_path):
    source = SyntheticShards(**{**SMALL, "zipf_exponent": 1.0, "rows": 4096, "rows_per_shard": 2048},
                             cache_dir=str(tmp_path))
    _, active, _ = source.sample_shard(0)
    counts = torch.bincount(active.flatten(), minlength=64).float()
    # average over groups of 8 features to smooth sampling noise; strictly decreasing
    grouped = counts.view(8, 8).mean(1)
    assert (grouped[1:] < grouped[:-1]).all(), grouped
    assert counts[0] > 5 * counts[-8:].mean()
    uniform = SyntheticShards(**{**SMALL, "rows": 4096, "rows_per_shard": 2048}, cache_dir=str(tmp_path))
    flat = torch.bincount(uniform.sample_shard(0)[1].flatten(), minlength=64).float().view(8, 8).mean(1)
    expected = 2048 * 4 / 64
    assert (flat - expected).abs().max() < 0.15 * expected, flat


def test_noise_is_added(tmp_path):
    source = SyntheticShards(**{**SMALL, "noise_std": 0.05}, cache_dir=str(tmp_path))
    x, active, magnitudes = source.sample_shard(0)
    clean = torch.zeros(512, 64).scatter_(1, active, magnitudes) @ source.features()
    residual = (x - clean).std().item()
    assert 0.04 < residual < 0.06


@pytest.mark.parametrize(
    "change, message",
    [
        ({"l0": 0}, "l0 must be between 1 and n_features"),
        ({"l0": 65}, "l0 must be between 1 and n_features"),
        ({"rows": 512}, "not enough for 1 validation shard"),
        ({"magnitude_min": 2.0}, "magnitude_min <= magnitude_max"),
        ({"zipf_exponent": -1.0}, "zipf_exponent must be >= 0"),
        ({"noise_std": -0.1}, "noise_std must be >= 0"),
    ],
)
def test_invalid_parameters(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        SyntheticShards(**{**SMALL, **change}, cache_dir=str(tmp_path))


def test_default_size_generates_quickly(tmp_path):
    start = time.perf_counter()
    directory = SyntheticShards(cache_dir=str(tmp_path)).ensure()
    elapsed = time.perf_counter() - start
    manifest = Manifest.load(directory)
    assert manifest.train_rows + manifest.val_rows == 131072 and manifest.d == 64
    assert elapsed < 10, f"generating the default synthetic set took {elapsed:.1f} s"
