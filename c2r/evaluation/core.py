"""Core SAE metrics: reconstruction, sparsity, latent usage and decoder geometry.

Over the N evaluated rows ``x`` with codes ``f = encode(x)`` (``[N, F]``) and reconstructions ``x̂ = decode(f)``:

- ``fvu`` = E‖x − x̂‖² / E‖x − E[x]‖² (the standard fraction of variance unexplained, exact sums over all rows,
  :class:`c2r.metrics.ReconstructionStats`); ``explained_variance`` = 1 − fvu;
- ``mse`` = E‖x − x̂‖² (squared error summed over the d dimensions, averaged over rows) in the units of the rows
  evaluated (raw activations for an exported SAE); ``mse_normalized`` = the same in the training normalisation
  (E‖x‖² = 1 over training rows), i.e. ``mse · s²`` with the manifest's normalisation factor ``s``: comparable
  with ``val/mse`` of training;
- ``cosine`` = mean over rows with x ≠ 0 of cos(x, x̂) (0 for a row where x̂ = 0);
- ``shrinkage`` = mean over rows with x ≠ 0 of ‖x̂‖ / ‖x‖ (1 = no shrinkage; SAEBench's ``l2_ratio``);
- ``l0`` = mean number of non-zero codes per row;
- latent usage: latent j's firing frequency ``ν_j`` = share of rows with ``f_j ≠ 0``; ``dead_fraction`` = share
  of latents with ``ν_j ≤ dead_threshold`` (default 0: never fired on the evaluated rows); ``dense_fraction`` =
  share with ``ν_j > dense_threshold`` (default 0.1);
- decoder geometry: each latent's largest cosine to another latent's decoder row,
  ``c_j = max_{k≠j} cos(W_dec[j], W_dec[k])`` over all F latents (dead ones included, as in C²R), found with the
  tiled exact search of C²R (never an F×F matrix); its mean, histogram and the share of latents above each of
  ``cos_thresholds``.

The CE-loss score and KL score (downstream loss with the SAE spliced into the LM) need the language model: they
are the ``ce_loss`` evaluation (:mod:`c2r.evaluation.ce_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from c2r.evaluation.base import EvalContext, histogram
from c2r.evaluation.data import RowBatch
from c2r.metrics import ReconstructionStats, decoder_max_cosines


class CoreEval:
    """Streaming accumulator of the core metrics (see the module docstring for the definitions)."""

    name = "core"

    def __init__(
        self,
        ctx: EvalContext,
        *,
        dead_threshold: float = 0.0,
        dense_threshold: float = 0.1,
        cos_thresholds: tuple[float, ...] = (0.7, 0.9),
        histogram_bins: int = 40,
        tile_size: int = 4096,
    ) -> None:
        if not 0 <= dead_threshold < 1 or not 0 <= dense_threshold < 1:
            raise ValueError(
                f"dead_threshold and dense_threshold are firing frequencies in [0, 1), got {dead_threshold}, "
                f"{dense_threshold}"
            )
        self.ctx = ctx
        self.dead_threshold = float(dead_threshold)
        self.dense_threshold = float(dense_threshold)
        self.cos_thresholds = tuple(float(t) for t in cos_thresholds)
        self.histogram_bins = int(histogram_bins)
        self.tile_size = int(tile_size)
        self.stats = ReconstructionStats()
        self.sum_cosine = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.sum_shrinkage = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.nonzero_rows = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.fired = torch.zeros(ctx.sae.W_dec.shape[0], dtype=torch.float64, device=ctx.device)

    @torch.no_grad()
    def update(self, batch: RowBatch, acts: Tensor, recon: Tensor) -> None:
        x = batch.x
        self.stats.update(x, recon, acts)
        x, recon = x.double(), recon.double()
        x_norm, recon_norm = x.norm(dim=1), recon.norm(dim=1)
        nonzero = x_norm > 0
        cosine = (x * recon).sum(dim=1) / (x_norm * recon_norm).clamp_min(1e-30)
        self.sum_cosine += cosine[nonzero].sum()
        self.sum_shrinkage += (recon_norm[nonzero] / x_norm[nonzero]).sum()
        self.nonzero_rows += nonzero.sum()
        self.fired += (acts != 0).sum(dim=0).double()

    def firing_frequencies(self) -> Tensor:
        rows = float(self.stats.sums[0]) if self.stats.sums is not None else 0.0
        return (self.fired / max(rows, 1.0)).cpu()

    def finalize(self) -> dict:
        if self.stats.sums is None:
            raise ValueError("no rows were evaluated")
        recon = {name: float(value) for name, value in ReconstructionStats.compute(self.stats.sums).items()}
        rows = float(self.stats.sums[0])
        scale = self.ctx.rows.manifest.normalization_factor
        frequencies = self.firing_frequencies()
        max_cos = decoder_max_cosines(self.ctx.sae.W_dec, tile_size=self.tile_size).cpu()
        defined = max_cos[~max_cos.isnan()]
        result = {
            "fvu": recon["fvu"],
            "explained_variance": recon["explained_variance"],
            "mse": recon["mse"],
            "mse_normalized": recon["mse"] * scale**2,
            "cosine": float(self.sum_cosine) / max(float(self.nonzero_rows), 1.0),
            "shrinkage": float(self.sum_shrinkage) / max(float(self.nonzero_rows), 1.0),
            "l0": recon["l0"],
            "dead_fraction": float((frequencies <= self.dead_threshold).double().mean()),
            "dense_fraction": float((frequencies > self.dense_threshold).double().mean()),
            "dead_latents": int((frequencies <= self.dead_threshold).sum()),
            "dense_latents": int((frequencies > self.dense_threshold).sum()),
            "decoder_max_cos_mean": float(defined.mean()) if defined.numel() else None,
            "decoder_max_cos_above": {str(t): float((defined > t).double().mean()) for t in self.cos_thresholds},
            "decoder_max_cos_histogram": histogram(defined, self.histogram_bins, -1.0, 1.0),
            "firing_frequency_log10_histogram": histogram(
                frequencies.clamp_min(1e-9).log10(), self.histogram_bins, -9.0, 0.0
            ),
            "settings": {
                "dead_threshold": self.dead_threshold,
                "dense_threshold": self.dense_threshold,
                "rows": int(rows),
                "latents": int(frequencies.numel()),
            },
        }
        if self.ctx.plot_dir is not None:
            from c2r.evaluation.plots import plot_core

            result["plots"] = [str(p.name) for p in plot_core(self.ctx.plot_dir, max_cos, frequencies, result)]
        return result
