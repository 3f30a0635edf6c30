"""Where an interrupted harvest restarts: ``harvest_progress.json``, written right after each shard is renamed into
place, records the batch the next unwritten row comes from and how many of that batch's rows are already stored.

A restarted harvest re-creates the context stream (cheap), skips the batches before that one without running the
model, and drops the rows already stored, so it writes exactly the bytes an uninterrupted harvest would have. If
the progress file is older than the shards (a crash between the two renames) or missing, the rows the shards hold
beyond it are recomputed and dropped: slower, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from c2r.storage import atomic_write_text

PROGRESS_NAME = "harvest_progress.json"


def fresh_counts() -> dict[str, int]:
    """The harvest's counters before its first batch (the manifest's ``contexts``, ``dropped``, ...)."""
    return {"contexts": 0, "tokens_forwarded": 0, "dropped_special": 0, "dropped_outlier": 0}


def write_progress(target: Path, key: str, rows: int, batch: int, kept_before: int, counts: dict) -> None:
    """Record that ``rows`` rows are stored and the next one comes from batch ``batch``, before which the harvest
    kept ``kept_before`` rows; ``counts`` are the counters before that batch."""
    record = {
        "key": key, "rows": rows, "batch": batch, "offset": rows - kept_before,
        "kept_before": kept_before, "counts": counts,
    }
    atomic_write_text(target / PROGRESS_NAME, json.dumps(record, indent=2))


def read_progress(target: Path, key: str, rows_on_disk: int) -> dict[str, Any]:
    """Where to restart: the progress file if it belongs to these shards (``key``), else the very beginning."""
    fresh = {"rows": 0, "batch": 0, "offset": 0, "kept_before": 0, "counts": fresh_counts()}
    path = target / PROGRESS_NAME
    if not rows_on_disk or not path.is_file():
        return fresh
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        usable = record["key"] == key and 0 <= record["rows"] <= rows_on_disk
    except (ValueError, KeyError, TypeError):
        usable = False
    return record if usable else fresh
