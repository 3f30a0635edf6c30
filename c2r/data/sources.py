"""Shard sources: what produces a shard directory. Every source has a ``shard_dir`` and an ``ensure()`` that
creates the shards if they are missing and returns the folder.

A cached source (:class:`CachedShards`) lives under ``cache_dir/<folder>/<name>``, the name ending in the content
key of every setting that changes the shards (:meth:`CachedShards.params`; settings that change speed only are
left out), so two settings never share a directory and one setting never writes twice. The same settings are
recorded in the manifest's ``source``.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from c2r.data.shards import MANIFEST_NAME, Manifest
from c2r.storage import atomic_path, content_key


@runtime_checkable
class ShardSource(Protocol):
    """Anything that can produce a shard directory: ``ensure()`` creates it if missing (idempotent)."""

    @property
    def shard_dir(self) -> Path: ...

    def ensure(self) -> Path: ...


class ExistingShards:
    """Shard source for a directory written earlier (by ``python -m c2r.harvest`` or a ShardWriter)."""

    def __init__(self, path: str | Path):
        self._path = Path(path).expanduser()

    @property
    def shard_dir(self) -> Path:
        return self._path

    def ensure(self) -> Path:
        """Only validates: raises a clear error naming how to create the shards when they are absent."""
        Manifest.load(self._path)
        return self._path

    def __repr__(self) -> str:
        return f"ExistingShards({str(self._path)!r})"


class CachedShards(ABC):
    """A shard source cached at ``cache_dir/<folder>/<directory_name()>`` under the content key of its settings.

    A subclass says which settings change the shards (:meth:`params`), how it writes them (:meth:`ensure`) and
    what its ``repr`` shows (:meth:`repr_settings`); it may prefix the key with readable words
    (:meth:`directory_name`).
    """

    folder: ClassVar[str]
    cache_dir: Path

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Every setting that changes the shards' content: hashed into the key, recorded in the manifest."""

    @abstractmethod
    def ensure(self) -> Path:
        """Write the shards unless a complete copy is cached; return the directory."""

    @abstractmethod
    def repr_settings(self) -> dict[str, Any]:
        """The settings ``repr`` shows, in order."""

    @property
    def key(self) -> str:
        """The content key of :meth:`params` (16 hex digits)."""
        return content_key(self.params())

    def directory_name(self) -> str:
        return self.key

    @property
    def shard_dir(self) -> Path:
        return self.cache_dir / self.folder / self.directory_name()

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self.repr_settings().items())
        return f"{type(self).__name__}({args})"


def generate_once(target: Path, write: Callable[[Path], object]) -> Path:
    """Return the shard directory ``target``, first running ``write(tmp)`` into a temporary sibling and renaming
    it into place unless a complete copy (one with a manifest) is already there.

    Concurrent or interrupted runs never expose a partial directory: the rename is atomic, a concurrent winner's
    copy is kept, and a directory without a manifest (damaged) is rebuilt.
    """
    target = Path(target)
    if not (target / MANIFEST_NAME).is_file():
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            write(tmp)
    Manifest.load(target)
    return target
