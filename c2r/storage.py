"""How c2r stores what it computes: files and folders replaced atomically, cache folders named by a content key of
their settings, and one process at a time in a folder (:func:`exclusive_lock`).

Every file or folder c2r writes for later (shards, manifests, checkpoints, configs, metrics, caches) goes through
:func:`atomic_path` (or :func:`atomic_write`, built on it), so a reader sees the old version or the complete new
one, never half of a file, even when the writer is killed. Temporary names start with ``.`` and end with
:data:`TMP_SUFFIX`, so leftovers of a killed writer are recognisable (:func:`c2r.data.shards.remove_temp_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar


TMP_SUFFIX = ".tmp"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (same directory, so renaming it over ``path`` is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for the caller to create (a file or a folder); once the block
    succeeds, rename it over ``path``, and delete it if the block fails.

    A folder that another process renamed into place first is kept (it was complete when renamed) and ours is
    dropped, so concurrent writers of the same cache folder both end up with one complete copy.
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        try:
            os.replace(temporary, path)
        except OSError:
            if not (temporary.is_dir() and path.is_dir()):
                raise
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], T]) -> T:
    """Write a file through ``write(binary file)`` under a temporary name, fsync it and rename it over ``path``;
    returns what ``write`` returns."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
    return result


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically; returns ``path``."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return Path(path)


def free_bytes(path: str | Path) -> float:
    """Free space on the disk holding ``path``, in bytes (NaN where it cannot be read)."""
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        return float("nan")


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); silently skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Content keys
# --------------------------------------------------------------------------------------------------


def digest(chunks: Iterable[bytes], length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``chunks`` joined: a short name that changes with them."""
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()[:length]


def content_key(settings: Mapping[str, Any], length: int = 16) -> str:
    """The cache key of ``settings`` (JSON, keys sorted): equal settings share a cache, different ones never do."""
    return digest([json.dumps(settings, sort_keys=True).encode("utf-8")], length)


# --------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------


@contextmanager
def exclusive_lock(path: str | Path, on_busy: Callable[[str], object]) -> Iterator[None]:
    """Hold an exclusive POSIX ``flock`` on the file ``path`` (created if missing; it holds the owner's PID), released
    when the block ends or the process dies, however it dies.

    When another process holds it, ``on_busy(owner PID)`` is called first: to refuse, raise from it; if it returns,
    this waits for the lock. A no-op where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            on_busy(handle.read().strip() or "unknown")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
