"""A harvest split over processes (``python -m c2r.harvest parts=N part=i``): part ``i`` writes shards ``i, i+N,
i+2N, ...`` of the very shard set one process writes, into the same folder; the last part to finish (or
``finalize=true``) writes the manifest. The union is byte for byte the single-process harvest, so the cache key is
the same and a training run afterwards finds the shards.

**Where each shard begins.** Shard ``k`` holds rows ``[k·R, (k+1)·R)`` of the harvest's row stream (before its
permutation). Without an outlier rule, which rows a batch of contexts keeps depends on its tokens alone, so every
part plans where every shard begins by tokenising the text (:func:`plan_shards`, no forward pass), then runs the
model only on the batches its own shards need (a batch that straddles two shards is run by both parts). With
``outlier_norm`` the rows a batch keeps depend on its activations, so no part could know where its shards begin
without running the model on everything before them: a split harvest refuses it (docs/design.md §3).

**Bookkeeping.** Each part records its finished shards' manifest entries in ``harvest_part_<i>_of_<N>.json``
(replaced atomically after each shard), so a killed part resumes on rerun and redoes at most the shard it was
writing. Parts write disjoint files; a part's own lock stops the same part running twice at once. The manifest is
written once, under the harvest's lock, after checking that every part is complete; then the part files go.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from c2r.data.activations import HarvestError, batched
from c2r.data.harvest import LOCK_NAME, HarvestedShards, log_waiting
from c2r.data.harvest_progress import fresh_counts
from c2r.data.lm import LanguageModel, hook_activations
from c2r.data.shards import (
    MANIFEST_NAME, Manifest, ShardEntry, build_manifest, shard_name, stored_arrays, tokens_name, write_shard,
)
from c2r.storage import TMP_SUFFIX, atomic_write_text, exclusive_lock, free_bytes


log = logging.getLogger(__name__)


class PartsIncomplete(HarvestError):
    """The manifest of a split harvest cannot be written yet: some parts have not finished."""


def part_name(part: int, parts: int) -> str:
    """The progress file of part ``part`` of ``parts``."""
    return f"harvest_part_{part}_of_{parts}.json"


def check_split(source: Any, parts: Any, part: Any, finalize: bool) -> None:
    """Refuse ``parts`` / ``part`` / ``finalize`` values that do not name one share of a split harvest, saying what
    to set instead; refuse sources a split harvest cannot write."""
    if not _whole(parts) or parts < 1:
        raise HarvestError(f"parts={parts!r}: the number of processes sharing the harvest, a whole number >= 1")
    if parts == 1:
        if part is not None or finalize:
            raise HarvestError(
                f"{'finalize=true' if finalize else f'part={part!r}'} needs parts=N > 1 (a harvest split over N "
                "processes, e.g. parts=4 part=0); drop it to harvest in one process"
            )
        return
    if finalize and part is not None:
        raise HarvestError(f"finalize=true writes the manifest of all {parts} parts: drop part={part!r}")
    if not finalize and (not _whole(part) or not 0 <= part < parts):
        raise HarvestError(
            f"part={part!r}: with parts={parts}, part is this process's share, one of 0..{parts - 1} "
            f"(e.g. parts={parts} part=0), or finalize=true to write the manifest once all parts are done"
        )
    if not isinstance(source, HarvestedShards):
        raise HarvestError(
            f"parts={parts}: only a language-model harvest is split over processes; {type(source).__name__} is "
            "written by one process: drop parts="
        )
    if source.outlier_norm is not None:
        raise HarvestError(
            f"parts={parts} with data.source.outlier_norm={source.outlier_norm}: which rows the outlier rule drops "
            "depends on the model's activations, so a part cannot know where its shards begin without running the "
            "model on everything before them. Harvest in one process (drop parts=), or set "
            "data.source.outlier_norm=null (other shards: train with the same setting)"
        )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ShardPlan:
    """Where every shard of a harvest begins, and what the harvest counts, from its tokens alone."""

    starts: list[tuple[int, int]]  # shard k's first row: (its batch, rows of that batch before it)
    rows: int  # rows the harvest keeps
    counts: dict[str, int]  # the manifest's counters, as a single-process harvest counts them

    def shard_rows(self, k: int, rows_per_shard: int) -> int:
        return min(rows_per_shard, self.rows - k * rows_per_shard)


def plan_shards(source: HarvestedShards, lm: LanguageModel) -> ShardPlan:
    """Walk the harvest's batches as one process does, keeping ``min(rows kept, tokens left)`` rows of each, and
    note the batch and offset where each shard begins (only without ``outlier_norm``: rows from tokens alone)."""
    special_ids = source.dropped_token_ids(lm.tokenizer)
    rows_per_shard, counts, starts, kept = source.rows_per_shard, fresh_counts(), [], 0
    for index, batch in enumerate(batched(source.contexts(lm), source.batch_size)):
        keep = source.keep_mask(torch.from_numpy(np.stack(batch)), None, special_ids, counts)
        taken = min(int(keep.sum()), source.tokens - kept)
        first, end = -(-kept // rows_per_shard), -(-(kept + taken) // rows_per_shard)
        starts.extend((index, k * rows_per_shard - kept) for k in range(first, end))
        kept += taken
        if kept >= source.tokens:
            break
    if len(starts) <= source.val_shards:
        raise HarvestError(
            f"cannot split the harvest into {source.shard_dir}: the text gives {kept} rows, {len(starts)} shard(s) of "
            f"{rows_per_shard}, not enough for {source.val_shards} validation shard(s) plus a training shard: use more "
            "text (data.text.*) or lower data.source.tokens / rows_per_shard / val_shards"
        )
    if kept < source.tokens:
        log.warning(f"the text ran out after {kept} of tokens={source.tokens} rows; the shards hold what there was")
    return ShardPlan(starts, kept, counts)


def harvest_part(
    source: HarvestedShards, part: int, parts: int, model: LanguageModel | None = None
) -> Manifest | None:
    """Write part ``part`` of ``parts`` (resuming it); returns the manifest if this part was the last to finish,
    else ``None`` (the manifest is written by the last part, or by :func:`finalize_parts`)."""
    check_split(source, parts, part, finalize=False)
    target = source.shard_dir
    target.mkdir(parents=True, exist_ok=True)
    lock = target / f".harvest_part_{part}_of_{parts}.lock"
    with exclusive_lock(lock, on_busy=log_waiting(f"running part {part} of {parts}")):
        if (target / MANIFEST_NAME).is_file():
            return source.load_manifest()
        _write_part(source, target, part, parts, model)
    try:
        return finalize_parts(source, parts)
    except PartsIncomplete as waiting_for:
        log.info(f"part {part} of {parts} is complete; {waiting_for}")
        return None


def _write_part(source: HarvestedShards, target: Path, part: int, parts: int, lm: LanguageModel | None) -> None:
    started = time.time()
    lm = source.load_model() if lm is None else lm
    source.check_model(lm)
    plan = plan_shards(source, lm)
    record = _read_part(target, source.key, part, parts) or {
        "key": source.key, "part": part, "parts": parts, "complete": False, "seconds": 0.0, "entries": {},
        "d": hook_activations(lm, torch.zeros(1, 2, dtype=torch.long), source.hook).shape[-1],
        "shards": len(plan.starts), "rows": plan.rows, "counts": plan.counts, "special_tokens": source.dropped_tokens(lm.tokenizer),
    }
    todo = [k for k in range(part, len(plan.starts), parts) if not _done(target, record, k)]
    _remove_own_temp_files(target, todo)
    need = sum(plan.shard_rows(k, source.rows_per_shard) for k in todo) * (
        record["d"] * np.dtype(source.dtype).itemsize + 4
    )
    if need > free_bytes(target):
        raise HarvestError(
            f"not enough disk space in {target}: part {part} of {parts} needs about {need / 1e9:.2f} GB and "
            f"{free_bytes(target) / 1e9:.2f} GB are free. Free some space or set cache_dir= to a larger disk"
        )
    if len(todo) < len(range(part, len(plan.starts), parts)):
        log.info(f"resuming part {part} of {parts} in {target}: {len(todo)} of its shards left")
    for k, (acts, ids) in zip(todo, _shard_rows(source, lm, plan, todo)):
        acts, ids = stored_arrays(acts, ids, source.dtype)
        entry = write_shard(target, k, acts, ids, seed=source.seed, shuffle=source.shuffle)
        record["entries"][str(k)] = dataclasses.asdict(entry)
        record["seconds"] += time.time() - started
        started = time.time()
        _save_part(target, record)
    record["complete"] = True
    _save_part(target, record)


def _shard_rows(
    source: HarvestedShards, lm: LanguageModel, plan: ShardPlan, shards: list[int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows (activations, token ids) of each of ``shards`` (increasing), in row-stream order; only the batches
    they need go through the model."""
    special_ids = source.dropped_token_ids(lm.tokenizer)
    batches = enumerate(batched(source.contexts(lm), source.batch_size))
    current: tuple[int, tuple[np.ndarray, np.ndarray] | None] = (-1, None)
    for k in shards:
        batch, offset = plan.starts[k]
        need = plan.shard_rows(k, source.rows_per_shard)
        acts, ids = [], []
        while need:
            while current[0] < batch:
                index, contexts = next(batches)
                rows = None
                if index == batch:
                    rows = tuple(t.cpu().numpy() for t in source.activation_rows(lm, contexts, special_ids))
                current = (index, rows)
            batch_acts, batch_ids = current[1]
            acts.append(batch_acts[offset : offset + need])
            ids.append(batch_ids[offset : offset + need])
            need -= len(acts[-1])
            batch, offset = batch + 1, 0
        yield np.concatenate(acts), np.concatenate(ids)


def _done(target: Path, record: dict[str, Any], k: int) -> bool:
    """Whether shard ``k`` is recorded as written and its file is there (a shard renamed into place but not yet
    recorded is written again: same bytes)."""
    return str(k) in record["entries"] and (target / shard_name(k)).is_file()


def _remove_own_temp_files(target: Path, shards: list[int]) -> None:
    """Delete what a killed run of this part left half-written; other parts' temporaries are theirs."""
    prefixes = tuple(f".{name(k)}." for k in shards for name in (shard_name, tokens_name))
    for path in target.iterdir():
        if path.name.startswith(prefixes) and path.name.endswith(TMP_SUFFIX):
            path.unlink(missing_ok=True)


def _save_part(target: Path, record: dict[str, Any]) -> None:
    atomic_write_text(target / part_name(record["part"], record["parts"]), json.dumps(record, indent=2))


def _read_part(target: Path, key: str, part: int, parts: int) -> dict[str, Any] | None:
    """A part's record if it belongs to these shards (``key``), else ``None``."""
    path = target / part_name(part, parts)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def finalize_parts(source: HarvestedShards, parts: int) -> Manifest:
    """Write the manifest of a split harvest once every part is complete (once, atomically, under the harvest's
    lock); raises :class:`PartsIncomplete` naming the parts still to run otherwise."""
    target = source.shard_dir
    target.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target / LOCK_NAME, on_busy=log_waiting(f"writing {target}")):
        if (target / MANIFEST_NAME).is_file():
            return source.load_manifest()
        records = [_read_part(target, source.key, p, parts) for p in range(parts)]
        missing = [p for p, record in enumerate(records) if not (record and record["complete"])]
        if missing:
            runs = "; ".join(f"python -m c2r.harvest parts={parts} part={p}" for p in missing)
            raise PartsIncomplete(
                f"the split harvest into {target} is not complete: part(s) {', '.join(map(str, missing))} of "
                f"{parts} have not finished. Run them with the same data settings ({runs}); the last part to finish "
                f"writes the manifest (or run python -m c2r.harvest parts={parts} finalize=true afterwards)"
            )
        first = records[0]
        entries = {int(k): ShardEntry(**entry) for record in records for k, entry in record["entries"].items()}
        lost = [
            shard_name(k) for k in range(first["shards"]) if k not in entries or not (target / shard_name(k)).is_file()
        ]
        if lost:
            raise HarvestError(
                f"cannot finish the split harvest into {target}: {', '.join(lost[:5])} (of {len(lost)} shard(s)) are "
                f"recorded by no part or missing on disk. Rerun the parts (parts={parts} part=0 ... part={parts - 1}): "
                "each writes its missing shards again"
            )
        manifest = build_manifest(
            [entries[k] for k in range(first["shards"])], d=first["d"], dtype=source.dtype,
            rows_per_shard=source.rows_per_shard, val_shards=source.val_shards,
            source=source.provenance(
                first["d"], first["special_tokens"], first["counts"], first["rows"],
                sum(record["seconds"] for record in records),
            ),
        )
        manifest.save(target)
        for p in range(parts):
            (target / part_name(p, parts)).unlink(missing_ok=True)
    log.info(f"harvested {first['rows']} rows into {target} in {parts} parts")
    return manifest
