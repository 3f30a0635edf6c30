"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The dictionary is cut into consecutive groups; prefix g is the first ``g`` groups. Latents are selected by one
BatchTopK over the whole dictionary, and every prefix must reconstruct the input on its own:

    x̂_g = Σ_{i < end_g} f_i W_dec,i + b_dec,    L_rec = reduce_g ‖x − x̂_g‖²   (g = 1 … G, x̂_G = x̂)

so early latents learn general features that later ones refine instead of absorbing them.

Reduction (``prefix_reduction``): ``"mean"`` (default) averages over the G prefixes, ``"sum"`` adds them. Both
reference implementations average: Bussmann et al.'s code (github.com/bartbussmann/matryoshka_sae, ``sae.py``)
divides by G + 1, counting the empty prefix (``b_dec`` alone) as one more term, and dictionary_learning's
``MatryoshkaBatchTopKTrainer`` weights each prefix by 1/G. We average over the G non-empty prefixes (the empty
one only pulls ``b_dec`` towards the data mean, which its geometric-median initialisation already provides).

Loss terms: ``mse`` is the full reconstruction's error (comparable across architectures) and ``prefix_mse``
the sum of the strict prefixes' errors; both carry the weight 1/G (mean) or 1 (sum), so their weighted sum is
exactly L_rec.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from c2r.sae import sparse
from c2r.sae.base import LossTerms, SAEOutput, SparseCodes, mse
from c2r.sae.topk import BatchTopKSAE

PREFIX_REDUCTIONS = ("mean", "sum")


def group_sizes_from_fractions(fractions: Sequence[float], dict_size: int) -> list[int]:
    """Group sizes for ``fractions`` of ``dict_size`` (summing to 1): group boundaries at
    ``round(cumsum(fractions) · dict_size)``, the last one at ``dict_size``."""
    fractions = [float(f) for f in fractions]
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"group_fractions must be positive and sum to 1, got {fractions}")
    ends, total = [], 0.0
    for fraction in fractions[:-1]:
        total += fraction
        ends.append(round(total * dict_size))
    ends.append(dict_size)
    return [end - start for start, end in zip([0, *ends[:-1]], ends)]


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested reconstruction losses over prefix groups (see the module docstring).

    Give the groups as ``group_sizes`` (positive ints summing to ``dict_size``) or ``group_fractions``
    (positive, summing to 1), not both. Inference is BatchTopK's: one learned threshold, exported as JumpReLU.
    """

    architecture = "matryoshka"

    def __init__(
        self,
        d_in: int,
        dict_size: int,
        *,
        k: int,
        group_sizes: Sequence[int] | None = None,
        group_fractions: Sequence[float] | None = None,
        prefix_reduction: str = "mean",
        **kwargs,
    ) -> None:
        super().__init__(d_in, dict_size, k=k, **kwargs)
        if (group_sizes is None) == (group_fractions is None):
            raise ValueError(
                "give exactly one of group_sizes (ints summing to dict_size) and group_fractions (summing to 1); "
                f"got group_sizes={group_sizes}, group_fractions={group_fractions}"
            )
        if group_sizes is None:
            group_sizes = group_sizes_from_fractions(group_fractions, dict_size)
        group_sizes = [int(size) for size in group_sizes]
        if any(size <= 0 for size in group_sizes) or sum(group_sizes) != dict_size:
            raise ValueError(
                f"group sizes must be positive and sum to dict_size={dict_size}, got {group_sizes} "
                f"(sum {sum(group_sizes)})"
            )
        if prefix_reduction not in PREFIX_REDUCTIONS:
            raise ValueError(f"prefix_reduction must be one of {PREFIX_REDUCTIONS}, got {prefix_reduction!r}")
        self.group_sizes = group_sizes
        self.prefix_reduction = prefix_reduction

    def prefix_reconstructions(self, codes: SparseCodes, groups: int | None = None) -> Tensor:
        """``[groups, B, d]``: the reconstructions of the first ``groups`` prefixes (default: all G, the last
        being the full reconstruction), decoded from the entries at O(B·k·d): each (group, row) is one bag."""
        groups = groups or len(self.group_sizes)
        ends = torch.tensor(self.group_sizes, device=codes.latents.device).cumsum(0)
        group = torch.bucketize(codes.latents, ends, right=True)
        keep = group < groups
        bags = torch.where(keep, group * codes.batch_size + codes.rows, groups * codes.batch_size)
        bags, order = bags.sort()  # entries of later groups sort last, into one bag that is dropped
        values = torch.where(keep, codes.values, 0.0)[order]
        parts = sparse.decode(bags, codes.latents[order], values, (groups + 1) * codes.batch_size, self.W_dec)
        return parts[: groups * codes.batch_size].view(groups, codes.batch_size, -1).cumsum(dim=0) + self.b_dec

    def reconstruction_losses(self, x: Tensor, out: SAEOutput) -> LossTerms:
        groups = len(self.group_sizes)
        weight = 1.0 / groups if self.prefix_reduction == "mean" else 1.0
        terms = {"mse": (mse(out.recon, x), weight)}
        if groups > 1:
            strict = self.prefix_reconstructions(out.sparse, groups - 1)  # a training pass: sparse
            terms["prefix_mse"] = ((strict - x).pow(2).sum(dim=-1).mean(dim=-1).sum(), weight)
        return terms

    def export_state(self) -> tuple[str, dict[str, Tensor], dict]:
        architecture, tensors, fields = super().export_state()
        return architecture, tensors, {**fields, "c2r_matryoshka_group_sizes": self.group_sizes}
