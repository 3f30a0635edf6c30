"""Lightning callbacks for what a dashboard shows beyond the losses: throughput and latent histograms."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger

from c2r.evaluation.core import decoder_max_cosines

MIN_FREQUENCY = 1e-7
"""Latents that never fired in the validation pass are drawn at log10 of this (left of every live latent)."""


class LatentHistograms(L.Callback):
    """After each validation pass, two histograms in W&B (the quantities splitting and C²R are about):

    - ``histograms/latent_density_log10``: log10 of each latent's firing frequency over the validation rows;
    - ``histograms/decoder_nn_cosine``: each latent's cosine to its nearest other decoder row (exact, tiled).

    Does nothing for other loggers (their scalars carry the same story through ``sparsity/*``).
    """

    def __init__(self, tile_size: int = 4096) -> None:
        self.tile_size = tile_size

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        frequency = getattr(pl_module, "val_firing_frequency", None)
        if not loggers or not trainer.is_global_zero or frequency is None or trainer.sanity_checking:
            return
        density = frequency.clamp_min(MIN_FREQUENCY).log10().cpu()
        with torch.no_grad():
            cosines = decoder_max_cosines(pl_module.sae.W_dec, tile_size=self.tile_size)
        panels = {
            "histograms/latent_density_log10": wandb.Histogram(density.numpy(), num_bins=64),
            "histograms/decoder_nn_cosine": wandb.Histogram(cosines.nan_to_num(0.0).numpy(), num_bins=64),
            "trainer/global_step": trainer.global_step,
        }
        for logger in loggers:
            logger.experiment.log(panels)


class TokensPerSecond(L.Callback):
    """``details/tokens_per_second``: training tokens (all ranks) per wall-clock second, data loading included,
    averaged over each logging interval. Measured only on logging steps, so the device is synchronised there
    and nowhere else (a per-step sync, as Lightning's ThroughputMonitor does, would slow the step it measures)."""

    def __init__(self) -> None:
        self._since: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = (time.perf_counter(), int(pl_module.tokens_seen))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._since is None or trainer.global_step % trainer.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now, tokens = time.perf_counter(), int(pl_module.tokens_seen)
        started, tokens_before = self._since
        if now > started and tokens > tokens_before:
            pl_module.log("details/tokens_per_second", (tokens - tokens_before) / (now - started))
        self._since = (now, tokens)
