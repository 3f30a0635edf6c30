"""Activation data: shard format, synthetic generator, LM harvesting and the Lightning DataModule."""

from c2r.data.datamodule import (
    ActivationDataModule,
    BlockDataset,
    BlockSampler,
    BlockStream,
    ExistingShards,
    ShardSource,
)
from c2r.data.harvest import HarvestedShards
from c2r.data.shards import (
    FORMAT_VERSION,
    Manifest,
    Problem,
    ShardEntry,
    ShardIntegrityError,
    ShardWriter,
    list_complete_shards,
    verify,
)
from c2r.data.synthetic import SyntheticShards

__all__ = [
    "FORMAT_VERSION",
    "ActivationDataModule",
    "BlockDataset",
    "BlockSampler",
    "BlockStream",
    "ExistingShards",
    "HarvestedShards",
    "Manifest",
    "Problem",
    "ShardEntry",
    "ShardIntegrityError",
    "ShardSource",
    "ShardWriter",
    "SyntheticShards",
    "list_complete_shards",
    "verify",
]
