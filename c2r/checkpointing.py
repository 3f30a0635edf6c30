"""Checkpoints that survive being killed at any moment: written atomically, always one at the end, and one
preemption mechanism on clusters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary name beside it and renames it into place, so a job killed while
    saving (SIGKILL, preemption, node failure) leaves the previous checkpoint intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        super().save_checkpoint(checkpoint, temporary, storage_options)
        os.replace(temporary, path)


class FinalAndPeriodicCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and once more when training ends, so the last
    checkpoint always holds the final weights whatever the step count."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.last_path)

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"


def training_plugins() -> list:
    """Lightning plugins for every run: atomic checkpoints, and on Slurm the cluster environment with Lightning's
    auto-requeue off — submitit (hardware=slurm_*) already requeues a preempted job, which then resumes from its
    last checkpoint; two requeue mechanisms would race."""
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins
