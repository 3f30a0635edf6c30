"""The rows an evaluation reads: raw activations from a shard directory, in a fixed order, in batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from c2r.data.shards import Manifest, ShardEntry, ShardReader

SPLITS = ("val", "train", "all")


@dataclass
class RowBatch:
    """``x [n, d]``: raw (unnormalised) float32 activations, rows ``start:start + n`` of shard file ``shard``."""

    x: Tensor
    shard: str
    start: int


@dataclass
class EvalRows:
    """The first ``rows`` rows (in manifest order) of the shards of ``split``; ``notes`` say where this differs
    from what was asked for (fewer rows than requested, a missing validation split)."""

    manifest: Manifest
    split: str
    shards: list[tuple[ShardEntry, int]]  # (shard, rows read from it)
    rows: int
    requested: int | None  # rows asked for; None = all of the split
    notes: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.manifest.directory

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[RowBatch]:
        reader = ShardReader(self.directory)
        for entry, count in self.shards:
            for start in range(0, count, batch_size):
                rows = reader.rows(entry, start, min(start + batch_size, count))
                yield RowBatch(x=torch.from_numpy(rows).to(device), shard=entry.file, start=start)


def select_rows(shard_dir: str | Path, *, tokens: int | None = None, split: str = "val") -> EvalRows:
    """The first ``tokens`` rows of ``split`` (``val`` = held-out shards, ``train``, or ``all``); ``None`` = all of
    them.

    When the split has fewer rows than ``tokens`` asks for, all of them are used and a note says so; ``val`` falls
    back to the training shards (with a note) when the directory holds no validation shard.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be >= 1 or null (all rows), got {tokens}")
    manifest = Manifest.load(shard_dir)
    notes = []
    entries = {"val": manifest.val_shards, "train": manifest.train_shards, "all": manifest.shards}[split]
    if not entries and split == "val":
        notes.append(f"{shard_dir} has no validation shards: evaluated on training rows")
        split, entries = "train", manifest.train_shards
    available = sum(e.rows for e in entries)
    if tokens is not None and available < tokens:
        notes.append(
            f"asked for {tokens:,} tokens but the {split} split has only {available:,} rows: evaluated on all of them"
        )
    chosen, left = [], available if tokens is None else tokens
    for entry in entries:
        if left <= 0:
            break
        take = min(entry.rows, left)
        chosen.append((entry, take))
        left -= take
    rows = sum(count for _, count in chosen)
    return EvalRows(manifest=manifest, split=split, shards=chosen, rows=rows, requested=tokens, notes=notes)
