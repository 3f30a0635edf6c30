"""Blocks of activation rows for training: dataset, sampler and the DataModule.

A *block* is a contiguous slice of rows from one shard and is one batch on one rank (the
DataLoader runs with ``batch_size=None``). Rows were shuffled across contexts when the shards were
written, so contiguous reads are both fast (one memmap slice) and well mixed. The block order is a
pure function of ``(seed, epoch)`` and is split disjointly across DDP ranks with equal counts, so
the trainer must use ``Trainer(use_distributed_sampler=False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from c2r.data.shards import Manifest, ShardEntry, ShardReader
from c2r.data.sources import ShardSource
from c2r.seeds import stream_generator


class BlockSampler(Sampler[int]):
    """Block indices for one rank; the order is a pure function of ``(seed, epoch)``.

    Rank ``r`` of ``W`` takes ``perm[r::W]`` truncated to ``num_blocks // W``, so every rank gets the
    same number of blocks (DDP needs equal step counts) and the ranks' blocks are disjoint. At most
    ``W - 1`` blocks per epoch are left out; which ones changes with the epoch when shuffling.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_blocks // world_size == 0:
            raise ValueError(
                f"{num_blocks} block(s) cannot be split over {world_size} rank(s): each rank needs at "
                "least one. Use more data (rows), a smaller batch_size, or fewer devices."
            )
        self.num_blocks = num_blocks
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        """This rank's block indices for the current epoch, in order."""
        return self.order(self.epoch)

    def order(self, epoch: int) -> list[int]:
        """This rank's block indices for ``epoch``, in order (a pure function of ``seed`` and ``epoch``)."""
        if self.shuffle:
            order = torch.randperm(self.num_blocks, generator=stream_generator(self.seed, "data.order", epoch))
        else:
            order = torch.arange(self.num_blocks)
        return order[self.rank :: self.world_size][: len(self)].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.num_blocks // self.world_size


class BlockStream(Sampler[int]):
    """The endless training order: step ``t`` of this rank reads block ``epoch_order[t % n]`` of epoch ``t // n``
    (``n`` = blocks per rank per epoch, ``epoch_order`` = :class:`BlockSampler`'s pure function of
    ``(seed, epoch)``). Starting at ``start_step`` continues a resumed run exactly where it stopped.

    It has no length: Lightning trains one endless epoch and stops at ``max_steps``.
    """

    def __init__(self, epochs: BlockSampler, start_step: int = 0):
        self.epochs = epochs
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start_step, len(self.epochs))
        while True:
            yield from self.epochs.order(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def block_at(self, step: int) -> int:
        """The block this rank reads at step ``step`` (counted from the start of training, not ``start_step``)."""
        epoch, offset = divmod(step, len(self.epochs))
        return self.epochs.order(epoch)[offset]


class BlockDataset(Dataset[torch.Tensor]):
    """Item ``k`` = block ``k``: ``block_rows`` contiguous rows of one shard, as float32 × ``scale``.

    Shard ``s`` contributes ``rows_s // block_rows`` blocks in order; its last ``rows_s % block_rows``
    rows are never read (with the default sizes this is nothing, or part of the small last shard).
    Rows are read by a :class:`~c2r.data.shards.ShardReader`, which opens each shard lazily and is not pickled, so
    each DataLoader worker opens its own. Opening a shard checks its sha256 (about 0.9 s per GiB, once per shard
    per process, so with ``num_workers=W`` each worker hashes the shards it reads), and every block is bounded by
    :func:`~c2r.data.shards.check_rows`, so damaged data stops the run at its first read, naming the file.
    """

    def __init__(self, manifest_dir: str | Path, shards: list[ShardEntry], block_rows: int, scale: float):
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.directory = Path(manifest_dir)
        self.shards = list(shards)
        self.block_rows = int(block_rows)
        self.scale = float(scale)
        too_small = [s.file for s in self.shards if s.rows < self.block_rows]
        if too_small:
            raise ValueError(
                f"shard(s) {too_small} in {self.directory} have fewer rows than one block "
                f"({self.block_rows} rows per rank per step); lower the batch size or write larger "
                "shards (rows_per_shard)"
            )
        self._blocks = [
            (s, start)
            for s, entry in enumerate(self.shards)
            for start in range(0, entry.rows - self.block_rows + 1, self.block_rows)
        ]
        self._reader = ShardReader(self.directory)

    def __len__(self) -> int:
        return len(self._blocks)

    def location(self, k: int) -> tuple[str, int]:
        """``(shard file, first row)`` of block ``k``."""
        shard, start = self._blocks[k]
        return self.shards[shard].file, start

    def __getitem__(self, k: int) -> torch.Tensor:
        shard, start = self._blocks[k]
        block = torch.from_numpy(self._reader.rows(self.shards[shard], start, start + self.block_rows))
        block.mul_(self.scale)
        return block


class ActivationDataModule(L.LightningDataModule):
    """Serves normalised activation blocks from a shard source.

    ``batch_size`` is the GLOBAL number of rows per optimiser step; each of the W ranks gets blocks
    of ``batch_size // W`` rows. Requires ``Trainer(use_distributed_sampler=False)`` because the
    sampler already splits blocks across ranks.
    """

    def __init__(
        self,
        source: ShardSource,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self._manifest: Manifest | None = None

    # ---- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.source.ensure()

    def setup(self, stage: str | None = None) -> None:
        self._manifest = Manifest.load(self.source.shard_dir)
        _ = self.block_rows  # fail early if batch_size does not split over the ranks

    def train_dataloader(self) -> DataLoader:
        # The trainer's global step is already restored from the checkpoint when Lightning asks for this.
        start_step = int(self.trainer.global_step) if self.trainer is not None else 0
        return self._loader(self.manifest.train_shards, shuffle=True, split="train", start_step=start_step)

    def val_dataloader(self) -> DataLoader | list:
        if not self.manifest.val_shards:
            return []
        return self._loader(self.manifest.val_shards, shuffle=False, split="val")

    # ---- what the training code uses -------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        """The shard manifest; creates the shards first if they are missing."""
        if self._manifest is None:
            self._manifest = Manifest.load(self.source.ensure())
        return self._manifest

    @property
    def d_in(self) -> int:
        return self.manifest.d

    @property
    def normalization_factor(self) -> float:
        return self.manifest.normalization_factor

    @property
    def rank_and_world(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` from the attached trainer, ``(0, 1)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    @property
    def block_rows(self) -> int:
        """Rows per block = per-rank batch size."""
        _, world = self.rank_and_world
        if self.batch_size % world:
            raise ValueError(
                f"batch_size={self.batch_size} (global rows per step) is not divisible by the "
                f"{world} ranks; choose a batch_size that is a multiple of {world}"
            )
        return self.batch_size // world

    def sample_rows(self, n: int) -> torch.Tensor:
        """The first ``n`` training rows (normalised, float32), identical on every rank.

        Used for deterministic initialisation (e.g. the decoder bias).
        """
        manifest = self.manifest
        if not 0 < n <= manifest.train_rows:
            raise ValueError(f"sample_rows needs 0 < n <= {manifest.train_rows} (the training rows), got {n}")
        reader = ShardReader(manifest.directory)
        parts = []
        remaining = n
        for entry in manifest.train_shards:
            rows = reader.rows(entry, 0, remaining)
            parts.append(rows)
            remaining -= len(rows)
            if remaining == 0:
                break
        out = torch.from_numpy(np.concatenate(parts))
        return out.mul_(manifest.normalization_factor)

    def describe_training_batch(self, step: int) -> str:
        """Where the block this rank trains on at global optimiser step ``step`` comes from, e.g.
        ``/cache/shards/shard_00003.npy rows 1024-1151``: for error messages about one batch (a non-finite loss)."""
        dataset, sampler = self._blocks(self.manifest.train_shards, shuffle=True, split="train")
        file, start = dataset.location(BlockStream(sampler).block_at(step))
        return f"{self.manifest.path(file)} rows {start}-{start + dataset.block_rows - 1}"

    # ---- helpers ---------------------------------------------------------------------------------
    def _blocks(self, shards: list[ShardEntry], *, shuffle: bool, split: str) -> tuple[BlockDataset, BlockSampler]:
        """The blocks of ``shards`` and this rank's order over them, epoch by epoch."""
        manifest = self.manifest
        rank, world = self.rank_and_world
        dataset = BlockDataset(manifest.directory, shards, self.block_rows, manifest.normalization_factor)
        if len(dataset) // world == 0:
            raise ValueError(
                f"the {split} shards of {manifest.directory} hold {len(dataset)} block(s) of "
                f"{self.block_rows} rows, fewer than the {world} rank(s); use more rows, a smaller "
                "batch_size or fewer devices"
            )
        sampler = BlockSampler(len(dataset), seed=self.seed, shuffle=shuffle, rank=rank, world_size=world)
        return dataset, sampler

    def _loader(self, shards: list[ShardEntry], *, shuffle: bool, split: str, start_step: int | None = None) -> DataLoader:
        """Validation: one pass in order. Training (``start_step`` given): the endless shuffled stream."""
        dataset, sampler = self._blocks(shards, shuffle=shuffle, split=split)
        if start_step is not None:
            sampler = BlockStream(sampler, start_step)
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
