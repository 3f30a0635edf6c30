"""The ground-truth benchmark data: data=synthetic_hierarchy (c2r/data/hierarchy.py)."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from c2r.data.hierarchy import HierarchicalShards, load_ground_truth
from c2r.data.shards import Manifest
from conftest import TINY_JOB


def source(cache, **overrides) -> HierarchicalShards:
    params = dict(d=24, n_parents=4, children_per_parent=3, n_independent=8, l0=4.0, child_prob=0.75,
                  rows=8192, rows_per_shard=4096, val_shards=1, seed=0, cache_dir=cache)
    return HierarchicalShards(**{**params, **overrides})


def active_sets(src: HierarchicalShards, shard: int = 0):
    _, codes = src.sample_shard(shard)
    active = codes > 0
    P, C = src.n_parents, src.children_per_parent
    parents = active[:, :P]
    children = active[:, P : P + P * C].view(-1, P, C)
    return active, parents, children


def test_layout_and_saved_ground_truth(tmp_path):
    src = source(tmp_path)
    shard_dir = src.ensure()
    truth = load_ground_truth(shard_dir)
    assert truth.features.shape == (4 + 12 + 8, 24)
    torch.testing.assert_close(truth.features.norm(dim=1), torch.ones(24))
    assert truth.parents.tolist() == [-1] * 4 + [p for p in range(4) for _ in range(3)] + [-1] * 8
    assert truth.children() == {p: [4 + 3 * p + c for c in range(3)] for p in range(4)}
    manifest = Manifest.load(shard_dir)
    assert manifest.source["kind"] == "synthetic_hierarchy" and len(manifest.val_shards) == 1
    for index, entry in enumerate(manifest.shards):  # the saved codes are the regenerated ones, row by row
        x, codes = src.sample_shard(index)
        torch.testing.assert_close(truth.codes(entry.file), codes)
        torch.testing.assert_close(truth.codes(entry.file, 100, 130), codes[100:130])
        stored = torch.from_numpy(np.load(shard_dir / entry.file))
        torch.testing.assert_close(stored, x)
        torch.testing.assert_close(stored, codes @ truth.features, rtol=1e-5, atol=1e-5)


def test_children_fire_only_with_their_parent_and_siblings_exclude_each_other(tmp_path):
    src = source(tmp_path)
    active, parents, children = active_sets(src)
    assert not (children.any(dim=2) & ~parents).any()
    assert children.sum(dim=2).max() == 1
    with_child = children.any(dim=2)[parents].double().mean()
    assert float(with_child) == pytest.approx(0.75, abs=0.03)
    assert float(active.sum(dim=1).double().mean()) == pytest.approx(4.0, rel=0.05)


def test_without_hierarchy_rates_match_but_children_are_independent(tmp_path):
    hier, flat = source(tmp_path), source(tmp_path, hierarchy=False)
    a_h, _, children_h = active_sets(hier)
    a_f, parents_f, children_f = active_sets(flat)
    torch.testing.assert_close(a_f.double().mean(dim=0), a_h.double().mean(dim=0), atol=0.02, rtol=0.15)
    orphans = (children_f.any(dim=2) & ~parents_f).double().mean()
    assert orphans > 0.05  # children fire without their parent
    assert hier.shard_dir != flat.shard_dir


def test_correlation_couples_roots_in_a_group(tmp_path):
    _, parents_0, _ = active_sets(source(tmp_path, n_parents=4, correlation=0.0))
    _, parents_9, _ = active_sets(source(tmp_path, n_parents=4, correlation=0.9, correlation_group_size=4))
    def joint_excess(parents):  # P(0 and 1) − P(0)·P(1)
        p = parents.double()
        return float((p[:, 0] * p[:, 1]).mean() - p[:, 0].mean() * p[:, 1].mean())
    assert abs(joint_excess(parents_0)) < 0.01 and joint_excess(parents_9) > 0.05
    # marginals stay put
    torch.testing.assert_close(parents_9.double().mean(dim=0), parents_0.double().mean(dim=0), atol=0.02, rtol=0.1)


def test_cache_is_keyed_by_parameters(tmp_path):
    first = source(tmp_path)
    directory = first.ensure()
    stamp = (directory / "shard_00000.npy").stat().st_mtime_ns
    assert source(tmp_path).ensure() == directory
    assert (directory / "shard_00000.npy").stat().st_mtime_ns == stamp  # not regenerated
    assert source(tmp_path, seed=1).shard_dir != directory
    assert source(tmp_path, child_prob=0.5).shard_dir != directory


def test_orthogonal_features(tmp_path):
    src = source(tmp_path, orthogonal=True)
    G = src.features().double()
    torch.testing.assert_close(G @ G.T, torch.eye(24, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"orthogonal": True, "d": 8}, "orthogonal=true needs"),
        ({"l0": 40.0}, "lower l0"),
        ({"child_prob": 1.5}, "child_prob"),
        ({"children_per_parent": 0}, "children_per_parent"),
        ({"rows": 4096}, "validation shard"),
    ],
)
def test_bad_parameters_fail_with_a_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        source(tmp_path, **overrides)


def test_config_option_composes_and_instantiates(compose_train):
    cfg = compose_train("data=synthetic_hierarchy", "data.source.rows=8192", "data.source.rows_per_shard=4096",
                        "data.source.val_shards=1", *TINY_JOB)
    src = instantiate(cfg.data.source)
    assert isinstance(src, HierarchicalShards) and src.d == cfg.data.d_in and "d_in" not in cfg.model
    assert load_ground_truth(src.ensure()).parents is not None
