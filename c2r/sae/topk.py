"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) sparsity."""

from __future__ import annotations

import torch
from torch import Tensor

from c2r.sae.base import SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    """Keeps the ``k`` largest (ReLU'd) pre-activations of every row: exactly k active latents per row."""

    architecture = "topk"

    def __init__(self, d_in: int, dict_size: int, *, k: int, **kwargs) -> None:
        super().__init__(d_in, dict_size, **kwargs)
        if not 0 < k <= dict_size:
            raise ValueError(f"k must be in [1, dict_size={dict_size}], got k={k}; lower k or raise dict_size")
        self.k = k

    def activate(self, pre_acts: Tensor) -> Tensor:
        values, indices = pre_acts.topk(self.k, dim=-1)
        return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        return "topk", {}, {"k": self.k}


class BatchTopKSAE(SparseAutoencoder):
    """Keeps the ``k·B`` largest pre-activations of the whole batch: k active latents per row *on average*.

    At inference a single threshold replaces the batch-dependent selection (so one row's code does not depend
    on the others): the running average of the smallest activation kept in training batches.
    """

    architecture = "batchtopk"

    def __init__(self, d_in: int, dict_size: int, *, k: int, threshold_momentum: float = 0.99, **kwargs) -> None:
        super().__init__(d_in, dict_size, **kwargs)
        if not 0 < k <= dict_size:
            raise ValueError(f"k must be in [1, dict_size={dict_size}], got k={k}; lower k or raise dict_size")
        if not 0 <= threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        self.k = k
        self.threshold_momentum = threshold_momentum
        # Negative until the first training batch sets it: "not estimated yet".
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activate(self, pre_acts: Tensor) -> Tensor:
        # Until a training batch has set the threshold (e.g. Lightning's sanity validation), eval mode also
        # uses the batch selection.
        if not self.training and self.threshold >= 0:
            return pre_acts * (pre_acts > self.threshold)
        relu = pre_acts.relu()
        flat = relu.flatten()
        values, indices = flat.topk(min(self.k * pre_acts.shape[0], flat.numel()))
        if self.training:
            self._update_threshold(values)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().float()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, 1 - self.threshold_momentum)

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        # SAELens and SAEBench read a BatchTopK SAE at inference as a JumpReLU with one shared threshold.
        return "jumprelu", {"threshold": self.threshold.expand(self.dict_size).clone()}, {}
