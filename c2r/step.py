"""One training step of an SAE with its regularizers, shared by the LightningModule, the benchmarks and tests.

``loss_terms`` is the objective (forward, every named term with its weight at the step); ``total_loss`` its
backward-ready sum; ``apply_gradients`` the update after ``backward`` for plain loops (``SAEModule`` runs the same
two decoder-norm calls from Lightning's optimizer hooks, so precision plugins and gradient clipping keep working);
``train_step`` all of it, with the firing record, for plain loops; ``adam`` the optimiser they all use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from c2r.regularizers import Regularizer
from c2r.sae import SAEOutput, SparseAutoencoder
from c2r.sae.base import LossTerms


def loss_terms(
    sae: SparseAutoencoder, regularizers: Mapping[str, Regularizer], x: Tensor, step: int
) -> tuple[LossTerms, SAEOutput]:
    """All loss terms at training ``step`` as ``name -> (raw, weight)``, and the forward pass they came from;
    scheduled regularizers appear only on the steps where their weight is non-zero."""
    out = sae.forward_pass(x, step)
    terms = sae.losses(x, out, step)
    for name, regularizer in regularizers.items():
        if name in terms:
            raise ValueError(
                f"a regularizer is named {name!r} like one of the SAE's own loss terms {sorted(terms)}: give it "
                "another name (each term is logged as losses/<name>)"
            )
        weight = regularizer.weight(step)
        if weight:
            terms[name] = (regularizer(out.codes, sae.W_dec, step), weight)
    return terms, out


def adam(sae: SparseAutoencoder, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Training's Adam: the fused kernel (one pass over each tensor; ~9× faster than the per-tensor loop on one
    CPU thread at 2 × 16384 × 576 weights, also on CUDA)."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=True)


def total_loss(terms: LossTerms) -> Tensor:
    """``Σ weight · raw``: the loss to call ``backward`` on."""
    return sum(weight * value for value, weight in terms.values())


def apply_gradients(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> None:
    """After ``backward``: drop the decoder rows' radial gradient, step, put the rows back on the unit sphere."""
    sae.remove_parallel_gradient()
    optimizer.step()
    sae.normalize_decoder()


def train_step(
    sae: SparseAutoencoder,
    regularizers: Mapping[str, Regularizer],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    step: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> LossTerms:
    """One whole training step for plain loops (benchmarks): forward and losses under ``autocast()``, backward,
    the update, and the firing record that AuxK's dead latents come from. Returns the terms."""
    with autocast():
        terms, out = loss_terms(sae, regularizers, x, step)
        loss = total_loss(terms)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    apply_gradients(sae, optimizer)
    sae.update_firing(out.firing_counts() > 0, x.shape[0])
    return terms
