"""What every SAE architecture shares; each architecture file holds only what differs.

Shared here: the affine encoder/decoder parameters, unit-norm decoder rows, the data-initialised decoder bias,
dead-latent tracking and the AuxK loss that revives dead latents. An architecture implements ``activate``
(pre-activations → post-sparsity codes) and may add loss terms via ``extra_losses``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SAEOutput:
    """One forward pass: what the losses, regularizers and metrics need."""

    pre_acts: Tensor  # [B, F] encoder output before the sparsity nonlinearity
    acts: Tensor  # [B, F] post-sparsity codes: what the decoder (and C²R) sees
    recon: Tensor  # [B, d] reconstruction


class SparseAutoencoder(nn.Module):
    """``x̂ = activate((x - b_dec) W_enc + b_enc) W_dec + b_dec`` with unit-norm rows of ``W_dec [F, d]``.

    Works on normalised activations (E‖x‖² = 1); export folds the normalisation back in.
    """

    architecture: str = "base"

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        aux_k: int | None = None,
        aux_coef: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}")
        if dict_size <= 0:
            raise ValueError(f"dict_size must be positive, got {dict_size}; e.g. dict_size=4096")
        if aux_coef < 0:
            raise ValueError(f"aux_coef must be >= 0 (0 disables AuxK), got {aux_coef}")
        self.d_in = d_in
        self.dict_size = dict_size
        self.aux_k = min(aux_k if aux_k is not None else max(d_in // 2, 1), dict_size)
        self.aux_coef = aux_coef
        self.dead_tokens = dead_tokens

        generator = torch.Generator().manual_seed(seed)
        decoder = torch.randn(dict_size, d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        # Tied initialisation (encoder = decoderᵀ) starts every latent as a matched filter of its direction.
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(dict_size, dtype=torch.long))

    # --- what architectures implement -------------------------------------------------------------------------
    def activate(self, pre_acts: Tensor) -> Tensor:
        """Post-sparsity codes from pre-activations (behaviour may differ between train and eval mode)."""
        raise NotImplementedError

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, tuple[Tensor, float]]:
        """Architecture-specific loss terms as ``name -> (raw value, weight)``; none by default."""
        return {}

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        """(SAELens architecture name, extra tensors, extra cfg fields) of the inference form."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        pre_acts = self.pre_activations(x)
        acts = self.activate(pre_acts)
        return SAEOutput(pre_acts=pre_acts, acts=acts, recon=self.decode(acts))

    def losses(self, x: Tensor, out: SAEOutput) -> dict[str, tuple[Tensor, float]]:
        """Every SAE loss term as ``name -> (raw value, weight)``: MSE, AuxK and the architecture's own."""
        terms = {"mse": (mse(out.recon, x), 1.0)}
        if self.aux_coef > 0:
            terms["auxk"] = (self.auxk_loss(x, out), self.aux_coef)
        terms.update(self.extra_losses(x, out))
        return terms

    def auxk_loss(self, x: Tensor, out: SAEOutput) -> Tensor:
        """Reconstruct the residual with the top ``aux_k`` dead latents (Gao et al. 2024), normalised by the
        residual's variance so the term is scale-free; zero when no latent is dead."""
        dead = self.dead_mask()
        if not dead.any():
            return x.new_zeros(())
        residual = (x - out.recon).detach()
        k = min(self.aux_k, int(dead.sum()))
        dead_pre = out.pre_acts.masked_fill(~dead, float("-inf"))
        values, indices = dead_pre.topk(k, dim=-1)
        aux_acts = torch.zeros_like(out.pre_acts).scatter(-1, indices, values.relu())
        aux_recon = aux_acts @ self.W_dec
        denominator = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        return (aux_recon - residual).pow(2).sum(dim=-1).mean() / denominator

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @torch.no_grad()
    def update_firing(self, fired: Tensor, n_tokens: int) -> None:
        """Record which latents fired (``fired [F]`` bool) in a batch of ``n_tokens`` rows."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project the decoder rows back onto the unit sphere (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the gradient component along each decoder row, which only changes its norm (undone anyway by
        ``normalize_decoder``) and would otherwise distort Adam's moment estimates."""
        if self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * rows).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * rows

    @torch.no_grad()
    def init_decoder_bias(self, sample: Tensor, iterations: int = 50) -> None:
        """Set ``b_dec`` to the geometric median of a data sample (Weiszfeld iterations): a robust centre, so
        the encoder sees centred inputs from the first step."""
        sample = sample.to(self.b_dec.device, torch.float32)
        median = sample.mean(dim=0)
        for _ in range(iterations):
            weights = 1.0 / (sample - median).norm(dim=1).clamp_min(1e-8)
            median = (weights[:, None] * sample).sum(dim=0) / weights.sum()
        self.b_dec.copy_(median)


def mse(recon: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over the feature dimension, averaged over rows (scale matches E‖x‖² = 1)."""
    return (recon - x).pow(2).sum(dim=-1).mean()

