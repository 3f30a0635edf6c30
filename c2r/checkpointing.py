"""Checkpoints that survive being killed at any moment: written atomically, the one before kept as a fallback,
always one at the end, and one preemption mechanism on clusters."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from c2r.errors import UserError
from c2r.storage import atomic_path

log = logging.getLogger(__name__)


class CheckpointDamaged(UserError, RuntimeError):
    """The checkpoint to resume from cannot be read and there is none to fall back to."""


def previous_of(path: Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``previous.ckpt`` beside ``last.ckpt``."""
    return path.with_name(f"previous{path.suffix}")


def is_readable(path: Path) -> bool:
    """Cheap completeness test without loading: a checkpoint is a zip archive, whose directory is at its end,
    so a truncated or empty file fails here."""
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary name beside it and renames it into place, so a job killed while
    saving (SIGKILL, preemption, node failure) leaves the previous checkpoint intact, never a truncated one. The
    file it replaces is kept as :func:`previous_of` (hard-linked first, so some complete checkpoint exists at
    every moment): the fallback if the new one is damaged later (a full disk, a copy gone wrong)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        with atomic_path(path) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options)
            if is_readable(path):
                with atomic_path(previous_of(path)) as kept:
                    os.link(path, kept)


class FinalAndPeriodicCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and once more when training ends, so the last
    checkpoint always holds the final weights whatever the step count."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(enable_version_counter=False, **kwargs)  # never last-v1.ckpt beside last.ckpt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)  # a full checkpoint, as the periodic ones

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def resume_path(self) -> Path | None:
        """The checkpoint a relaunch resumes from: ``last.ckpt``; if it is damaged, the one before it (the damaged
        file is moved aside as ``last.ckpt.damaged``); ``None`` for a fresh start."""
        last = self.last_path
        if not last.exists() or is_readable(last):
            return last if last.exists() else None
        previous = previous_of(last)
        if not is_readable(previous):
            raise CheckpointDamaged(
                f"{last} is damaged (truncated or empty) and there is no earlier checkpoint to fall back to: "
                "delete it to restart this run from the beginning"
            )
        damaged = last.with_name(f"{last.name}.damaged")
        os.replace(last, damaged)
        log.warning(f"{last} is damaged (truncated or empty; moved to {damaged.name}): resuming from {previous}")
        return previous


def training_plugins() -> list:
    """Lightning plugins for every run: atomic checkpoints, and on Slurm the cluster environment with Lightning's
    auto-requeue off — submitit (hardware=slurm_*) already requeues a preempted job, which then resumes from its
    last checkpoint; two requeue mechanisms would race."""
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins
