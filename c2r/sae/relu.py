"""The standard ReLU SAE with an L1 penalty weighted by decoder-row norms (Anthropic's "April update")."""

from __future__ import annotations

import torch
from torch import Tensor

from c2r.sae.base import LossTerms, SAEOutput, SparseAutoencoder
from c2r.schedule import Schedule


class ReLUSAE(SparseAutoencoder):
    """``f = ReLU(pre_acts)`` trained with ``mse + l1_coef · Σ_i f_i ‖W_dec,i‖`` (mean over rows).

    Decoder norms float (``unit_norm_decoder = False``). The L1 is weighted by each row's norm, so the penalty
    is the L1 of every latent's *contribution* ``f_i W_dec,i``: it is invariant to moving scale between a code
    and its row, so the optimiser cannot shrink it by shrinking codes and growing rows. That makes the
    unit-norm projection unnecessary, and dropping it lets Adam optimise an unconstrained problem (Anthropic
    reported fewer dead latents and better loss this way). Had we kept unit-norm rows, the weighting would be the
    identity (every ‖W_dec,i‖ = 1) and this would be the classic L1 SAE. Consequences: ``normalize_decoder`` and
    ``remove_parallel_gradient`` are no-ops; the codes are in the scale of their rows, so C²R's ``n_i`` (norms
    of codes) and the exported ``W_dec`` carry whatever norms training gave the rows (SAELens "standard"
    reads them as they are).

    Initialisation (as in that update): decoder rows in random directions with norm ``decoder_init_norm``,
    encoder = decoderᵀ, zero biases. The L1 weight ramps up linearly over ``l1_warmup_steps``. ``l1_coef``
    depends on the data's scale (here E‖x‖² = 1) and must be tuned to the L0 you want.
    """

    architecture = "relu"
    unit_norm_decoder = False

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        l1_coef: float = 0.3,
        l1_warmup_steps: int = 0,
        decoder_init_norm: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(d_in, dict_size, **kwargs)
        if decoder_init_norm <= 0:
            raise ValueError(f"decoder_init_norm must be > 0, got {decoder_init_norm}")
        self.l1 = Schedule(float(l1_coef), warmup_steps=int(l1_warmup_steps), key_prefix="l1_")
        with torch.no_grad():
            self.W_dec.mul_(decoder_init_norm)
            self.W_enc.mul_(decoder_init_norm)

    def activate(self, pre_acts: Tensor) -> Tensor:
        return pre_acts.relu()

    def extra_losses(self, x: Tensor, out: SAEOutput, step: int) -> LossTerms:
        l1 = (out.acts * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return {"l1": (l1, self.l1.weight(step))}

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        return "standard", self.encoder_decoder_tensors(), {}
