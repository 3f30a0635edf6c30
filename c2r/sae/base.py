"""What every SAE architecture shares; each architecture file holds only what differs.

Shared here: the affine encoder/decoder parameters, the decoder-row norm policy (unit norm, or free for
architectures that opt out), the data-initialised decoder bias, dead-latent tracking, the AuxK loss that revives
dead latents and the assembly of the named loss terms. An architecture implements ``activate`` (pre-activations →
post-sparsity codes) and ``export_state`` (its inference form, with ``from_export_state`` its inverse, through which
``c2r.load_sae`` rebuilds an exported SAE), and may add loss terms via ``extra_losses`` or replace the reconstruction
term via ``reconstruction_losses``; one with several encoder paths (Gated) overrides ``encode_with_pre_acts`` instead
of ``activate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from c2r.sae import sparse
from c2r.seeds import stream_generator

ENCODER_DECODER = ("W_enc", "b_enc", "W_dec", "b_dec")  # the tensors every inference form holds

LossTerms = dict[str, tuple[Tensor, float]]
"""Named loss terms, ``name -> (raw value, weight)``; logged as ``losses/<name>``."""


@dataclass
class SparseCodes:
    """The non-zero entries of a batch's codes as (row, latent, value) triples, for the architectures that select
    them explicitly (TopK, BatchTopK, Matryoshka). Their step never builds the dense ``[B, F]`` codes: decoding,
    per-latent batch statistics (C²R's ``n_i``) and every gradient cost O(B·k) (:mod:`c2r.sae.sparse`)."""

    rows: Tensor  # [N] long, sorted: the batch row of each entry
    latents: Tensor  # [N] long: its latent
    values: Tensor  # [N]: its value (differentiable)
    batch_size: int
    dict_size: int

    def dense(self) -> Tensor:
        """The ``[B, F]`` codes (differentiable in ``values``), for the consumers that need them."""
        codes = self.values.new_zeros(self.batch_size, self.dict_size)
        return codes.index_put((self.rows, self.latents), self.values)


class SAEOutput:
    """One forward pass: what the losses, regularizers and metrics need.

    ``pre_acts [B, F]``: the encoder output before the sparsity nonlinearity (Gated: the gate path's); for the
    k-sparse architectures it carries no graph (their gradients flow through ``sparse``). ``acts [B, F]``: the
    post-sparsity codes; given either dense or as ``sparse`` entries, from which the dense form is built only if
    a consumer reads ``acts``. ``recon [B, d]``: the reconstruction.
    """

    def __init__(
        self, pre_acts: Tensor, recon: Tensor, *, acts: Tensor | None = None, sparse: SparseCodes | None = None
    ) -> None:
        if (acts is None) == (sparse is None):
            raise ValueError("SAEOutput needs exactly one of acts (dense codes) and sparse (their entries)")
        self.pre_acts = pre_acts
        self.recon = recon
        self.sparse = sparse
        self._acts = acts

    @property
    def acts(self) -> Tensor:
        if self._acts is None:
            self._acts = self.sparse.dense()
        return self._acts

    @property
    def codes(self) -> Tensor | SparseCodes:
        """``acts`` in the cheapest exact form: its sparse entries where known, else the dense tensor."""
        return self.sparse if self.sparse is not None else self.acts

    def firing_counts(self) -> Tensor:
        """``[F]`` long: in how many rows each latent is non-zero."""
        if self.sparse is None:
            return (self.acts != 0).sum(dim=0)
        active = (self.sparse.values != 0).long()
        return active.new_zeros(self.sparse.dict_size).index_add_(0, self.sparse.latents, active)


class SparseAutoencoder(nn.Module):
    """``x̂ = activate((x - b_dec) W_enc + b_enc) W_dec + b_dec`` with decoder rows ``W_dec [F, d]``.

    Works on normalised activations (E‖x‖² = 1); export folds the normalisation back in.

    Decoder-row norms: with ``unit_norm_decoder = True`` (the class default) the rows are kept on the unit
    sphere: ``remove_parallel_gradient`` drops the radial gradient before each optimiser step and
    ``normalize_decoder`` renormalises after it. An architecture whose sparsity penalty is weighted by the row
    norms sets it to ``False``; both methods are then no-ops and the rows float freely.
    """

    architecture: str = "base"
    unit_norm_decoder: bool = True

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

        decoder = torch.randn(dict_size, d_in, generator=stream_generator(seed, "sae.init"))
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        # Tied initialisation (encoder = decoderᵀ) starts every latent as a matched filter of its direction.
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(dict_size, dtype=torch.long))
        # An upper bound of tokens_since_fired.max() kept on the host, so that the step knows without reading the
        # device that no latent can be dead yet (the first dead_tokens tokens of a run).
        self.max_tokens_since_fired = 0

    # --- what architectures implement -------------------------------------------------------------------------
    def activate(self, pre_acts: Tensor) -> Tensor:
        """Post-sparsity codes from pre-activations (behaviour may differ between train and eval mode)."""
        raise NotImplementedError

    def extra_losses(self, x: Tensor, out: SAEOutput, step: int) -> LossTerms:
        """Architecture-specific loss terms at training ``step``; none by default."""
        return {}

    def reconstruction_losses(self, x: Tensor, out: SAEOutput) -> LossTerms:
        """The reconstruction term(s); by default ``mse`` of the full reconstruction with weight 1."""
        return {"mse": (mse(out.recon, x), 1.0)}

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        """(SAELens architecture name, every tensor of the inference form, extra cfg fields), in the training
        normalisation; ``c2r.export.export_sae`` folds the normalisation into ``W_enc``, ``W_dec`` and ``b_dec``
        (every other tensor acts on pre-activations, which the folding leaves unchanged)."""
        raise NotImplementedError

    @classmethod
    def from_export_state(cls, cfg: dict, tensors: dict[str, Tensor], **settings) -> SparseAutoencoder:
        """The SAE of an exported ``cfg`` (cfg.json) and its tensors: the inverse of ``export_state``. This base
        builds ``cls(d_in, d_sae, **settings)`` and loads ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``; an
        architecture with more settings or tensors extends it."""
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), **settings)
        with torch.no_grad():
            for name in ENCODER_DECODER:
                getattr(sae, name).copy_(tensors[name])
        return sae

    # --- shared ------------------------------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_with_pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_acts, acts)`` of ``x``; an architecture with more than one encoder path overrides this."""
        pre_acts = self.pre_activations(x)
        return pre_acts, self.activate(pre_acts)

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_with_pre_acts(x)[1]

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``x̂`` (what an SAE is called for at inference)."""
        return self.decode(self.encode(x))

    def forward_pass(self, x: Tensor, step: int | None = None) -> SAEOutput:
        """Everything the losses, regularizers and metrics read of one pass. ``step`` is the training step, for
        schedules acting inside the forward (k annealing); ``None`` is the trained SAE (every schedule at its end)."""
        pre_acts, acts = self.encode_with_pre_acts(x)
        return SAEOutput(pre_acts, self.decode(acts), acts=acts)

    def losses(self, x: Tensor, out: SAEOutput, step: int) -> LossTerms:
        """Every SAE loss term at training ``step`` (warm-ups read it) as ``name -> (raw value, weight)``:
        the reconstruction, AuxK and the architecture's own."""
        terms = self.reconstruction_losses(x, out)
        if self.aux_coef > 0:
            terms["auxk"] = (self.auxk_loss(x, out), self.aux_coef)
        terms.update(self.extra_losses(x, out, step))
        return terms

    def encoder_decoder_tensors(self) -> dict[str, Tensor]:
        """``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` detached: the core of every inference form."""
        return {name: getattr(self, name).detach() for name in ENCODER_DECODER}

    def pre_acts_at(self, x: Tensor, pre_acts: Tensor, rows: Tensor, latents: Tensor) -> Tensor:
        """``pre_acts[rows, latents]`` of the input ``x``, differentiable; the k-sparse architectures, whose
        ``pre_acts`` carry no graph, return them through the sparse encoder backward."""
        return pre_acts[rows, latents]

    def auxk_loss(self, x: Tensor, out: SAEOutput) -> Tensor:
        """Reconstruct the residual with the top ``aux_k`` dead latents of each row (Gao et al. 2024), normalised
        by the residual's variance so the term is scale-free; zero when no latent is dead.

        Without a host sync: skipped while no latent can be dead yet (known on the host, see ``update_firing``),
        then computed on every step and zeroed on the device when none is. Decoded from the selected entries."""
        if self.max_tokens_since_fired < self.dead_tokens:
            return x.new_zeros(())
        dead = self.dead_mask()
        batch = x.shape[0]
        with torch.no_grad():
            latents = out.pre_acts.detach().masked_fill(~dead, float("-inf")).topk(self.aux_k, dim=-1).indices
        rows = torch.arange(batch, device=x.device).repeat_interleave(self.aux_k)
        latents = latents.flatten()
        # Rows with fewer than aux_k dead latents also pick live ones: those entries are zeroed.
        values = torch.where(dead[latents], self.pre_acts_at(x, out.pre_acts, rows, latents).relu(), 0.0)
        aux_recon = sparse.decode(rows, latents, values, batch, self.W_dec)
        residual = (x - out.recon).detach()
        denominator = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        loss = (aux_recon - residual).pow(2).sum(dim=-1).mean() / denominator
        return torch.where(dead.any(), loss, 0.0)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @torch.no_grad()
    def update_firing(self, fired: Tensor, n_tokens: int) -> None:
        """Record one training batch of ``n_tokens`` rows in which the latents ``fired [F]`` (bool) fired."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0
        self.max_tokens_since_fired += n_tokens

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.max_tokens_since_fired = int(self.tokens_since_fired.max())  # one host read, at load time

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project the decoder rows back onto the unit sphere (after each optimiser step); a no-op when the
        architecture lets the rows float (``unit_norm_decoder = False``)."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the gradient component along each decoder row, which only changes its norm (undone anyway by
        ``normalize_decoder``) and would otherwise distort Adam's moment estimates. A no-op for floating rows."""
        if self.W_dec.grad is None or not self.unit_norm_decoder:
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

