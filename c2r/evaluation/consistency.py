"""Cross-seed consistency: how many of one SAE's decoder directions another SAE, trained with another seed, also
learned (after Paulo & Belrose 2025, "Sparse autoencoders trained on the same data learn different features").

Each latent of a dictionary gets its *best-match cosine*: the largest cosine between its decoder row and any
decoder row of the other dictionary. A latent is *matched* when that cosine is at least the threshold (0.7, the
paper's). The cosine is signed, not ``|cos|``: a decoder direction has a sign (the latent only adds it with a
positive code), so a row and its negation are different features.

The search is tiled like :mod:`c2r.geometry`'s: a ``[tile, F_b]`` block of cosines at a time, never the
``F_a × F_b`` matrix (dictionaries can have 65,536 latents), in at least fp32 with autocast off, without gradient.
One pass gives both directions (each row of ``a`` in ``b``, each row of ``b`` in ``a``), since a tile's column
maxima are the other dictionary's partial best matches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from c2r.geometry import check_tile_size, full_precision, unit_rows

MATCH_THRESHOLD = 0.7
"""Best-match cosine from which a latent counts as found in the other dictionary (Paulo & Belrose's)."""


@torch.no_grad()
def best_match_cosines(a: Tensor, b: Tensor, *, tile_size: int = 1024) -> tuple[Tensor, Tensor]:
    """``(best_a [F_a], best_b [F_b])``: each row of ``a``'s largest cosine to a row of ``b``, and each row of
    ``b``'s largest cosine to a row of ``a`` (decoder matrices ``[F, d]`` of the same ``d``). Memory stays
    O(tile_size·F_b)."""
    check_tile_size(tile_size)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the dictionaries have directions of different sizes: {a.shape[1]} and {b.shape[1]}")
    with full_precision(a):
        unit_a = unit_rows(a)
        unit_b = unit_rows(b).to(unit_a)  # a's dtype and device
        best_a = torch.empty(unit_a.shape[0], dtype=unit_a.dtype, device=unit_a.device)
        best_b = torch.full((unit_b.shape[0],), float("-inf"), dtype=unit_b.dtype, device=unit_b.device)
        for start in range(0, unit_a.shape[0], tile_size):
            cosines = unit_a[start : start + tile_size] @ unit_b.T
            best_a[start : start + cosines.shape[0]] = cosines.amax(dim=1)
            best_b = torch.maximum(best_b, cosines.amax(dim=0))
    return best_a, best_b


def match_summary(best: Tensor, threshold: float = MATCH_THRESHOLD) -> dict[str, float]:
    """``matched_share`` (share of latents whose best match reaches ``threshold``) and ``mean_best_cosine``."""
    best = best.double()
    return {"matched_share": (best >= threshold).double().mean().item(), "mean_best_cosine": best.mean().item()}
