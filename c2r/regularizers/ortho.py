"""The OrtSAE baseline (Korznikov et al. 2025, "OrtSAE: Orthogonal Sparse Autoencoders Uncover Atomic Features").

For decoder rows ``W [F, d]`` and a fresh random partition of the F latents into chunks of ``chunk_size``::

    ŵ_i = W_i / ‖W_i‖,   j(i) = argmax_{j≠i, j in chunk(i)} ŵ_i·ŵ_j,
    L_ortho = (1/F) Σ_i max(0, ŵ_i·ŵ_{j(i)})²

i.e. C²R's similarity term without the activation weighting. The chunks keep the cost linear in F (one
``chunk_size × chunk_size`` block per chunk). The neighbour search is C²R's chunked one
(:func:`c2r.geometry.nearest_neighbors_chunked`): a latent alone in its chunk has no neighbour and adds 0
(still counted in the mean over F), ties go to the smallest index. Gradients reach only the decoder.
"""

from __future__ import annotations

from torch import Tensor

from c2r.geometry import check_chunk_size, check_tile_size, nearest_neighbors_chunked
from c2r.seeds import stream_generator

from .base import Regularizer
from .c2r import pair_similarity


def ortho_loss(decoder_rows: Tensor, neighbors: Tensor) -> Tensor:
    """``(1/F) Σ_i max(0, cos(W_i, W_{j(i)}))²`` for given ``neighbors = j`` (``[F]``, long); latents with
    ``j(i) == i`` add 0."""
    return pair_similarity(decoder_rows, neighbors).mean()


class Ortho(Regularizer):
    """The OrtSAE penalty as a scheduled :class:`Regularizer` (default weight ``coef=0.25``, every step).

    The permutation that cuts the latents into chunks is drawn afresh at every call, from a generator seeded
    with ``(seed, step)``. The activations are ignored: the penalty depends on the decoder alone.
    """

    def __init__(
        self,
        coef: float = 0.25,
        chunk_size: int = 8192,
        interval: int = 1,
        start_step: int = 0,
        tile_size: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__(coef=coef, start_step=start_step, interval=interval)
        check_chunk_size(chunk_size)
        check_tile_size(tile_size)
        self.chunk_size = int(chunk_size)
        self.tile_size = int(tile_size)
        self.seed = int(seed)

    def neighbors(self, decoder_rows: Tensor, step: int) -> Tensor:
        """``j(i)`` inside the random chunks of ``step`` (no gradient)."""
        return nearest_neighbors_chunked(
            decoder_rows,
            chunk_size=self.chunk_size,
            generator=stream_generator(self.seed, "ortho.chunks", step),
            tile_size=self.tile_size,
        )

    def forward(self, acts: Tensor, decoder_rows: Tensor, step: int) -> Tensor:
        """The raw (unweighted) penalty of ``decoder_rows [F, d]`` at ``step``; ``acts`` is unused."""
        return ortho_loss(decoder_rows, self.neighbors(decoder_rows, step))

    def extra_repr(self) -> str:
        return (
            f"{self.schedule}, chunk_size={self.chunk_size}, tile_size={self.tile_size}, seed={self.seed}"
        )
