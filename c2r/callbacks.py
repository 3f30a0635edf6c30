"""Lightning callbacks for what a dashboard or a log shows beyond the losses: throughput, latent histograms, the
progress bar and plain progress lines."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
import wandb
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from c2r.metrics import decoder_max_cosines

log = logging.getLogger(__name__)

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


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting optimiser steps up to ``max_steps``. c2r trains one endless epoch that
    stops at ``max_steps``, so the epoch number Lightning's bars show ("Epoch 0", "Epoch 0/-2") says nothing.

    Build it with ``refresh_rate`` = the trainer's ``log_every_n_steps``: each refresh turns the logged values into
    Python numbers (a device-to-host read that waits for the GPU), so it refreshes on the steps that log anyway."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step  # a resumed run counts on from where it stopped
        bar.set_description("steps")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning's bar shows batch_idx + 1 (batches of this launch); show the global step instead.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)


class ProgressLog(L.Callback):
    """A plain progress line through the ``logging`` module every ``every`` steps, for logs without a terminal
    (nohup, Slurm), where a progress bar shows only its last frame:

    ``step 120/256 (47%) | tokens 245,760 | loss 0.0312 | L0 32.0 | FVU 0.081 | 8,200 tok/s | ETA 0:00:17``

    Reads the training batch's logged values, so it syncs the device only on its own steps.
    """

    def __init__(self, every: int, total_steps: int) -> None:
        self.every = max(1, int(every))
        self.total_steps = total_steps
        self._since: tuple[float, int, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = (time.perf_counter(), trainer.global_step, int(pl_module.tokens_seen))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._since is None or (step % self.every and step != self.total_steps) or not trainer.is_global_zero:
            return
        now, tokens = time.perf_counter(), int(pl_module.tokens_seen)
        started, first_step, first_tokens = self._since
        elapsed = max(now - started, 1e-9)
        rate = (tokens - first_tokens) / elapsed
        eta = (self.total_steps - step) * elapsed / max(step - first_step, 1)
        metrics = trainer.callback_metrics
        parts = [
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)",
            f"tokens {tokens:,}",
            f"loss {float(outputs['loss']):.4g}",
            f"L0 {_value(metrics, 'metrics/l0'):.3g}",
            f"FVU {1 - _value(metrics, 'metrics/explained_variance'):.3g}",
            f"{rate:,.0f} tok/s",
            f"ETA {_duration(eta)}",
        ]
        log.info(" | ".join(parts))


def _value(metrics: dict[str, torch.Tensor], name: str) -> float:
    return float(metrics[name]) if name in metrics else float("nan")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class DataWaitFraction(L.Callback):
    """``details/data_wait_fraction``: the share of each logging interval's step time spent between batches,
    which is where Lightning fetches the next batch (a streamed run waiting on its LM shows up here). Logged on
    logging steps only; no device sync. Validation passes between two steps are not counted as waiting."""

    def __init__(self) -> None:
        self._batch_start = 0.0
        self._batch_end: float | None = None
        self._waited = self._total = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._waited += now - self._batch_end
            self._total += now - self._batch_end
        self._batch_start = now

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_end = time.perf_counter()
        self._total += self._batch_end - self._batch_start
        if trainer.global_step % trainer.log_every_n_steps == 0 and self._total > 0:
            pl_module.log("details/data_wait_fraction", self._waited / self._total)
            self._waited = self._total = 0.0
