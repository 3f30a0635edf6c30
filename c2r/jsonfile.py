"""JSON that every reader accepts: non-finite numbers become ``null`` (Python's ``json`` would write bare
``NaN``/``Infinity``, which is not JSON), and files are replaced atomically so a reader never sees half of one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from c2r.storage import atomic_write_text


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN/±inf float (at any depth of dicts, lists and tuples) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite numbers as ``null``."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` to ``path`` (indented, non-finite numbers as ``null``) atomically."""
    return atomic_write_text(path, dumps(value, indent=2))
