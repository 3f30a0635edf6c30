"""Block sampler, block dataset and the Lightning DataModule."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from c2r.data import (
    ActivationDataModule,
    BlockDataset,
    BlockSampler,
    ExistingShards,
    Manifest,
    ShardIntegrityError,
    ShardWriter,
    SyntheticShards,
)
from c2r.data.shards import sha256_file


# ---- BlockSampler ---------------------------------------------------------------------------------


def _ranks(num_blocks, epoch, seed=0, world=2, shuffle=True):
    samplers = [
        BlockSampler(num_blocks, seed=seed, shuffle=shuffle, rank=r, world_size=world) for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


def test_sampler_splits_disjoint_equal_and_deterministic():
    a, b = _ranks(11, epoch=0)
    assert len(a) == len(b) == 5 == len(BlockSampler(11, seed=0, world_size=2))
    assert not set(a) & set(b)
    assert set(a) | set(b) <= set(range(11))
    assert _ranks(11, epoch=0) == [a, b]
    assert _ranks(11, epoch=1) != [a, b]
    assert _ranks(11, epoch=0, seed=1) != [a, b]


def test_sampler_single_rank_is_a_permutation():
    (order,) = _ranks(50, epoch=3, world=1)
    assert sorted(order) == list(range(50)) and order != list(range(50))


def test_sampler_without_shuffle():
    assert _ranks(7, epoch=5, shuffle=False) == [[0, 2, 4], [1, 3, 5]]
    assert _ranks(4, epoch=0, world=1, shuffle=False) == [[0, 1, 2, 3]]


def test_sampler_too_few_blocks():
    with pytest.raises(ValueError, match="3 block.*4 rank.*smaller batch_size"):
        BlockSampler(3, seed=0, rank=0, world_size=4)


# ---- BlockDataset ---------------------------------------------------------------------------------


def _write_shards(directory, rows=(40, 40, 30), d=5, seed=0) -> Manifest:
    writer = ShardWriter(directory, d=d, rows_per_shard=rows[0], source={}, shuffle=False)
    rng = np.random.default_rng(seed)
    writer.add(rng.normal(size=(sum(rows), d)).astype(np.float32))
    return writer.finalize(val_shards=1)


def test_block_dataset_slices(tmp_path):
    manifest = _write_shards(tmp_path)
    ds = BlockDataset(tmp_path, manifest.train_shards, block_rows=16, scale=0.5)
    assert len(ds) == 4  # 40 // 16 = 2 blocks per shard; 8 rows of each shard unused
    shard1 = np.load(tmp_path / "shard_00001.npy")
    block = ds[3]
    assert block.dtype == torch.float32 and block.shape == (16, 5)
    torch.testing.assert_close(block, torch.from_numpy(shard1[16:32] * 0.5))
    assert ds.location(3) == ("shard_00001.npy", 16)


def test_block_dataset_reports_nonfinite_rows(tmp_path):
    manifest = _write_shards(tmp_path)
    path = tmp_path / "shard_00001.npy"
    data = np.load(path)
    data[20, 2] = np.nan
    data[23, 0] = np.inf
    np.save(path, data)
    manifest.train_shards[1].sha256 = sha256_file(path)  # a manifest that vouches for the damaged file
    ds = BlockDataset(tmp_path, manifest.train_shards, block_rows=16, scale=1.0)
    ds[0], ds[2]  # clean blocks still load
    with pytest.raises(ShardIntegrityError, match=r"shard_00001.npy row\(s\) \[20, 23\] hold NaN/inf.*fix: restore") as err:
        ds[3]
    assert "verify" not in str(err.value)  # verify would report OK here: the checksum matches


def test_block_dataset_shard_smaller_than_block(tmp_path):
    manifest = _write_shards(tmp_path)
    with pytest.raises(ValueError, match="fewer rows than one block.*lower the batch size"):
        BlockDataset(tmp_path, manifest.shards, block_rows=32, scale=1.0)  # the val shard has 30


def test_block_dataset_pickles_without_memmaps(tmp_path):
    import pickle

    manifest = _write_shards(tmp_path)
    ds = BlockDataset(tmp_path, manifest.train_shards, block_rows=8, scale=1.0)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader._open == {}  # each DataLoader worker opens (and checks) the shards itself
    torch.testing.assert_close(clone[1], ds[1])


# ---- DataModule -----------------------------------------------------------------------------------


@pytest.fixture
def synthetic(tmp_path):
    return SyntheticShards(d=8, n_features=32, l0=3, rows=4 * 256, rows_per_shard=256, val_shards=1,
                           seed=1, cache_dir=str(tmp_path))


def _shard_rows(manifest: Manifest, entries) -> torch.Tensor:
    rows = [np.load(manifest.path(e.file)) for e in entries]
    return torch.from_numpy(np.concatenate(rows)) * manifest.normalization_factor


def _as_set(rows: torch.Tensor) -> set:
    return {tuple(r) for r in rows.numpy().round(5).tolist()}


def _take(loader, n):
    return list(itertools.islice(loader, n))


def test_datamodule_train_stream_covers_each_block_once_per_epoch(synthetic):
    dm = ActivationDataModule(synthetic, batch_size=64, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.d_in == 8
    loader = dm.train_dataloader()
    with pytest.raises(TypeError):
        len(loader)  # endless: Lightning trains one epoch and stops at max_steps
    blocks_per_epoch = 3 * 256 // 64
    batches = _take(loader, 2 * blocks_per_epoch)
    assert all(b.shape == (64, 8) and b.dtype == torch.float32 for b in batches)
    first, second = batches[:blocks_per_epoch], batches[blocks_per_epoch:]
    expected = _shard_rows(dm.manifest, dm.manifest.train_shards)
    assert _as_set(torch.cat(first)) == _as_set(expected) and len(_as_set(torch.cat(first))) == len(expected)
    # the next epoch reads the same blocks in another order
    assert _as_set(torch.cat(second)) == _as_set(expected)
    assert any(not torch.equal(x, y) for x, y in zip(first, second))
    # same seed -> same stream
    again = _take(dm.train_dataloader(), 2 * blocks_per_epoch)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))


@pytest.mark.parametrize("start_step", [5, 12, 17])
def test_datamodule_stream_resumes_at_the_trainers_global_step(synthetic, start_step):
    dm = ActivationDataModule(synthetic, batch_size=64, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    from_start = _take(dm.train_dataloader(), 30)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=start_step)
    resumed = _take(dm.train_dataloader(), 30 - start_step)
    assert all(torch.equal(x, y) for x, y in zip(resumed, from_start[start_step:], strict=True))


def test_datamodule_two_ranks(synthetic):
    per_rank = []
    for rank in range(2):
        dm = ActivationDataModule(synthetic, batch_size=64, seed=3)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
        dm.prepare_data()
        dm.setup("fit")
        batches = _take(dm.train_dataloader(), 12)
        assert all(b.shape == (32, 8) for b in batches)
        per_rank.append(_as_set(torch.cat(batches)))
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 3 * 256


def test_datamodule_batch_not_divisible(synthetic):
    dm = ActivationDataModule(synthetic, batch_size=63)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    dm.prepare_data()
    with pytest.raises(ValueError, match="not divisible by the 2 ranks"):
        dm.setup("fit")


def test_datamodule_val_uses_val_shards_in_order(synthetic):
    dm = ActivationDataModule(synthetic, batch_size=64)
    dm.prepare_data()
    dm.setup("validate")
    assert dm.manifest.val_shards and dm.manifest.val_shards[0].file == "shard_00003.npy"
    seen = torch.cat(list(dm.val_dataloader()))
    torch.testing.assert_close(seen, _shard_rows(dm.manifest, dm.manifest.val_shards))


def test_sample_rows_and_normalization(synthetic):
    dm = ActivationDataModule(synthetic, batch_size=64)
    rows = dm.sample_rows(300)  # spans two shards; works before setup
    expected = _shard_rows(dm.manifest, dm.manifest.train_shards)[:300]
    torch.testing.assert_close(rows, expected)
    assert dm.normalization_factor == dm.manifest.normalization_factor
    all_train = _shard_rows(dm.manifest, dm.manifest.train_shards).double()
    assert all_train.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="sample_rows needs"):
        dm.sample_rows(10_000)


def test_existing_shards(tmp_path, synthetic):
    source = ExistingShards(str(synthetic.ensure()))
    assert source.ensure() == synthetic.shard_dir
    dm = ActivationDataModule(source, batch_size=128)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.val_dataloader()) == 2 and dm.train_dataloader().dataset.__len__() == 6
    missing = ExistingShards(str(tmp_path / "not_there"))
    with pytest.raises(FileNotFoundError, match="missing shard directory.*python -m c2r.harvest"):
        missing.ensure()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete or not a shard directory.*data=synthetic"):
        ActivationDataModule(ExistingShards(tmp_path / "empty"), batch_size=8).prepare_data()


def test_datamodule_with_worker_processes(synthetic):
    plain = ActivationDataModule(synthetic, batch_size=64, seed=3)
    workers = ActivationDataModule(synthetic, batch_size=64, seed=3, num_workers=1)
    for dm in (plain, workers):
        dm.prepare_data()
        dm.setup("fit")
    expected = _take(plain.train_dataloader(), 15)
    got = _take(workers.train_dataloader(), 15)
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:.*LeafSpec")
def test_lightning_trainer_reads_the_stream_until_max_steps(synthetic):
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def training_step(self, batch, batch_idx):
            seen.append(batch.clone())
            return (self.layer(batch) - batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(max_steps=30, use_distributed_sampler=False, logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    dm = ActivationDataModule(synthetic, batch_size=64)
    trainer.fit(Probe(), datamodule=dm)
    dm.trainer = None
    expected = _take(dm.train_dataloader(), 30)
    assert len(seen) == 30 and all(torch.equal(x, y) for x, y in zip(seen, expected))


@pytest.mark.parametrize("rank", [0, 1])
def test_describe_training_batch_names_the_rows_served_at_each_step(synthetic, rank):
    dm = ActivationDataModule(synthetic, batch_size=64, seed=3)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
    dm.prepare_data()
    dm.setup("fit")
    blocks_per_epoch = 3 * 256 // 64 // 2
    served = _take(dm.train_dataloader(), 2 * blocks_per_epoch + 1)  # into the third epoch
    for step, block in enumerate(served):
        where = dm.describe_training_batch(step)
        path, rows = where.split(" rows ")
        first, last = map(int, rows.split("-"))
        assert last - first + 1 == 32 and path.startswith(str(dm.manifest.directory))
        expected = np.load(path)[first : last + 1] * dm.manifest.normalization_factor
        torch.testing.assert_close(block, torch.from_numpy(expected.astype(np.float32)))
