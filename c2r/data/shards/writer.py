"""Writing a shard directory: rows buffered into shuffled shards, each renamed into place once complete, the
manifest last; an interrupted write is resumed from the complete shards it left."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from c2r.data.shards.files import (
    list_complete_shards,
    remove_temp_files,
    sha256_file,
    shard_name,
    shard_stats,
    tokens_name,
    write_npy,
)
from c2r.data.shards.manifest import MANIFEST_NAME, SUPPORTED_DTYPES, Manifest, ShardEntry, normalization_factor


def check_shard_split(
    rows: int, rows_per_shard: int, val_shards: int, *, rows_key: str = "rows", error: type[ValueError] = ValueError
) -> None:
    """Refuse a shard layout that leaves no training shard: ``rows`` rows cut into shards of ``rows_per_shard``,
    the last ``val_shards`` held out. Every shard source checks its settings with this before any work;
    ``rows_key`` names the setting in the message, ``error`` is the source's own error type."""
    if rows_per_shard < 1 or val_shards < 0:
        raise error(f"need rows_per_shard >= 1 and val_shards >= 0, got {rows_per_shard}, {val_shards}")
    if rows <= val_shards * rows_per_shard:
        raise error(
            f"{rows_key}={rows} rows fill at most {max(0, math.ceil(rows / rows_per_shard))} shard(s) of "
            f"rows_per_shard={rows_per_shard}, not enough for {val_shards} validation shard(s) plus a training "
            f"shard: raise {rows_key} to at least {(val_shards + 1) * rows_per_shard} or lower rows_per_shard"
        )


def stored_arrays(
    acts: np.ndarray, token_ids: np.ndarray | None, dtype: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ``[n, d]`` in the storage ``dtype`` and their token ids as int32, as shards store them; refuses values
    that are or become non-finite and ids outside int32."""
    if not np.isfinite(acts).all():
        bad = np.flatnonzero(~np.isfinite(acts).all(axis=1))[:5].tolist()
        raise ValueError(
            f"activations contain NaN or inf (rows {bad} of this call); fix the source model/hook "
            "before writing shards"
        )
    with np.errstate(over="ignore"):  # overflow is reported below, with a fix
        out = acts.astype(dtype)
    if not np.isfinite(out).all():
        limit = float(np.finfo(dtype).max)
        raise ValueError(
            f"activations overflow {dtype} (largest |value| {float(np.abs(acts).max()):.4g} > "
            f"{limit:.4g}); write the shards with dtype='float32'"
        )
    if token_ids is None:
        return out, None
    tokens = np.asarray(token_ids)
    if tokens.shape != (acts.shape[0],):
        raise ValueError(f"token_ids must have shape [{acts.shape[0]}] (one per row), got {list(tokens.shape)}")
    limits = np.iinfo(np.int32)
    if tokens.size and (tokens.min() < limits.min or tokens.max() > limits.max):
        raise ValueError("token_ids do not fit in int32")
    return out, tokens.astype(np.int32)


def write_shard(
    directory: Path, index: int, acts: np.ndarray, tokens: np.ndarray | None, *, seed: int, shuffle: bool = True
) -> ShardEntry:
    """Write shard ``index`` (and its token file) into ``directory``, rows permuted by a generator seeded with
    ``(seed, index)`` unless ``shuffle=False``; returns its manifest entry (split ``train``). The permutation depends
    on the index alone, so any process writing shard ``index`` from the same rows writes the same bytes."""
    if shuffle:
        perm = np.random.default_rng([seed, index]).permutation(len(acts))
        acts = acts[perm]
        tokens = None if tokens is None else tokens[perm]
    tokens_file = tokens_sha = None
    if tokens is not None:
        # Token file first: a shard file on disk then always has its token file next to it.
        tokens_file = tokens_name(index)
        tokens_sha = write_npy(directory / tokens_file, tokens)
    sha = write_npy(directory / shard_name(index), acts)
    mean_sq_norm, max_abs = shard_stats(acts)
    return ShardEntry(
        file=shard_name(index),
        rows=len(acts),
        sha256=sha,
        split="train",
        mean_sq_norm=mean_sq_norm,
        tokens_file=tokens_file,
        tokens_sha256=tokens_sha,
        max_abs=max_abs,
    )


def build_manifest(
    entries: list[ShardEntry], *, d: int, dtype: str, rows_per_shard: int, val_shards: int, source: dict[str, Any]
) -> Manifest:
    """The manifest of the shards ``entries`` (in order): the last ``val_shards`` held out, the normalisation factor
    from the others. Refuses a layout without a training shard."""
    n = len(entries)
    if n == 0:
        raise ValueError("no rows were added; nothing to finalize")
    if val_shards >= n:
        raise ValueError(
            f"{n} shard(s) written and val_shards={val_shards} would leave no training shard; "
            f"add more rows (rows_per_shard={rows_per_shard}) or lower val_shards"
        )
    for i, entry in enumerate(entries):
        entry.split = "val" if i >= n - val_shards else "train"
    return Manifest(
        d=d,
        dtype=dtype,
        rows_per_shard=rows_per_shard,
        shards=list(entries),
        normalization_factor=normalization_factor([e for e in entries if e.split == "train"]),
        source=source,
    )


class ShardWriter:
    """Buffers activation rows and writes them as shuffled, atomically renamed shards.

    Each full shard's rows are permuted with a generator seeded by ``(seed, shard index)`` so rows
    from many contexts are mixed; token ids get the same permutation. The permutation depends only on
    the shard index, so a resumed harvest writes exactly the bytes an uninterrupted one would have.
    ``shuffle=False`` keeps rows in order (for sources whose rows are already independent).

    With ``resume=True`` complete shards already in ``directory`` are adopted: ``rows_written`` tells
    the caller how many input rows to skip before calling :meth:`add` again.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        d: int,
        rows_per_shard: int,
        dtype: str = "float32",
        seed: int = 0,
        source: dict[str, Any] | None = None,
        shuffle: bool = True,
        resume: bool = False,
    ):
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if d < 1 or rows_per_shard < 1:
            raise ValueError(f"d and rows_per_shard must be >= 1, got d={d}, rows_per_shard={rows_per_shard}")
        self.directory = Path(directory)
        self.d = int(d)
        self.rows_per_shard = int(rows_per_shard)
        self.dtype = dtype
        self.seed = int(seed)
        self.source = dict(source or {})
        self.shuffle = shuffle
        self._entries: list[ShardEntry] = []
        self._buffer: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._buffered_rows = 0
        self._with_tokens: bool | None = None
        self._finalized = False

        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{self.directory} already holds a complete shard set ({MANIFEST_NAME} exists); "
                "use it as is, or delete the directory to write new shards"
            )
        remove_temp_files(self.directory)
        existing = list_complete_shards(self.directory)
        if existing and not resume:
            raise FileExistsError(
                f"{self.directory} already contains {len(existing)} shard(s) from an earlier, "
                "unfinished write; pass resume=True to continue it, or delete the directory"
            )
        for index, path in enumerate(existing):
            self._entries.append(self._adopt(index, path))

    @property
    def rows_written(self) -> int:
        """Rows already stored in shard files (not counting rows still buffered)."""
        return sum(e.rows for e in self._entries)

    @property
    def shards_written(self) -> int:
        return len(self._entries)

    def _adopt(self, index: int, path: Path) -> ShardEntry:
        """Rebuild the manifest entry of a shard left by an interrupted run."""
        acts = np.load(path, mmap_mode="r")
        if acts.shape != (self.rows_per_shard, self.d) or acts.dtype != np.dtype(self.dtype):
            raise ValueError(
                f"cannot resume: {path} has shape {acts.shape} and dtype {acts.dtype}, expected "
                f"({self.rows_per_shard}, {self.d}) and {self.dtype}; the earlier run used other "
                "settings: delete the directory or use the same settings"
            )
        tokens_path = self.directory / tokens_name(index)
        with_tokens = tokens_path.is_file()
        if self._with_tokens is not None and with_tokens != self._with_tokens:
            raise ValueError(
                f"cannot resume {self.directory}: some shards have token files and some do not; "
                "delete the directory and harvest again"
            )
        self._with_tokens = with_tokens
        mean_sq_norm, max_abs = shard_stats(acts)
        return ShardEntry(
            file=path.name,
            rows=acts.shape[0],
            sha256=sha256_file(path),
            split="train",
            mean_sq_norm=mean_sq_norm,
            tokens_file=tokens_path.name if with_tokens else None,
            tokens_sha256=sha256_file(tokens_path) if with_tokens else None,
            max_abs=max_abs,
        )

    def add(self, acts: np.ndarray, token_ids: np.ndarray | None = None) -> None:
        """Buffer ``acts`` ``[n, d]`` (and their ``token_ids`` ``[n]``); write every full shard."""
        if self._finalized:
            raise RuntimeError("ShardWriter.add called after finalize(); create a new writer")
        acts = np.asarray(acts)
        if acts.ndim != 2 or acts.shape[1] != self.d:
            raise ValueError(f"acts must have shape [n, {self.d}], got {list(acts.shape)}")
        with_tokens = token_ids is not None
        if self._with_tokens is None:
            self._with_tokens = with_tokens
        elif with_tokens != self._with_tokens:
            raise ValueError(
                "pass token_ids either on every add() call or on none (the shards of one directory "
                "either all have token files or none do)"
            )
        self._buffer.append(stored_arrays(acts, token_ids, self.dtype))
        self._buffered_rows += acts.shape[0]
        if self._buffered_rows >= self.rows_per_shard:
            self._write_full_shards()

    def _write_full_shards(self) -> None:
        acts = np.concatenate([a for a, _ in self._buffer])
        tokens = np.concatenate([t for _, t in self._buffer]) if self._with_tokens else None
        full = (len(acts) // self.rows_per_shard) * self.rows_per_shard
        for start in range(0, full, self.rows_per_shard):
            stop = start + self.rows_per_shard
            self._write_shard(acts[start:stop], None if tokens is None else tokens[start:stop])
        rest_tokens = None if tokens is None else tokens[full:]
        self._buffer = [(acts[full:], rest_tokens)] if full < len(acts) else []
        self._buffered_rows = len(acts) - full

    def _write_shard(self, acts: np.ndarray, tokens: np.ndarray | None) -> None:
        index = len(self._entries)
        self._entries.append(write_shard(self.directory, index, acts, tokens, seed=self.seed, shuffle=self.shuffle))

    def finalize(self, val_shards: int = 1) -> Manifest:
        """Write the remaining rows as a last (smaller) shard, mark the last ``val_shards`` shards
        as validation, and write the manifest (last, atomically)."""
        if self._finalized:
            raise RuntimeError("ShardWriter.finalize called twice")
        if val_shards < 0:
            raise ValueError(f"val_shards must be >= 0, got {val_shards}")
        if self._buffered_rows:
            acts = np.concatenate([a for a, _ in self._buffer])
            tokens = np.concatenate([t for _, t in self._buffer]) if self._with_tokens else None
            self._write_shard(acts, tokens)
            self._buffer, self._buffered_rows = [], 0
        manifest = build_manifest(
            self._entries, d=self.d, dtype=self.dtype, rows_per_shard=self.rows_per_shard, val_shards=val_shards,
            source=self.source,
        )
        manifest.save(self.directory)
        self._finalized = True
        return manifest
