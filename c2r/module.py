"""The LightningModule: an SAE, its named loss terms and the regularizers, on batches of activation tensors.

It knows nothing about language models or shards (that is the data side): a batch is a ``[B, d]`` tensor of
normalised activations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from c2r.console import ignore_library_warnings
from c2r.metrics import ReconstructionStats, batch_metrics
from c2r.regularizers import Regularizer
from c2r.sae import SAEOutput, SparseAutoencoder
from c2r.sae.base import LossTerms
from c2r.step import adam, loss_terms, total_loss

ignore_library_warnings()


class SAEModule(L.LightningModule):
    """Trains ``sae`` on ``Σ weight · loss`` over the SAE's own terms (MSE, AuxK, ...) and the regularizers.

    Every term is logged raw as ``losses/<name>`` and weighted as ``losses/<name>_weighted``.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        regularizers: Mapping[str, Regularizer] | None = None,
        *,
        lr: float = 4e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        decay_fraction: float = 0.2,
        total_steps: int = 1000,
    ) -> None:
        super().__init__()
        self.check_optim(lr=lr, decay_fraction=decay_fraction)
        self.sae = sae
        self.regularizers = nn.ModuleDict(dict(regularizers or {}))
        self.lr = lr
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.decay_fraction = decay_fraction
        self.total_steps = total_steps
        self.val_stats = ReconstructionStats()
        self.val_firing_counts: Tensor | None = None
        self.val_firing_frequency: Tensor | None = None  # [F], over the last validation pass (all ranks)
        self.latest_terms: LossTerms = {}
        # Checkpointed with the weights (also the only progress a ddp_spawn run hands back to its parent).
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # Seconds of training over all launches (checkpointed, so a resumed run's wall time is cumulative). Each
        # launch counts from ``launch_time``, which the entrypoint sets to its start (data preparation included).
        self.register_buffer("wall_time_s", torch.zeros((), dtype=torch.float64))
        self.launch_time = time.time()
        self._wall_time_before_launch = 0.0

    @staticmethod
    def check_optim(*, lr: float, decay_fraction: float = 0.2, **_: Any) -> None:
        """Refuse optimiser settings that cannot train (also called on the config before any data work)."""
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")

    def log_regularizer_metrics(self) -> None:
        """What regularizers report about themselves (e.g. C²R's neighbour staleness), as
        ``details/<name>/<metric>``."""
        for name, regularizer in self.regularizers.items():
            for metric, value in regularizer.metrics.items():
                self.log(f"details/{name}/{metric}", value)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the SAE stopped counting its own steps (the trainer's step is the one
        # counter) carry that counter; drop it so they still resume.
        checkpoint["state_dict"].pop("sae.training_steps", None)

    def on_train_start(self) -> None:
        self._wall_time_before_launch = float(self.wall_time_s)  # restored from the checkpoint when resuming

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor | dict[str, Tensor]]:
        """The loss, plus every raw term for callbacks (the non-finite guard) as ``outputs["terms"]``."""
        self.wall_time_s.fill_(self._wall_time_before_launch + time.time() - self.launch_time)
        terms, out = loss_terms(self.sae, self.regularizers, batch, self.global_step)
        loss = total_loss(terms)
        fired = self.trainer.strategy.reduce((out.firing_counts() > 0).float(), reduce_op="sum") > 0
        global_batch = batch.shape[0] * self.trainer.world_size
        self.sae.update_firing(fired, global_batch)
        self.tokens_seen += global_batch
        # Each term's latest value: a scheduled term (C²R every interval-th step) logs its last value on the
        # logging steps that skip it.
        self.latest_terms.update({name: (value.detach(), weight) for name, (value, weight) in terms.items()})
        if self.writes_logs():
            self.log_step(batch, loss, out)
        return {"loss": loss, "terms": {name: value.detach() for name, (value, _) in terms.items()}}

    def writes_logs(self) -> bool:
        """Whether the logger writes this training step (Lightning's rule: every ``log_every_n_steps``-th step,
        or when the trainer stops early). Only then is anything logged: each ``self.log`` costs host time, and a Python number a
        host-to-device copy, which waits for the GPU."""
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0 or self.trainer.should_stop

    def log_step(self, batch: Tensor, loss: Tensor, out: SAEOutput) -> None:
        """Every term raw and weighted, the batch's metrics (this rank's rows: an all-reduce per logged step
        would cost more than it says; validation gives the all-rank values), dead latents and the schedule."""
        for name, (value, weight) in self.latest_terms.items():
            self.log(f"losses/{name}", value)
            self.log(f"losses/{name}_weighted", weight * value)
        self.log("losses/overall_loss", loss, prog_bar=True)
        self.log_regularizer_metrics()
        self.log("details/n_training_tokens", self.tokens_seen.float())
        metrics = batch_metrics(batch, out.recon, out.codes)
        self.log("metrics/l0", metrics["l0"], prog_bar=True)
        self.log("metrics/explained_variance", metrics["explained_variance"], prog_bar=True)
        dead = self.sae.dead_mask()
        self.log("sparsity/dead_features", dead.sum().float())
        self.log("sparsity/dead_fraction", dead.float().mean())
        self.log("details/lr", self.optimizers().param_groups[0]["lr"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.remove_parallel_gradient()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (the checkpoint) run before the module's batch-end hook and
        # must see the renormalised decoder, or a resumed run would start from different weights.
        self.sae.normalize_decoder()

    def on_validation_epoch_start(self) -> None:
        self.val_stats = ReconstructionStats()
        self.val_firing_counts = None

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        out = self.sae.forward_pass(batch)  # the trained form: no step, so k annealing is over
        self.val_stats.update(batch, out.recon, out.codes)
        fired = out.firing_counts()
        self.val_firing_counts = fired if self.val_firing_counts is None else self.val_firing_counts + fired

    def on_validation_epoch_end(self) -> None:
        if self.val_stats.sums is None:
            return
        sums = self.trainer.strategy.reduce(self.val_stats.sums, reduce_op="sum")
        for name, value in ReconstructionStats.compute(sums).items():
            self.log(f"val/{name}", value.float(), sync_dist=False, rank_zero_only=False)
        counts = self.trainer.strategy.reduce(self.val_firing_counts.double(), reduce_op="sum")
        self.val_firing_frequency = counts / sums[0]

    def configure_optimizers(self):
        optimizer = adam(self.sae, self.lr, self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the last
        ``decay_fraction`` of ``total_steps``."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        decay_steps = int(self.decay_fraction * self.total_steps)
        if decay_steps == 0:
            return warmup
        remaining = self.total_steps - step
        return warmup * min(1.0, max(0.0, remaining / decay_steps))
