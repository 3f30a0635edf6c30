"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) sparsity, with optional k annealing."""

from __future__ import annotations

import torch
from torch import Tensor

from c2r.sae import sparse
from c2r.sae.base import SAEOutput, SparseAutoencoder, SparseCodes


class KSparseAutoencoder(SparseAutoencoder):
    """What TopK-style SAEs share: the number ``k`` of active latents per row and its optional annealing.

    Annealing (off by default): with ``k_anneal_steps > 0``, training starts at ``k_start`` active latents and
    ``k`` decreases linearly to the target ``k`` over the first ``k_anneal_steps`` training steps
    (``round(k_start + (k - k_start) · min(1, t / k_anneal_steps))`` at the training step t that
    ``forward_pass`` is given), then stays at ``k``. Starting dense eases early optimisation and leaves fewer dead
    latents. Without a step (``encode``, validation, export) the SAE is the trained one: ``k`` active latents.

    ``forward_pass`` is sparse: after the dense encoder forward, everything (decoding, AuxK, C²R, the backward)
    runs on the B·k kept entries (:mod:`c2r.sae.sparse`). An architecture implements ``select``.
    """

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        k: int,
        k_start: int | None = None,
        k_anneal_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(d_in, dict_size, **kwargs)
        if not 0 < k <= dict_size:
            raise ValueError(f"k must be in [1, dict_size={dict_size}], got k={k}; lower k or raise dict_size")
        if k_anneal_steps < 0:
            raise ValueError(f"k_anneal_steps must be >= 0 (0 = no annealing), got {k_anneal_steps}")
        if k_anneal_steps > 0 and k_start is None:
            raise ValueError(f"k_anneal_steps={k_anneal_steps} needs k_start (the k to anneal from), e.g. k_start={4 * k}")
        if k_start is not None and k_anneal_steps == 0:
            raise ValueError(f"k_start={k_start} is set but k_anneal_steps=0: set k_anneal_steps > 0 or k_start=null")
        if k_start is not None and not k <= k_start <= dict_size:
            raise ValueError(f"k_start must be in [k={k}, dict_size={dict_size}] (k decays to k), got {k_start}")
        self.k = int(k)
        self.k_start = None if k_start is None else int(k_start)
        self.k_anneal_steps = int(k_anneal_steps)

    def select(self, pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(rows, latents)`` (``[N]`` long, ``rows`` sorted) of the entries kept among ``pre_acts [B, F]``
        (no graph): ``k`` per row (on average, for BatchTopK). A kept entry's code is its ReLU'd pre-activation."""
        raise NotImplementedError

    def activate(self, pre_acts: Tensor) -> Tensor:
        flat = pre_acts.reshape(-1, self.dict_size)
        rows, latents = self.select(flat.detach(), self.k)
        entries = SparseCodes(rows, latents, flat[rows, latents].relu(), *flat.shape)
        return entries.dense().view_as(pre_acts)

    def forward_pass(self, x: Tensor, step: int | None = None) -> SAEOutput:
        """Sparse: the dense pre-activations are computed without a graph, the kept entries get theirs from
        :func:`c2r.sae.sparse.entries_of_pre_acts`, and the codes stay sparse (dense only if ``acts`` is read)."""
        with torch.no_grad():
            pre_acts = self.pre_activations(x)
        rows, latents = self.select(pre_acts, self.current_k(step))
        values = self.pre_acts_at(x, pre_acts, rows, latents).relu()
        recon = sparse.decode(rows, latents, values, x.shape[0], self.W_dec) + self.b_dec
        return SAEOutput(pre_acts, recon, sparse=SparseCodes(rows, latents, values, x.shape[0], self.dict_size))

    def pre_acts_at(self, x: Tensor, pre_acts: Tensor, rows: Tensor, latents: Tensor) -> Tensor:
        return sparse.entries_of_pre_acts(x, self.b_dec, self.W_enc, self.b_enc, pre_acts, rows, latents)

    def current_k(self, step: int | None = None) -> int:
        """The number of active latents per row at training ``step``; ``k`` for the trained SAE (``None``)."""
        if self.k_anneal_steps == 0 or step is None:
            return self.k
        progress = min(1.0, step / self.k_anneal_steps)
        return round(self.k_start + (self.k - self.k_start) * progress)


class TopKSAE(KSparseAutoencoder):
    """Keeps the ``k`` largest (ReLU'd) pre-activations of every row: exactly k active latents per row."""

    architecture = "topk"

    def select(self, pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor]:
        latents = pre_acts.topk(k, dim=-1, sorted=False).indices.flatten()
        rows = torch.arange(pre_acts.shape[0], device=pre_acts.device).repeat_interleave(k)
        return rows, latents

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        return "topk", self.encoder_decoder_tensors(), {"k": self.k}

    @classmethod
    def from_export_state(cls, cfg: dict, tensors: dict[str, Tensor], **settings) -> TopKSAE:
        return super().from_export_state(cfg, tensors, k=int(cfg["k"]), **settings)


class BatchTopKSAE(KSparseAutoencoder):
    """Keeps the ``k·B`` largest pre-activations of the whole batch: k active latents per row *on average*.

    At inference a single threshold replaces the batch-dependent selection (so one row's code does not depend
    on the others): the running average of the smallest activation kept in training batches.

    The encoder starts as the decoderᵀ scaled by ``encoder_init_scale`` (0.01; 1 is the plain tied init). Adam
    moves every weight by about lr per step whatever its size, so a small encoder turns towards its features
    faster relative to its norm, while the decoder rows stay unit-norm. SAELens's BatchTopK starts at the same
    effective scale (decoder rows at norm 0.1, tied encoder, pre-activations scaled by the decoder norms:
    0.1 · 0.1). On ``benchmarks/batchtopk_parity.py`` (hierarchy data, 3000 steps, seed 0) the plain tied init
    trails SAELens at equal L0 (FVU 0.364 vs 0.348); 0.1 gives 0.350 and 0.01 gives 0.345.
    """

    architecture = "batchtopk"

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        k: int,
        threshold_momentum: float = 0.99,
        encoder_init_scale: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(d_in, dict_size, k=k, **kwargs)
        if not 0 <= threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        if encoder_init_scale <= 0:
            raise ValueError(f"encoder_init_scale must be > 0 (1 = the plain tied init), got {encoder_init_scale}")
        self.threshold_momentum = threshold_momentum
        with torch.no_grad():
            self.W_enc.mul_(encoder_init_scale)
        # Negative until the first training batch sets it: "not estimated yet".
        self.register_buffer("threshold", torch.tensor(-1.0))

    def uses_threshold(self) -> bool:
        """Inference form: eval mode once a training batch has set the threshold (until then, e.g. Lightning's
        sanity validation, eval mode also uses the batch selection)."""
        return not self.training and bool(self.threshold >= 0)

    def activate(self, pre_acts: Tensor) -> Tensor:
        if self.uses_threshold():
            return pre_acts * (pre_acts > self.threshold)
        return super().activate(pre_acts)

    def forward_pass(self, x: Tensor, step: int | None = None) -> SAEOutput:
        if self.uses_threshold():
            return SparseAutoencoder.forward_pass(self, x, step)
        return super().forward_pass(x, step)

    def select(self, pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor]:
        flat = pre_acts.relu().flatten()
        values, indices = flat.topk(min(k * pre_acts.shape[0], flat.numel()), sorted=False)
        if self.training:
            self._update_threshold(values)
        indices = indices.sort().values  # row-major: each row's entries together
        return indices // self.dict_size, indices % self.dict_size

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """Move the threshold towards the smallest positive kept value; on the device, without a host sync."""
        smallest = torch.where(kept > 0, kept, float("inf")).min().to(self.threshold.dtype)
        estimate = torch.where(self.threshold < 0, smallest, self.threshold.lerp(smallest, 1 - self.threshold_momentum))
        self.threshold.copy_(torch.where(smallest.isfinite(), estimate, self.threshold))

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        # SAELens and SAEBench read a BatchTopK SAE at inference as a JumpReLU with one shared threshold; so
        # does c2r.load_sae, which returns it as a JumpReLUSAE.
        threshold = self.threshold.detach().expand(self.dict_size).clone()
        return "jumprelu", {**self.encoder_decoder_tensors(), "threshold": threshold}, {}
