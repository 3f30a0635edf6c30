"""Activation data: shard format, synthetic generator, LM harvesting and the Lightning DataModule.

The names below are imported on first use, so ``c2r.data.shards`` (what ``python -m c2r.shards`` and
``python -m c2r.harvest`` start with) does not load Lightning and the language-model stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "c2r.data.datamodule": ["ActivationDataModule", "BlockDataset", "BlockSampler", "BlockStream"],
    "c2r.data.harvest": ["HarvestedShards"],
    "c2r.data.shards": [
        "FORMAT_VERSION", "Manifest", "Problem", "ShardEntry", "ShardIntegrityError", "ShardReader", "ShardWriter",
        "list_complete_shards", "verify",
    ],
    "c2r.data.sources": ["CachedShards", "ExistingShards", "ShardSource"],
    "c2r.data.synthetic": ["SyntheticShards"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'c2r.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
