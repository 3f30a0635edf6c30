"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

Two encoder paths share ``W_enc``: the gate decides *which* latents fire, the magnitude path *how strongly*:

    h = (x − b_dec) W_enc
    π_gate = h + b_gate,   π_mag = h ⊙ exp(r_mag) + b_mag
    f = 1[π_gate > 0] ⊙ ReLU(π_mag)

(``h ⊙ exp(r_mag)`` equals ``(x − b_dec)(W_enc ⊙ exp(r_mag))``, the paper's per-latent rescaled encoder, with one
matmul.) The L1 penalty acts on ``ReLU(π_gate)``, which gets no gradient through the Heaviside; the auxiliary
loss ``‖x − (ReLU(π_gate) W_decᵀ + b_dec)‖²`` with the decoder *detached* gives the gate path the reconstruction
signal it needs. Decoder rows stay unit-norm, so the L1 needs no norm weighting.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from c2r.sae.base import LossTerms, SAEOutput, SparseAutoencoder, mse
from c2r.schedule import Schedule


class GatedSAE(SparseAutoencoder):
    """Gated SAE; ``b_enc`` is the gate bias (``b_gate`` in the SAELens export), ``r_mag`` and ``b_mag`` the
    magnitude path's per-latent log-rescale and bias (both start at 0).

    ``SAEOutput.pre_acts`` is π_gate (what the L1, the auxiliary loss and AuxK read); ``SAEOutput.acts`` is the
    gated magnitude ``f``, the codes the decoder uses (and C²R sees).

    Loss terms: ``mse``, ``l1 = E[Σ_i ReLU(π_gate,i)]`` (weight ``l1_coef``, ramped up over ``l1_warmup_steps``)
    and ``gate_aux`` (weight ``gate_aux_coef``, 1 in the paper).
    """

    architecture = "gated"

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        l1_coef: float = 0.3,
        l1_warmup_steps: int = 0,
        gate_aux_coef: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(d_in, dict_size, **kwargs)
        if gate_aux_coef < 0:
            raise ValueError(f"gate_aux_coef must be >= 0, got {gate_aux_coef}")
        self.l1 = Schedule(float(l1_coef), warmup_steps=int(l1_warmup_steps), key_prefix="l1_")
        self.gate_aux_coef = float(gate_aux_coef)
        self.r_mag = nn.Parameter(torch.zeros(dict_size))
        self.b_mag = nn.Parameter(torch.zeros(dict_size))

    def encode_with_pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shared = (x - self.b_dec) @ self.W_enc
        gate_pre = shared + self.b_enc
        magnitude = (shared * self.r_mag.exp() + self.b_mag).relu()
        return gate_pre, magnitude * (gate_pre > 0)

    def extra_losses(self, x: Tensor, out: SAEOutput, step: int) -> LossTerms:
        gate = out.pre_acts.relu()
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "l1": (gate.sum(dim=-1).mean(), self.l1.weight(step)),
            "gate_aux": (mse(via_gate, x), self.gate_aux_coef),
        }

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        tensors = self.encoder_decoder_tensors()
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = self.r_mag.detach()
        tensors["b_mag"] = self.b_mag.detach()
        return "gated", tensors, {}

    @classmethod
    def from_export_state(cls, cfg: dict, tensors: dict[str, Tensor], **settings) -> GatedSAE:
        sae = super().from_export_state(cfg, {**tensors, "b_enc": tensors["b_gate"]}, **settings)
        with torch.no_grad():
            sae.r_mag.copy_(tensors["r_mag"])
            sae.b_mag.copy_(tensors["b_mag"])
        return sae
