"""What every penalty on (latent activations, decoder rows) shares: a scheduled weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from c2r.sae.base import SparseCodes
from c2r.schedule import Schedule


class Regularizer(nn.Module):
    """A penalty added to the SAE loss as ``weight(step) * forward(acts, decoder_rows)``.

    The weight follows a :class:`~c2r.schedule.Schedule` (the paper's): the term is computed only on steps
    ``t >= start_step`` with ``(t - start_step) % interval == 0`` and multiplied by ``interval`` there, so its
    average strength over many steps is ``coef`` while its cost is paid on one step in ``interval``. The weight is
    named ``coef`` (not ``lambda``) so that Hydra can pass it as a keyword argument.
    """

    def __init__(self, coef: float, start_step: int = 0, interval: int = 1) -> None:
        super().__init__()
        self.schedule = Schedule(float(coef), start_step=int(start_step), interval=int(interval))
        # Diagnostics of the last call (e.g. C²R's neighbour staleness), logged as details/<name>/<key>.
        self.metrics: dict[str, torch.Tensor] = {}

    def weight(self, step: int) -> float:
        """The multiplier of the raw term at ``step``; 0.0 means: skip computing it."""
        return self.schedule.weight(step)

    def forward(self, acts: Tensor | SparseCodes, decoder_rows: Tensor, step: int) -> Tensor:  # pragma: no cover
        """The raw (unweighted) scalar penalty for the post-sparsity codes (dense ``[B, F]``, or their non-zero
        entries as :class:`~c2r.sae.SparseCodes` where the SAE selects them) and ``decoder_rows [F, d]``."""
        raise NotImplementedError
