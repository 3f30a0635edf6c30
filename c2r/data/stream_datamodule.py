"""The DataModule of ``data.mode=stream``: training blocks from :class:`~c2r.data.stream.ActivationStream`,
everything else (validation rows, the normalisation factor, the decoder-bias rows, the width) from the small
held-out harvest (:func:`~c2r.data.stream.heldout_set`), through the shard DataModule it extends.

The checkpoint holds, per rank, where the window of the restored step starts (``state_dict``), which is all a
relaunch needs to serve the blocks an uninterrupted run would (docs/design.md §3).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from c2r.data.datamodule import ActivationDataModule
from c2r.data.harvest import HarvestedShards
from c2r.data.lm import load_model
from c2r.data.stream import ActivationStream, StreamError, StreamPosition, heldout_set
from c2r.jsonfile import write_json

log = logging.getLogger(__name__)

RECORD_NAME = "stream.json"


class _Blocks(IterableDataset):
    """The stream's blocks from one step on, for a ``DataLoader(batch_size=None)`` in the training process."""

    def __init__(self, stream: ActivationStream, start_step: int, start: StreamPosition):
        self.stream, self.start_step, self.start = stream, start_step, start

    def __iter__(self):
        return self.stream.blocks(self.start_step, self.start)


class StreamingDataModule(ActivationDataModule):
    """Serves blocks streamed from the LM; validates on the held-out harvest.

    Args:
        recipe: the harvest settings whose rows are streamed (``data.source``).
        batch_size, seed: as for :class:`~c2r.data.datamodule.ActivationDataModule`.
        buffer_rows: rows per shuffle window and rank (two windows are in memory: one served, one filling).
        heldout_rows: rows of the held-out validation shard (as many again are harvested first for the
            normalisation factor).
        reserve_contexts: contexts between the held-out set and the training ones (the CE-loss evaluation's).
        record_dir: where ``stream.json`` records the normalisation factor and the held-out set (the run folder).
    """

    def __init__(
        self,
        recipe: HarvestedShards,
        *,
        batch_size: int,
        seed: int = 0,
        buffer_rows: int = 65_536,
        heldout_rows: int = 16_384,
        reserve_contexts: int = 64,
        record_dir: str | Path | None = None,
    ):
        super().__init__(heldout_set(recipe, heldout_rows), batch_size=batch_size, seed=seed)
        if reserve_contexts < 0:
            raise StreamError(f"data.stream.reserve_contexts must be >= 0, got {reserve_contexts}")
        self.recipe = recipe
        self.buffer_rows = int(buffer_rows)
        self.reserve_contexts = int(reserve_contexts)
        self.record_dir = None if record_dir is None else Path(record_dir)
        self._stream: ActivationStream | None = None
        self._restored: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the DataModule: each rank loads its own LM
        return {**self.__dict__, "_stream": None}

    # ---- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        super().prepare_data()
        if self.record_dir is not None:
            write_json(self.record_dir / RECORD_NAME, {
                "normalization_factor": self.normalization_factor,
                "heldout_shards": str(self.source.shard_dir),
                "skip_contexts": self.skip_contexts,
                "buffer_rows": self.buffer_rows,
            })

    def train_dataloader(self) -> DataLoader:
        start_step = int(self.trainer.global_step) if self.trainer is not None else 0
        stream = self.stream
        return DataLoader(_Blocks(stream, start_step, self._start_position(start_step)), batch_size=None)

    def teardown(self, stage: str) -> None:
        if self._stream is not None:
            self._stream.close()

    def state_dict(self) -> dict[str, Any]:
        """Where the window of the current step starts, for every rank (gathered: the checkpoint comes from
        rank 0)."""
        if self._stream is None or self.trainer is None:
            return {}
        step = int(self.trainer.global_step)
        start = self._stream.window_starts[self._stream.window_of(step)]
        mine = torch.tensor([start.batch, start.offset], dtype=torch.long, device=self.trainer.strategy.root_device)
        return {"step": step, "positions": [part.tolist() for part in _gathered(mine)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # ---- what the training code uses -------------------------------------------------------------
    @property
    def skip_contexts(self) -> int:
        """Contexts of the text before the training ones: the held-out harvest's, then the reserve."""
        return int(self.manifest.source["contexts"]) + self.reserve_contexts

    @property
    def stream(self) -> ActivationStream:
        """This rank's stream, with its own LM on the training device (unless ``data.source.device`` says
        otherwise)."""
        if self._stream is None:
            rank, world = self.rank_and_world
            device = self.recipe.device
            if device == "auto" and self.trainer is not None:
                device = str(self.trainer.strategy.root_device)
            lm = load_model(self.recipe.model, device=device, dtype=self.recipe.model_dtype,
                            revision=self.recipe.model_revision, cache_dir=self.recipe.cache_dir)
            self._stream = ActivationStream(
                self.recipe, lm, skip_contexts=self.skip_contexts, buffer_rows=self.buffer_rows,
                block_rows=self.block_rows, scale=self.normalization_factor, seed=self.seed, rank=rank,
                world_size=world,
            )
        return self._stream

    def describe_training_batch(self, step: int) -> str:
        rank, world = self.rank_and_world
        window = step // (self.buffer_rows // self.block_rows)
        return (f"the rows streamed from {self.recipe.model} {self.recipe.hook} for step {step} (rank {rank} of "
                f"{world}, shuffle window {window})")

    def _start_position(self, step: int) -> StreamPosition:
        if step == 0:
            return StreamPosition()
        rank, world = self.rank_and_world
        restored = self._restored or {}
        if restored.get("step") != step or len(restored.get("positions", [])) != world:
            raise StreamError(
                f"cannot resume the stream at step {step}: the checkpoint holds no stream position for {world} "
                f"rank(s) at that step (it has {restored or 'none'}). Resume with the devices it was written with, "
                "or start a new run folder"
            )
        return StreamPosition(*restored["positions"][rank])


def _gathered(tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor``, in rank order (``[tensor]`` outside DDP). The plain collective: Lightning's
    ``all_gather`` goes through torch's deprecated differentiable one, which warns on every checkpoint."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return parts
