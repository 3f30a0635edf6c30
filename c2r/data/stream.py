"""Training rows streamed from the language model inside the training job (``data.mode=stream``), so a run at the
paper's scale needs no terabytes of shards.

Everything from text to rows is the harvest's (:class:`~c2r.data.harvest.HarvestedShards`, called the *recipe*
here): its context stream (text, packing, context shuffle), its batches of ``batch_size`` contexts and
:meth:`~c2r.data.activations.ActivationRecipe.activation_rows` (hook, dropped special tokens, outliers), so a streamed
row equals the row a harvest of the same settings writes.

**Which text trains.** The recipe's context stream is cut in three: the contexts of the held-out harvest (a
normalisation slice, then the validation shard; :func:`heldout_set`), ``reserve_contexts`` more (the CE-loss
evaluation reads the contexts right after the harvest), then the training contexts. Rank ``r`` of ``W`` takes
training contexts ``r, r+W, ...``, so no rank waits on another for data. When the text runs out the training
contexts start over (a warning says so: rows then repeat).

**The shuffle buffer.** A rank's rows, in order, are cut into windows of ``buffer_rows`` rows. Window ``j`` is
served as ``buffer_rows / block_rows`` blocks drawn without replacement in the random order
``stream_generator(seed, "data.stream", rank, j)``, so one block mixes rows of hundreds of contexts; the next
window is filled by a background thread while this one is served.

**Exact resume.** Step ``t`` reads block ``t mod n`` of window ``t div n`` (``n`` blocks per window), and a window
is a pure function of where it starts in the row stream: a :class:`StreamPosition` (the rank's batch of contexts
and how many of its rows earlier windows took). The DataModule checkpoints that position per rank
(:mod:`c2r.data.stream_datamodule`); a relaunch re-creates the context stream (tokenising only) up to that batch
and rebuilds the window, so it serves the very blocks an uninterrupted run would.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from c2r.data.activations import batched
from c2r.data.harvest import HarvestedShards
from c2r.data.lm import LanguageModel
from c2r.errors import UserError
from c2r.seeds import stream_generator

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class StreamError(UserError, ValueError):
    """Streaming settings that cannot work, with what is wrong and how to fix it."""


def heldout_set(recipe: HarvestedShards, rows: int) -> HarvestedShards:
    """The small harvest a streamed run validates and evaluates on: the first ``2 · rows`` rows of the recipe's
    stream, a training shard (only for the normalisation factor and the decoder-bias initialisation, never
    trained on) and then one validation shard of ``rows`` rows."""
    if rows < 1:
        raise StreamError(f"data.stream.heldout_rows must be >= 1, got {rows}")
    settings = {name: getattr(recipe, name) for name in (
        "model", "hook", "text", "context_length", "batch_size", "dtype", "model_dtype", "model_revision", "device",
        "context_start", "doc_separator", "drop_special", "outlier_norm", "shuffle", "shuffle_buffer", "seed",
        "cache_dir",
    )}
    return HarvestedShards(**settings, tokens=2 * rows, rows_per_shard=rows, val_shards=1,
                           progress=recipe.show_progress)


@dataclass(frozen=True)
class StreamPosition:
    """Where a window starts in a rank's row stream: its ``batch``-th batch of contexts, after the first
    ``offset`` rows of that batch (which earlier windows hold)."""

    batch: int = 0
    offset: int = 0


class _Stopped(Exception):
    """The consumer went away: the background fill ends early."""


class _RowCursor:
    """A rank's rows in order from a :class:`StreamPosition`; :meth:`take` returns the next ``n``."""

    def __init__(self, batches: Iterator[tuple[int, Tensor]], start: StreamPosition, stop: threading.Event):
        self._batches, self._stop = batches, stop
        self._index, self._rows, self._used = start.batch - 1, None, 0
        self._first_offset = start.offset

    def take(self, n: int) -> tuple[Tensor, StreamPosition]:
        """The next ``n`` rows and the position right after them."""
        parts = []
        while n:
            if self._rows is None or self._used == len(self._rows):
                if self._stop.is_set():
                    raise _Stopped
                self._index, self._rows = next(self._batches)
                self._used, self._first_offset = self._first_offset, 0
                continue
            part = self._rows[self._used : self._used + n]
            parts.append(part)
            self._used += len(part)
            n -= len(part)
        return torch.cat(parts), StreamPosition(self._index, self._used)


class ActivationStream:
    """One rank's endless stream of training blocks (see the module docstring).

    Args:
        recipe: the harvest settings whose rows are streamed.
        lm: the loaded model (on this rank's device).
        skip_contexts: contexts of the recipe's stream before the training ones (held-out set and reserve).
        buffer_rows: rows per window (the shuffle buffer); a multiple of ``block_rows``.
        block_rows: rows per block (this rank's batch).
        scale: the normalisation factor each served row is multiplied by.
        seed: the run's seed (the order within each window).
        rank, world_size: this rank's share of the training contexts.
    """

    def __init__(
        self,
        recipe: HarvestedShards,
        lm: LanguageModel,
        *,
        skip_contexts: int,
        buffer_rows: int,
        block_rows: int,
        scale: float,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if block_rows < 1 or buffer_rows < block_rows or buffer_rows % block_rows:
            raise StreamError(
                f"data.stream.buffer_rows={buffer_rows} must be a positive multiple of the {block_rows} rows each "
                f"rank reads per step (batch_size / devices), e.g. {max(1, buffer_rows // max(block_rows, 1)) * block_rows}"
            )
        recipe.check_model(lm)
        self.recipe, self.lm = recipe, lm
        self.skip_contexts, self.buffer_rows, self.block_rows = int(skip_contexts), int(buffer_rows), int(block_rows)
        self.scale, self.seed, self.rank, self.world_size = float(scale), int(seed), int(rank), int(world_size)
        self.dtype = STORAGE_DTYPES[recipe.dtype]
        self.window_starts: dict[int, StreamPosition] = {}
        self.passes = 0  # times the training text started over
        self._stop = threading.Event()

    @property
    def blocks_per_window(self) -> int:
        return self.buffer_rows // self.block_rows

    def window_of(self, step: int) -> int:
        return step // self.blocks_per_window

    def blocks(self, start_step: int = 0, start: StreamPosition = StreamPosition()) -> Iterator[Tensor]:
        """The blocks of steps ``start_step, start_step + 1, ...``; ``start`` is where the window of
        ``start_step`` begins (``StreamPosition()`` for a fresh run, the checkpointed one when resuming)."""
        window, first_block = divmod(start_step, self.blocks_per_window)
        self.window_starts = {window: start}
        self._stop = stop = threading.Event()
        cursor = _RowCursor(self._batches(start.batch), start, stop)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="c2r-stream")
        try:
            pending = pool.submit(self._fill, cursor, window)
            while True:
                rows = pending.result()
                pending = pool.submit(self._fill, cursor, window + 1)  # filled while this window is served
                order = torch.randperm(len(rows), generator=stream_generator(self.seed, "data.stream", self.rank, window))
                order = order.to(rows.device)
                for block in range(first_block, self.blocks_per_window):
                    picked = order[block * self.block_rows : (block + 1) * self.block_rows]
                    yield rows[picked].float().mul_(self.scale)
                window, first_block = window + 1, 0
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop filling (the background thread ends after its current forward pass): training is over."""
        self._stop.set()

    def _fill(self, cursor: _RowCursor, window: int) -> Tensor:
        try:
            rows, end = cursor.take(self.buffer_rows)
        except _Stopped:
            return torch.empty(0)
        self.window_starts[window + 1] = end
        return rows

    def _batches(self, first: int) -> Iterator[tuple[int, Tensor]]:
        """``(index, rows)`` of this rank's batches of contexts from batch ``first`` on; the ones before it are
        skipped without running the model."""
        special_ids = self.recipe.dropped_token_ids(self.lm.tokenizer)
        for index, contexts in enumerate(batched(self.training_contexts(), self.recipe.batch_size)):
            if index >= first:
                rows, _ = self.recipe.activation_rows(self.lm, contexts, special_ids)
                yield index, rows.to(self.dtype)

    def training_contexts(self) -> Iterator[np.ndarray]:
        """This rank's share of the training contexts, starting over when the text runs out."""
        for text_pass in itertools.count():
            found = 0
            contexts = itertools.islice(self.recipe.contexts(self.lm), self.skip_contexts, None)
            for index, context in enumerate(contexts):
                found += 1
                if index % self.world_size == self.rank:
                    yield context
            if found < self.world_size:
                raise StreamError(
                    f"the text holds no training contexts for {self.world_size} rank(s) after the "
                    f"{self.skip_contexts} held-out ones: use more text (data.text.*), or lower "
                    "data.stream.heldout_rows / reserve_contexts"
                )
            self.passes = text_pass + 1
            log.warning(
                f"rank {self.rank}: the training text ran out after {found} contexts; starting it over (pass "
                f"{self.passes + 1}: rows repeat). Use more text (data.text.*) for fresh rows throughout"
            )
