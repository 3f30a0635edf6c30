"""``python -m c2r.harvest``: create the activation shards of the selected ``data`` option, or verify shards.

The same ``data`` config group as ``python -m c2r.train``: ``python -m c2r.harvest`` harvests exactly the
shards a training run with the same ``data`` settings would use (and finds them cached later). An interrupted
harvest resumes when the command is run again. ``verify=true`` (the selected data's directory) or
``verify=<dir>`` re-checks every file's size and sha256 and exits with status 1 if any is damaged.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from c2r.data.shards import Manifest, verify

log = logging.getLogger(__name__)


def verify_directory(directory: str | Path) -> list[str]:
    """Problems with a shard directory, one line each: an unreadable manifest, then every listed file's
    presence, shape and dtype (from the ``.npy`` header), then its sha256. An empty list means it is intact."""
    try:
        manifest = Manifest.load(directory, check_files=False)
    except (OSError, ValueError) as err:
        return [str(err)]
    problems, unreadable = [], set()
    for entry in manifest.shards:
        files = [(entry.file, (entry.rows, manifest.d), manifest.dtype)]
        if entry.tokens_file is not None:
            files.append((entry.tokens_file, (entry.rows,), "int32"))
        for file, shape, dtype in files:
            path = manifest.path(file)
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                problems.append(f"{path}: missing or not a readable .npy file ({err})")
                unreadable.add(file)
                continue
            if array.shape != shape or array.dtype != np.dtype(dtype):
                problems.append(
                    f"{path}: shape {array.shape} and dtype {array.dtype}, the manifest says {shape} and {dtype}"
                )
    problems += [f"{manifest.path(p.split(':')[0])}: {p.split(': ', 1)[1]}" for p in verify(directory)
                 if p.split(":")[0] not in unreadable]
    return problems


def harvest(cfg: DictConfig) -> Path:
    """Create (or find) the shards of ``cfg.data``; returns their directory."""
    source = instantiate(cfg.data.source)
    directory = source.ensure()
    manifest = Manifest.load(directory)
    provenance = manifest.source
    log.info(
        f"shards ready: {directory}\n  {manifest.train_rows} training + {manifest.val_rows} validation rows of "
        f"d={manifest.d} ({manifest.dtype}) in {len(manifest.shards)} shards"
        + (f"; {provenance['model']} {provenance['hook']} on {provenance['dataset']}" if "hook" in provenance else "")
    )
    return directory


@hydra.main(version_base="1.3", config_path="pkg://c2r.conf", config_name="harvest")
def main(cfg: DictConfig) -> None:
    if cfg.verify is None or cfg.verify is False:
        print(harvest(cfg))
        return
    directory = Path(instantiate(cfg.data.source).shard_dir if cfg.verify is True else str(cfg.verify)).expanduser()
    problems = verify_directory(directory)
    if problems:
        print(f"{directory}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), file=sys.stderr)
        print("Delete the directory and harvest again (same settings: python -m c2r.harvest).", file=sys.stderr)
        sys.exit(1)
    manifest = Manifest.load(directory)
    print(f"{directory}: OK ({len(manifest.shards)} shards, {manifest.train_rows + manifest.val_rows} rows, "
          "sizes and sha256 checksums match the manifest)")


if __name__ == "__main__":
    main()
