"""Metrics shared by training and evaluation: reconstruction metrics accumulated as exact sums, so a value over
many batches (and ranks) equals the value over their concatenation (everything stays a tensor on the device: no
host sync on the training path), and each latent's decoder cosine to its nearest other latent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from c2r.geometry import nearest_neighbors_exact
from c2r.sae.base import SparseCodes


class ReconstructionStats:
    """Running sums for MSE, L0 and the standard fraction of variance unexplained,
    FVU = E‖x − x̂‖² / E‖x − E[x]‖² (explained variance = 1 − FVU).

    The sums live in one float64 vector ``[rows, Σ‖x‖², Σ‖x − x̂‖², Σ L0, Σx (d entries)]`` so that a DDP
    all-reduce of ``sums`` combines ranks exactly.
    """

    def __init__(self) -> None:
        self.sums: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor, recon: Tensor, acts: Tensor | SparseCodes) -> None:
        """Add a batch: inputs, reconstructions and the codes (dense, or their entries)."""
        active = (acts.values if isinstance(acts, SparseCodes) else acts).count_nonzero()
        x, recon = x.double(), recon.double()
        batch = torch.cat(
            [
                torch.stack(
                    [
                        x.new_full((), x.shape[0]),  # a fill kernel: no host-to-device copy
                        x.pow(2).sum(),
                        (x - recon).pow(2).sum(),
                        active.double(),
                    ]
                ),
                x.sum(dim=0),
            ]
        )
        self.sums = batch if self.sums is None else self.sums + batch

    @staticmethod
    def compute(sums: Tensor) -> dict[str, Tensor]:
        """Metrics from ``sums`` (possibly summed over ranks)."""
        rows, sum_sq_norm, sum_sq_error, sum_l0 = sums[:4]
        total_variance = sum_sq_norm - sums[4:].pow(2).sum() / rows
        fvu = sum_sq_error / total_variance
        return {"mse": sum_sq_error / rows, "fvu": fvu, "explained_variance": 1 - fvu, "l0": sum_l0 / rows}


def batch_metrics(x: Tensor, recon: Tensor, acts: Tensor | SparseCodes) -> dict[str, Tensor]:
    """The same metrics on one batch."""
    stats = ReconstructionStats()
    stats.update(x, recon, acts)
    return ReconstructionStats.compute(stats.sums)


def decoder_max_cosines(decoder_rows: Tensor, *, tile_size: int = 4096) -> Tensor:
    """``c_j = max_{k≠j} cos(W_j, W_k)`` for every row (``[F]`` float64); NaN when F == 1 (no other row)."""
    rows = decoder_rows.detach().double()
    if rows.shape[0] < 2:
        return torch.full((rows.shape[0],), float("nan"), dtype=torch.float64)
    neighbors = nearest_neighbors_exact(rows, tile_size=tile_size)
    unit = F.normalize(rows, dim=1)
    return (unit * unit[neighbors]).sum(dim=1)
