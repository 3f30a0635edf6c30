"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): learned per-latent thresholds, L0 penalty.

``f_i = z_i · H(z_i − θ_i)`` with ``z`` the pre-activations and ``θ = exp(log_threshold) > 0``. Neither the
jump nor the L0 ``Σ_i H(z_i − θ_i)`` has a useful gradient in θ, so both use straight-through estimators with
a kernel ``K`` of width ``ε = bandwidth`` (here the rectangle ``K(u) = 1[|u| < 1/2]``), as in the paper:

    ∂/∂θ JumpReLU(z; θ) := −(θ/ε) K((z − θ)/ε),    ∂/∂z JumpReLU(z; θ) := H(z − θ)
    ∂/∂θ H(z − θ)       := −(1/ε) K((z − θ)/ε),    ∂/∂z H(z − θ)       := 0

so θ gets gradient only from rows whose pre-activation lies within ε/2 of it, and the L0 penalty reaches the
encoder only through the thresholds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from c2r.sae.base import LossTerms, SAEOutput, SparseAutoencoder
from c2r.schedule import Schedule


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``1[-1/2 < u < 1/2]``."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _kernel(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return rectangle((pre_acts - threshold) / bandwidth) / bandwidth


def _sum_to_threshold(grad: Tensor, threshold: Tensor) -> Tensor:
    """Sum a per-element gradient over the leading (batch) dims down to the threshold's shape ``[F]``."""
    return grad.reshape(-1, threshold.shape[-1]).sum(dim=0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre_acts, threshold = ctx.saved_tensors
        grad_pre = grad * (pre_acts > threshold)
        grad_threshold = -threshold * _kernel(pre_acts, threshold, ctx.bandwidth) * grad
        return grad_pre, _sum_to_threshold(grad_threshold, threshold), None


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre_acts, threshold = ctx.saved_tensors
        grad_threshold = -_kernel(pre_acts, threshold, ctx.bandwidth) * grad
        return None, _sum_to_threshold(grad_threshold, threshold), None


def jumprelu(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``pre_acts · H(pre_acts − threshold)`` with the straight-through θ-gradient above."""
    return _JumpReLU.apply(pre_acts, threshold, bandwidth)


def heaviside(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``H(pre_acts − threshold)`` (as floats) with the straight-through θ-gradient above."""
    return _Heaviside.apply(pre_acts, threshold, bandwidth)


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU codes trained with ``mse + l0_coef · E[Σ_i H(z_i − θ_i)]``; the L0 weight ramps up linearly
    over ``l0_warmup_steps``. Decoder rows stay unit-norm.

    The threshold is learned as ``log_threshold`` (the paper's parameterisation; it keeps θ > 0). Under Adam a
    parameter moves by about ``lr`` per step whatever its gradient, so θ changes by a *factor* of roughly
    ``1 ± lr`` per step: it cannot travel far from ``threshold_init``, which must therefore be on the scale of the
    pre-activations. Both ``threshold_init`` and ``bandwidth`` are in pre-activation units; with activations
    normalised to E‖x‖² = 1 and tens of active latents per row, active pre-activations are ~0.1, hence the
    defaults 0.05 and 0.05 (SAELens's default bandwidth). Gemma Scope's 0.001 / 0.001 freeze the thresholds on
    such data (default synthetic data, 1024 latents, 600 steps at lr 1e-3, ``l0_coef = 0.01``: L0 stayed at ~100
    with them and fell to ~34 with 0.05 / 0.05).
    """

    architecture = "jumprelu"

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        l0_coef: float = 0.01,
        l0_warmup_steps: int = 0,
        bandwidth: float = 0.05,
        threshold_init: float = 0.05,
        **kwargs,
    ) -> None:
        super().__init__(d_in, dict_size, **kwargs)
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0 (width of the straight-through kernel), got {bandwidth}")
        if threshold_init <= 0:
            raise ValueError(f"threshold_init must be > 0 (thresholds are exp(log_threshold)), got {threshold_init}")
        self.l0 = Schedule(float(l0_coef), warmup_steps=int(l0_warmup_steps), key_prefix="l0_")
        self.bandwidth = float(bandwidth)
        self.log_threshold = nn.Parameter(torch.full((dict_size,), math.log(threshold_init)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activate(self, pre_acts: Tensor) -> Tensor:
        return jumprelu(pre_acts, self.threshold, self.bandwidth)

    def extra_losses(self, x: Tensor, out: SAEOutput, step: int) -> LossTerms:
        l0 = heaviside(out.pre_acts, self.threshold, self.bandwidth).sum(dim=-1).mean()
        return {"l0": (l0, self.l0.weight(step))}

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        return "jumprelu", {**self.encoder_decoder_tensors(), "threshold": self.threshold.detach()}, {}

    @classmethod
    def from_export_state(cls, cfg: dict, tensors: dict[str, Tensor], **settings) -> JumpReLUSAE:
        """Also the inference form of BatchTopK and Matryoshka SAEs (one shared threshold). A threshold <= 0
        (a BatchTopK SAE exported before any training batch set it) acts as 0: ``z · H(z − θ)`` is then
        ``ReLU(z)``, as with any θ <= 0, so it loads as ``log θ = −inf``. ``exp(log θ)`` may differ from the file's
        θ in the last bit."""
        sae = super().from_export_state(cfg, tensors, **settings)
        with torch.no_grad():
            sae.log_threshold.copy_(tensors["threshold"].clamp_min(0).log())
        return sae
