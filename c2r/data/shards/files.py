"""The files of a shard directory: their names, writing a ``.npy`` file while hashing it, checksums and row
statistics, finding what an interrupted write left, and judging a listed file by its header."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from c2r.storage import TMP_SUFFIX, atomic_write

_SHARD_RE = re.compile(r"^shard_(\d{5})\.npy$")


def shard_name(index: int) -> str:
    """File name of shard ``index`` (zero-padded so that names sort in write order)."""
    return f"shard_{index:05d}.npy"


def tokens_name(index: int) -> str:
    """File name of the token ids that belong to shard ``index``."""
    return f"tokens_{index:05d}.npy"


class _HashingFile:
    """File wrapper that hashes bytes as they are written, so a shard is never read back to hash it."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.hash = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        return self._f.write(data)


def write_npy(path: Path, array: np.ndarray) -> str:
    """Atomically save ``array`` as ``.npy`` and return the sha256 of the file's bytes."""

    def write(f: IO[bytes]) -> str:
        hashing = _HashingFile(f)
        np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
        return hashing.hash.hexdigest()

    return atomic_write(path, write)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def shard_stats(acts: np.ndarray, chunk_rows: int = 4096) -> tuple[float, float]:
    """``(mean of ‖x‖² over rows, largest |value|)``, accumulated in float64 in chunks to bound memory."""
    total, max_abs = 0.0, 0.0
    for start in range(0, len(acts), chunk_rows):
        chunk = np.asarray(acts[start : start + chunk_rows], dtype=np.float64)
        total += float(np.einsum("ij,ij->", chunk, chunk))
        max_abs = max(max_abs, float(np.abs(chunk).max(initial=0.0)))
    return total / max(len(acts), 1), max_abs


def list_complete_shards(directory: str | Path) -> list[Path]:
    """Shard files ``shard_00000.npy, shard_00001.npy, ...`` present in ``directory``, in order.

    Shards are only ever renamed into place once fully written, so each listed file is complete;
    the list stops at the first gap in the numbering. Used to resume an interrupted harvest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    present = {int(m.group(1)) for p in directory.iterdir() if (m := _SHARD_RE.match(p.name))}
    shards = []
    while len(shards) in present:
        shards.append(directory / shard_name(len(shards)))
    return shards


def remove_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files left by writes that were interrupted before their rename."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


ProblemKind = Literal["manifest", "missing", "unreadable", "shape", "sha256"]


@dataclass(frozen=True)
class Problem:
    """One damaged part of a shard directory: ``kind`` is ``manifest`` (unreadable or invalid), ``missing``,
    ``unreadable`` (not a .npy file), ``shape`` (shape or dtype differ from the manifest) or ``sha256``. Callers
    branch on ``kind`` and show ``message``; nobody parses the message."""

    kind: ProblemKind
    file: Path
    message: str  # one line, naming the file

    def __str__(self) -> str:
        return self.message


def npy_problem(path: Path, shape: tuple[int, ...], dtype: str) -> Problem | None:
    """What is wrong with a listed ``.npy`` file judged by its header alone (cheap), or ``None``."""
    if not path.is_file():
        return Problem("missing", path, f"shard file {path} listed in the manifest is missing")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        return Problem("unreadable", path, f"shard file {path} is not a readable .npy file ({err})")
    if array.shape != shape or array.dtype != np.dtype(dtype):
        return Problem(
            "shape", path,
            f"shard file {path} has shape {array.shape} and dtype {array.dtype}, but the manifest says {shape} and "
            f"{dtype}",
        )
    return None
