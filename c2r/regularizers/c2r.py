"""C²R, Cross-sample Consistency Regularization (DESIGN.md §1).

For post-sparsity activations ``f [B, F]`` and decoder rows ``W [F, d]``::

    ŵ_i = W_i / ‖W_i‖,   n_i = ‖f[:, i]‖₂ (over the batch),
    j(i) = argmax_{j≠i} ŵ_i·ŵ_j,   s_i = max(0, ŵ_i·ŵ_{j(i)})²,
    L = (1/F) Σ_i s_i (n_i + n_{j(i)})^α.

It is computed as one mechanism in two steps:

1. a neighbour search without gradient that returns ``j`` as a LongTensor ``[F]``
   (:func:`nearest_neighbors_exact`, :func:`nearest_neighbors_chunked`, dispatched by
   :func:`find_neighbors`);
2. :func:`pair_loss`, the differentiable loss on the gathered pairs ``(i, j(i))``, costing
   O(F·d + B·F) on dense codes and O(F·d + B·k) on the selected entries of a k-sparse SAE
   (:class:`~c2r.sae.SparseCodes`). Gradients reach ``f`` and both rows of each pair (through the normalisation); none
   flow through the argmax.

Convention for latents without a neighbour (F == 1, or a latent alone in its chunk): the search
returns ``j(i) = i`` and :func:`pair_loss` sets ``s_i = 0`` wherever ``j(i) == i``, so such latents
add 0 to the sum while still counting in the mean over F.

Precision: the search and the loss run with autocast disabled in at least fp32 (bf16/fp16 inputs are
upcast to fp32; fp64 inputs stay fp64), because a bf16 cosine matrix picks a different argmax for a
sizeable share of rows. On CUDA, fp32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed.nn.functional as distributed_functional
import torch.nn.functional as F
from torch import Tensor

from c2r.sae.base import SparseCodes

from .base import Regularizer, step_generator

NEIGHBOR_SEARCHES = ("exact", "chunked")
"""Searches :func:`find_neighbors` runs; "chunked" is the paper's, "exact" the global argmax."""

C2R_NEIGHBOR_SEARCHES = (*NEIGHBOR_SEARCHES, "cached")
"""What :class:`C2R` accepts: also "cached", the exact search reused for ``refresh_every`` steps."""


def _check_neighbor_search(neighbor_search: str, valid: tuple[str, ...] = NEIGHBOR_SEARCHES) -> None:
    if neighbor_search not in valid:
        raise ValueError(f"unknown C2R neighbor_search {neighbor_search!r}; choose one of {', '.join(map(repr, valid))}")


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"C2R alpha must be > 0 (the exponent of n_i + n_j; the paper uses 1), got {alpha}")


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 2:
        raise ValueError(
            f"C2R chunk_size must be >= 2 (a latent alone in its chunk has no neighbour), got {chunk_size}; "
            "the paper uses 8192"
        )


def _check_tile_size(tile_size: int) -> None:
    if tile_size < 1:
        raise ValueError(
            f"C2R tile_size must be >= 1 (rows of the cosine matrix computed at once), got {tile_size}"
        )


def _full_precision(like: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on ``like``'s device, so matmuls run in the dtype we cast to."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half precisions to fp32; keep fp32 and fp64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _argmax_other(unit_rows: Tensor, tile_size: int) -> Tensor:
    """Index of the most similar *other* row of each unit row, tiled over rows.

    Each tile computes ``tile × F`` cosines against all rows, so one ``argmax`` sees the whole row and
    returns its first maximum: ties go to the smallest index with no merging across tiles. With a
    single row there is no other row; the self entry (-inf) is then the argmax, i.e. the sentinel ``i``.
    """
    count = unit_rows.shape[0]
    neighbors = torch.empty(count, dtype=torch.long, device=unit_rows.device)
    for start in range(0, count, tile_size):
        cosines = unit_rows[start : start + tile_size] @ unit_rows.T
        rows = torch.arange(cosines.shape[0], device=unit_rows.device)
        cosines[rows, rows + start] = float("-inf")
        neighbors[start : start + tile_size] = cosines.argmax(dim=1)
    return neighbors


@torch.no_grad()
def nearest_neighbors_exact(decoder_rows: Tensor, *, tile_size: int = 4096) -> Tensor:
    """``j(i) = argmax_{j≠i} cos(W_i, W_j)`` over all F rows (LongTensor ``[F]``).

    Global search, computed ``tile_size`` rows at a time so memory stays O(tile_size·F) rather than
    O(F²). Ties go to the smallest latent index; with F == 1 the sentinel ``j(0) = 0`` is returned.
    """
    _check_tile_size(tile_size)
    with _full_precision(decoder_rows):
        unit = F.normalize(_at_least_fp32(decoder_rows.detach()), dim=1)
        return _argmax_other(unit, tile_size)


@torch.no_grad()
def nearest_neighbors_chunked(
    decoder_rows: Tensor,
    *,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    tile_size: int = 4096,
) -> Tensor:
    """The paper's search: the neighbour of each latent among a random chunk of latents.

    A fresh permutation of the F latents (``torch.randperm(F, generator=generator)``) is cut into
    consecutive chunks of ``chunk_size`` (the last may be smaller) and each latent's neighbour is
    searched only inside its chunk. Chunk members are sorted, so ties go to the smallest latent index as
    in :func:`nearest_neighbors_exact`, which this equals when F <= chunk_size. A latent alone in its
    chunk gets the sentinel ``j(i) = i`` (no neighbour). Pass the same generator state on every DDP rank.
    """
    _check_chunk_size(chunk_size)
    _check_tile_size(tile_size)
    count = decoder_rows.shape[0]
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(count, generator=generator, device=perm_device).to(decoder_rows.device)
    with _full_precision(decoder_rows):
        unit = F.normalize(_at_least_fp32(decoder_rows.detach()), dim=1)
        neighbors = torch.empty(count, dtype=torch.long, device=decoder_rows.device)
        for chunk in perm.split(chunk_size):
            members = chunk.sort().values
            neighbors[members] = members[_argmax_other(unit[members], tile_size)]
    return neighbors


def find_neighbors(
    decoder_rows: Tensor,
    neighbor_search: str = "exact",
    *,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    tile_size: int = 4096,
) -> Tensor:
    """Dispatch to the neighbour search named by ``neighbor_search`` (one of :data:`NEIGHBOR_SEARCHES`)."""
    _check_neighbor_search(neighbor_search)
    if neighbor_search == "chunked":
        return nearest_neighbors_chunked(
            decoder_rows, chunk_size=chunk_size, generator=generator, tile_size=tile_size
        )
    return nearest_neighbors_exact(decoder_rows, tile_size=tile_size)


def latent_norms(codes: Tensor | SparseCodes, *, across_ranks: bool = False) -> Tensor:
    """``n_i = ‖f[:, i]‖₂`` over the batch (``[F]``, at least fp32), from the dense codes ``f [B, F]`` or,
    cheaper and with the same value and gradients, from their non-zero entries (:class:`SparseCodes`).

    With ``across_ranks`` the batch is the global one of a DDP job: ``Σ_b f²`` is all-reduced (summed)
    differentiably before the square root, so every rank gets the same norms and gradients flow back to each
    rank's own rows. Dead latents (``Σ f² = 0``, where the root has no derivative) get norm 0 and gradient 0.
    """
    like = codes.values if isinstance(codes, SparseCodes) else codes
    with _full_precision(like):
        if isinstance(codes, SparseCodes):
            values = _at_least_fp32(codes.values)
            squares = values.new_zeros(codes.dict_size).index_add(0, codes.latents, values.square())
        else:
            squares = _at_least_fp32(codes).square().sum(dim=0)
        if across_ranks:
            squares = distributed_functional.all_reduce(squares)
        alive = squares > 0
        return torch.where(alive, torch.where(alive, squares, 1.0).sqrt(), 0.0)


def pair_similarity(decoder_rows: Tensor, neighbors: Tensor) -> Tensor:
    """``s_i = max(0, cos(W_i, W_{j(i)}))²`` for given ``neighbors = j`` (``[F]``), 0 where ``j(i) == i`` (no
    neighbour); differentiable in the rows, in at least fp32 with autocast off. Shared by C²R and OrtSAE."""
    with _full_precision(decoder_rows):
        unit = F.normalize(_at_least_fp32(decoder_rows), dim=1)
        cosines = (unit * unit[neighbors]).sum(dim=1)
        has_neighbor = neighbors != torch.arange(neighbors.shape[0], device=neighbors.device)
        return torch.where(has_neighbor, cosines.clamp_min(0).square(), 0.0)


def pair_loss(
    acts: Tensor | SparseCodes,
    decoder_rows: Tensor,
    neighbors: Tensor,
    *,
    alpha: float = 1.0,
    across_ranks: bool = False,
) -> Tensor:
    """The differentiable C²R loss (scalar) for given neighbours ``j = neighbors`` (``[F]``, long).

    Costs O(F·d + B·F) on dense codes, O(F·d + B·k) on :class:`SparseCodes`: only the F pairs ``(i, j(i))``
    are touched. Latents with ``j(i) == i`` have no
    neighbour and add 0. Gradients stay finite for dead latents (all-zero columns, where ‖·‖ has no
    derivative) and for ``n_i + n_j = 0`` with ``alpha < 1`` (where the power's derivative is infinite):
    the power is taken only on positive bases and is 0 elsewhere. ``across_ranks``: see :func:`latent_norms`.
    """
    _check_alpha(alpha)
    norms = latent_norms(acts, across_ranks=across_ranks)
    similarity = pair_similarity(decoder_rows, neighbors)
    with _full_precision(norms):
        base = norms + norms[neighbors]
        positive = base > 0
        strength = torch.where(positive, torch.where(positive, base, 1.0).pow(alpha), 0.0)
        return (similarity * strength).mean()


def c2r_loss(
    acts: Tensor,
    decoder_rows: Tensor,
    *,
    alpha: float = 1.0,
    neighbor_search: str = "exact",
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    tile_size: int = 4096,
) -> Tensor:
    """The C²R loss (scalar) of post-sparsity ``acts [B, F]`` and ``decoder_rows [F, d]``.

    Finds each latent's neighbour without gradient (``neighbor_search``: "exact" = global argmax,
    "chunked" = the paper's random chunks of ``chunk_size``, drawn with ``generator``), then returns
    :func:`pair_loss` on those pairs. ``n_i`` is the norm over this batch only (see :class:`C2R` for
    training use).
    """
    _check_alpha(alpha)
    neighbors = find_neighbors(
        decoder_rows, neighbor_search, chunk_size=chunk_size, generator=generator, tile_size=tile_size
    )
    return pair_loss(acts, decoder_rows, neighbors, alpha=alpha)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class C2R(Regularizer):
    """C²R as a scheduled :class:`Regularizer` (defaults: the paper's coef=5, alpha=1, interval=5).

    Neighbour search (``neighbor_search``):

    - ``"exact"``: the global argmax over all F latents at every call (tiled; O(F²·d) per call).
    - ``"chunked"``: the paper's; the permutation at a step is drawn from a fresh generator seeded from
      ``(seed, step)``, so every DDP rank draws the same chunks at the same step and a resumed run repeats them.
    - ``"cached"``: the exact search, recomputed when ``refresh_every`` steps have passed since the last one
      and reused in between, so a step costs O(F·d + B·k) (O(F·d + B·F) on dense codes). Right after a refresh it equals ``"exact"``.
      The indices are checkpointed (a resumed run continues with the same ones); on refresh steps ``metrics``
      reports how many changed (staleness), to choose ``refresh_every``.

    Under DDP, ``n_i`` is the norm over the global batch and the neighbours are broadcast from rank 0, so the
    loss is the same on every rank and equals a single process on the concatenated batch.
    """

    def __init__(
        self,
        coef: float = 5.0,
        alpha: float = 1.0,
        interval: int = 5,
        start_step: int = 0,
        neighbor_search: str = "cached",
        chunk_size: int = 8192,
        tile_size: int = 4096,
        refresh_every: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(coef=coef, start_step=start_step, interval=interval)
        _check_alpha(alpha)
        _check_neighbor_search(neighbor_search, C2R_NEIGHBOR_SEARCHES)
        _check_chunk_size(chunk_size)
        _check_tile_size(tile_size)
        if refresh_every < 1:
            raise ValueError(f"C2R refresh_every must be >= 1 (steps between exact neighbour searches), got {refresh_every}")
        self.alpha = float(alpha)
        self.neighbor_search = neighbor_search
        self.chunk_size = int(chunk_size)
        self.tile_size = int(tile_size)
        self.refresh_every = int(refresh_every)
        self.seed = int(seed)
        # "cached" state; sized on the first refresh (F is not known before).
        self.register_buffer("cached_neighbors", torch.empty(0, dtype=torch.long))
        self.register_buffer("refreshed_at", torch.tensor(-1, dtype=torch.long))

    def neighbors(self, decoder_rows: Tensor, step: int) -> Tensor:
        """``j(i)`` for every latent at ``step`` (no gradient), identical on every DDP rank."""
        if self.neighbor_search == "cached":
            return self._cached_neighbors(decoder_rows, step)
        generator = step_generator(self.seed, step) if self.neighbor_search == "chunked" else None
        return self._same_on_all_ranks(
            find_neighbors(
                decoder_rows,
                self.neighbor_search,
                chunk_size=self.chunk_size,
                generator=generator,
                tile_size=self.tile_size,
            )
        )

    def _cached_neighbors(self, decoder_rows: Tensor, step: int) -> Tensor:
        stale = self.cached_neighbors.numel() != decoder_rows.shape[0]
        if stale or step - int(self.refreshed_at) >= self.refresh_every:
            fresh = self._same_on_all_ranks(nearest_neighbors_exact(decoder_rows, tile_size=self.tile_size))
            changed = fresh.new_tensor(fresh.numel()) if stale else (fresh != self.cached_neighbors).sum()
            self.metrics = {"neighbors_changed": changed.float(), "neighbors_changed_fraction": changed / fresh.numel()}
            self.cached_neighbors = fresh
            self.refreshed_at.fill_(step)
        return self.cached_neighbors

    @staticmethod
    def _same_on_all_ranks(neighbors: Tensor) -> Tensor:
        """Rank 0's neighbours everywhere: a tie broken differently by one GPU must not split the ranks."""
        if _distributed():
            torch.distributed.broadcast(neighbors, src=0)
        return neighbors

    def forward(self, acts: Tensor | SparseCodes, decoder_rows: Tensor, step: int) -> Tensor:
        """The raw (unweighted) C²R loss of the codes (dense ``[B, F]`` or sparse entries) and
        ``decoder_rows [F, d]`` at ``step``."""
        self.metrics = {}
        neighbors = self.neighbors(decoder_rows, step)
        return pair_loss(acts, decoder_rows, neighbors, alpha=self.alpha, across_ranks=_distributed())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The cached indices are sized on first use: take the checkpoint's size before loading into them.
        saved = state_dict.get(prefix + "cached_neighbors")
        if saved is not None:
            self.cached_neighbors = torch.empty_like(saved, device=self.cached_neighbors.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"coef={self.coef}, alpha={self.alpha}, interval={self.interval}, start_step={self.start_step}, "
            f"neighbor_search={self.neighbor_search!r}, chunk_size={self.chunk_size}, "
            f"tile_size={self.tile_size}, refresh_every={self.refresh_every}, seed={self.seed}"
        )
