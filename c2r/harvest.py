"""``python -m c2r.harvest``: create the activation shards of the selected ``data`` option, or verify shards.

The same ``data`` config group as ``python -m c2r.train``: ``python -m c2r.harvest`` harvests exactly the
shards a training run with the same ``data`` settings would use (and finds them cached later). An interrupted
harvest resumes when the command is run again. ``verify=true`` (the selected data's directory) or
``verify=<dir>`` re-checks every file's shape, dtype and sha256 (:func:`c2r.data.shards.verify`) and exits with
status 1 if any is damaged, saying how to get the shards back for the source that wrote them.

``parts=N part=i`` harvests only part ``i`` of ``N`` (shards ``i, i+N, ...``, :mod:`c2r.data.harvest_parts`): N
processes or Slurm array tasks write one shard set together, byte for byte the single-process one; the last part
to finish writes the manifest, or ``parts=N finalize=true`` once all are done.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from c2r.data.shards import Manifest, recreate_hint, verify
from c2r.errors import UserError

log = logging.getLogger(__name__)


def harvest(cfg: DictConfig) -> Path:
    """Create (or find) the shards of ``cfg.data``, or this process's part of them (``parts``, ``part``,
    ``finalize``); returns their directory."""
    from c2r.data.harvest_parts import check_split, finalize_parts, harvest_part
    from c2r.data.modes import shard_source

    source = shard_source(cfg.data)  # data.mode=stream: the held-out set a streamed run needs
    parts, part, finalize = cfg.get("parts", 1), cfg.get("part"), bool(cfg.get("finalize", False))
    check_split(source, parts, part, finalize)
    if parts == 1:
        directory = source.ensure()
    elif finalize:
        directory = finalize_parts(source, parts).directory
    elif harvest_part(source, part, parts) is None:
        log.info(f"part {part} of {parts} written into {source.shard_dir}; the last part to finish writes the manifest")
        return source.shard_dir
    else:
        directory = source.shard_dir
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
        try:
            print(harvest(cfg))
        except UserError as error:  # a diagnosis, not a bug: one line, status 1
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
            sys.exit(1)
        return
    from c2r.data.modes import shard_source

    directory = Path(shard_source(cfg.data).shard_dir if cfg.verify is True else str(cfg.verify)).expanduser()
    problems = verify(directory)
    if problems:
        lines = "\n  ".join(problem.message for problem in problems)
        print(f"{directory}: {len(problems)} problem(s):\n  {lines}", file=sys.stderr)
        if problems[0].kind != "manifest":  # a manifest problem's message already says how to create the shards
            print(f"Fix: {recreate_hint(directory)}", file=sys.stderr)
        sys.exit(1)
    manifest = Manifest.load(directory)
    print(f"{directory}: OK ({len(manifest.shards)} shards, {manifest.train_rows + manifest.val_rows} rows, "
          "sizes and sha256 checksums match the manifest)")


if __name__ == "__main__":
    main()
