"""Harvesting: a language model's activations at one hook, over packed text, written as activation shards.

:class:`HarvestedShards` is a shard source (``shard_dir`` + ``ensure()``), so ``python -m c2r.train`` harvests
on first use and ``python -m c2r.harvest`` can do it ahead of time. The directory is
``cache_dir/activations/<model>_<hook>_<key>``, ``key`` being a hash of every setting that changes the shards'
content (:meth:`HarvestedShards.params`), so two settings never share a cache and one setting never harvests
twice. Settings that only change speed (``device``, ``batch_size``, ``progress``) are not part of it.

The rows are :mod:`c2r.data.activations`' (text → contexts → forward pass → dropped rows); ``ShardWriter`` writes
them (rows permuted within each shard, token ids alongside, the last ``val_shards`` shards held out, every file
renamed into place once complete, the manifest last), and an interrupted harvest resumes where
:mod:`c2r.data.harvest_progress` says.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from c2r.data.activations import ActivationRecipe, HarvestError, batched
from c2r.data.harvest_progress import PROGRESS_NAME, read_progress, write_progress
from c2r.data.lm import LanguageModel, hook_activations, model_identity
from c2r.data.shards import MANIFEST_NAME, Manifest, ShardWriter
from c2r.data.sources import CachedShards
from c2r.storage import exclusive_lock, free_bytes

__all__ = ["HARVEST_VERSION", "PROGRESS_NAME", "HarvestError", "HarvestedShards"]

log = logging.getLogger(__name__)

# Bump when the same settings would produce different shards (tokenising, packing, dropping, writing).
HARVEST_VERSION = 1
LOCK_NAME = ".harvest.lock"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def log_waiting(what: str) -> Callable[[str], None]:
    """A lock's ``on_busy`` that says why nothing happens yet, then waits: concurrent harvests of one directory (DDP
    ranks, two jobs) take turns, and the second then finds the finished shards."""
    return lambda owner: log.info(f"another process (PID {owner}) is {what}; waiting for it")


class HarvestedShards(ActivationRecipe, CachedShards):
    """Shard source: activations of ``model`` at ``hook`` over ``text``, harvested once and cached. The settings
    are :class:`~c2r.data.activations.ActivationRecipe`'s."""

    folder = "activations"
    _params: dict[str, Any] | None = None  # set on first use: see params()
    _needed_bytes = 0  # known once the model is loaded (the hook's width)

    # ---- identity ----------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Every setting that changes the shards' content: the cache key (also stored in the manifest).
        Computed once per source (it stats the text files), so the directory cannot move under a running job."""
        if self._params is None:
            self._params = self._content_settings()
        return self._params

    def _content_settings(self) -> dict[str, Any]:
        return {
            "kind": "lm",
            "harvest_version": HARVEST_VERSION,
            "model": model_identity(self.model, self.model_revision),
            "model_dtype": self.model_dtype,
            "hook": self.hook,
            "text": self.text.identity(),
            "context_length": self.context_length,
            "context_start": self.context_start,
            "doc_separator": self.doc_separator,
            "tokens": self.tokens,
            "dtype": self.dtype,
            "rows_per_shard": self.rows_per_shard,
            "val_shards": self.val_shards,
            "drop_special": self.drop_special,
            "outlier_norm": self.outlier_norm,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
        }

    def directory_name(self) -> str:
        return f"{_slug(self.model)}_{_slug(self.hook)}_{self.key}"

    # ---- shard source protocol ---------------------------------------------------------------------
    def ensure(self) -> Path:
        """Harvest unless a complete copy is cached (resuming an interrupted one); return the directory."""
        target = self.shard_dir
        if not (target / MANIFEST_NAME).is_file():
            self.harvest()
        return self.load_manifest().directory

    def load_manifest(self) -> Manifest:
        """The cached shards' manifest, their files checked (a damaged cache says how to get it back)."""
        target = self.shard_dir
        try:
            return Manifest.load(target)
        except (OSError, ValueError) as err:
            raise HarvestError(f"the cached shards in {target} are damaged: {err}") from err

    # ---- harvesting --------------------------------------------------------------------------------
    def harvest(self, model: LanguageModel | None = None) -> Manifest:
        """Write (or finish writing) the shard directory; returns its manifest.

        ``model``: an already loaded :class:`~c2r.data.lm.LanguageModel` of the same name (saves loading it
        again, e.g. in a notebook or a benchmark); by default the model is loaded here.
        """
        target = self.shard_dir
        target.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(target / LOCK_NAME, on_busy=log_waiting(f"harvesting into {target}")):
            if (target / MANIFEST_NAME).is_file():  # another process finished it while we waited
                return self.load_manifest()
            try:
                return self._harvest(target, model)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise HarvestError(
                        f"disk full while writing shards to {target} ({free_bytes(target) / 1e9:.2f} GB free; the "
                        f"harvest needs about {self._needed_bytes / 1e9:.2f} GB in all). The complete shards are "
                        "kept and no partial file is left: free some space (or set cache_dir= to a larger "
                        "disk) and rerun the same command to resume"
                    ) from err
                raise

    def _harvest(self, target: Path, lm: LanguageModel | None) -> Manifest:
        started = time.time()
        lm = self.load_model() if lm is None else lm
        self.check_model(lm)
        special = self.dropped_tokens(lm.tokenizer)
        special_ids = self.dropped_token_ids(lm.tokenizer)
        d = hook_activations(lm, torch.zeros(1, 2, dtype=torch.long), self.hook).shape[-1]
        need = self._needed_bytes = self.tokens * (d * np.dtype(self.dtype).itemsize + 4)
        writer = ShardWriter(
            target, d=d, rows_per_shard=self.rows_per_shard, dtype=self.dtype, seed=self.seed, resume=True,
            shuffle=self.shuffle,
        )
        free = free_bytes(target)
        if need - writer.rows_written * d * np.dtype(self.dtype).itemsize > free:
            raise HarvestError(
                f"not enough disk space in {target.parent}: the shards need about {need / 1e9:.2f} GB and "
                f"{free / 1e9:.2f} GB are free. Free some space, set cache_dir= to a larger disk or lower tokens"
                + (", or use dtype=float16 (half the size)" if self.dtype != "float16" else "")
            )
        progress = read_progress(target, self.key, writer.rows_written)
        start_batch = progress["batch"]
        skip = progress["offset"] + writer.rows_written - progress["rows"]
        counts = dict(progress["counts"])
        kept_before = progress["kept_before"]  # rows (written or skipped) before the current batch
        if writer.rows_written:
            log.info(f"resuming {target}: {writer.shards_written} shard(s), {writer.rows_written} rows on disk")

        bar = self._progress_bar(initial=writer.rows_written)
        batches = batched(self.contexts(lm), self.batch_size)
        try:
            for index, batch in enumerate(batches):
                if index < start_batch:
                    continue
                counts_before = dict(counts)
                rows, ids = self.activation_rows(lm, batch, special_ids, counts)
                rows, ids = rows.cpu().numpy(), ids.cpu().numpy()
                rows, ids = rows[: self.tokens - kept_before], ids[: self.tokens - kept_before]
                dropped_now = min(skip, len(rows))
                skip -= dropped_now
                shards_before = writer.shards_written
                writer.add(rows[dropped_now:], ids[dropped_now:])
                bar.update(len(rows) - dropped_now)
                if writer.shards_written > shards_before:
                    write_progress(target, self.key, writer.rows_written, index, kept_before, counts_before)
                kept_before += len(rows)
                if kept_before >= self.tokens:
                    break
            else:
                if kept_before < self.tokens:
                    log.warning(
                        f"the text ran out after {kept_before} of tokens={self.tokens} rows; the shards hold "
                        "what there was (use more text or lower tokens to silence this)"
                    )
        finally:
            bar.close()

        writer.source = self.provenance(d, special, counts, kept_before, time.time() - started)
        try:
            manifest = writer.finalize(val_shards=self.val_shards)
        except ValueError as err:
            raise HarvestError(
                f"cannot finish {target}: {err}. The text gave {kept_before} rows: use more text "
                "(data.text.*) or lower data.source.tokens / rows_per_shard / val_shards"
            ) from err
        (target / PROGRESS_NAME).unlink(missing_ok=True)
        log.info(f"harvested {kept_before} rows into {target} in {time.time() - started:.1f} s")
        return manifest

    # ---- reporting ---------------------------------------------------------------------------------
    def _progress_bar(self, initial: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.tokens, initial=initial, unit="tok", unit_scale=True, smoothing=0.1,
            desc=f"harvest {self.model} {self.hook}", disable=not self.show_progress,
        )

    def provenance(
        self, d: int, special: dict[str, int], counts: dict[str, int], rows: int, seconds: float
    ) -> dict[str, Any]:
        """The manifest's ``source``: provenance in readable form, plus the full key."""
        text = self.text.describe()
        return {
            "kind": "lm",
            "model": self.model,
            "hook": self.hook,
            "d": d,
            "dataset": text.get("dataset"),
            "split": text.get("split"),
            "text": text,
            "context_length": self.context_length,
            "context_start": self.context_start,
            "doc_separator": self.doc_separator,
            "rows": rows,
            "tokens_budget": self.tokens,
            "contexts": counts["contexts"],
            "tokens_forwarded": counts["tokens_forwarded"],
            "dropped": {
                "special_tokens": special,
                "special_rows": counts["dropped_special"],
                "outlier_norm": self.outlier_norm,
                "outlier_rows": counts["dropped_outlier"],
            },
            "model_dtype": self.model_dtype,
            "seed": self.seed,
            "seconds": round(seconds, 1),
            "key": self.key,
            "settings": self.params(),
        }

    def repr_settings(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "text": self.text, "key": self.key}
