"""Generated data cached in a directory that appears all at once or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from c2r.data.shards import Manifest


def generate_once(target: Path, write: Callable[[Path], object]) -> Path:
    """Return the shard directory ``target``, first running ``write(tmp)`` into a temporary sibling and renaming
    it into place unless a complete copy (one with a manifest) is already there.

    Concurrent or interrupted runs never expose a partial directory: the rename is atomic, a concurrent winner's
    copy is kept, and a directory without a manifest (damaged) is rebuilt.
    """
    target = Path(target)
    if (target / "manifest.json").is_file():
        Manifest.load(target)
        return target
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    Manifest.load(target)
    return target
