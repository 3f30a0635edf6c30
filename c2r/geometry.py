"""Nearest neighbours among decoder directions: the searches that C²R, OrtSAE and the evaluation share.

Every search works on cosines of the rows ``W [F, d]`` without gradient, with autocast off and in at least fp32
(bf16/fp16 rows are upcast; fp64 stays fp64), because a bf16 cosine matrix picks a different argmax for a
sizeable share of rows. The one exception is :func:`top_candidates`' optional low-precision first pass, whose
pool is re-ranked in full precision. On CUDA, fp32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.

Conventions: ties go to the smallest latent index; a latent without any other latent to compare with (F == 1,
or alone in its chunk) gets itself as the sentinel ``j(i) = i``, which the losses read as "no neighbour".
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import torch
from torch import Tensor


def check_tile_size(tile_size: int) -> None:
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1 (rows of the cosine matrix computed at once), got {tile_size}")


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 2:
        raise ValueError(
            f"chunk_size must be >= 2 (a latent alone in its chunk has no neighbour), got {chunk_size}; "
            "the paper uses 8192"
        )


def full_precision(like: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on ``like``'s device, so matmuls run in the dtype we cast to."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half precisions to fp32; keep fp32 and fp64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class UnitRows(NamedTuple):
    """Rows scaled to unit norm (detached, at least fp32) and the norms they were divided by (clamped to ≥ 1e-12
    like ``F.normalize``). A C²R step normalises its decoder rows once and hands this to the re-rank, the probe and
    the pair cosines, instead of three passes over ``[F, d]``; every search here accepts it in place of rows."""

    unit: Tensor
    norms: Tensor


def unit_and_norms(rows: Tensor) -> UnitRows:
    """The one normalisation every search and C²R's pair cosines use."""
    rows = at_least_fp32(rows.detach())
    norms = torch.linalg.vector_norm(rows, dim=1).clamp_min(1e-12)
    return UnitRows(rows / norms[:, None], norms)


Rows = Tensor | UnitRows
"""Decoder rows ``[F, d]``, or their :class:`UnitRows` when a caller has already normalised them."""


def unit_rows(rows: Rows) -> Tensor:
    """The rows scaled to unit norm, detached, in at least fp32 (given, if ``rows`` is already :class:`UnitRows`)."""
    return (rows if isinstance(rows, UnitRows) else unit_and_norms(rows)).unit


def _best_of(cosines: Tensor, count: int, dim: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest cosines along ``dim`` and their positions, as ``[queries, count]``; with count == 1 the
    first maximum, so that ties go to the smallest index."""
    if dim == 0:  # a reduction along contiguous rows is ~2x faster on CPU than down the columns
        cosines = cosines.T.contiguous()
    if count == 1:
        return cosines.max(dim=1, keepdim=True)
    return cosines.topk(min(count, cosines.shape[1]), dim=1)


def _merged(found: list[tuple[Tensor, Tensor]], count: int) -> tuple[Tensor, Tensor]:
    """The best ``count`` of per-block bests given in column order (count == 1: the first maximum)."""
    values, columns = torch.cat([v for v, _ in found], dim=1), torch.cat([c for _, c in found], dim=1)
    pick = values.argmax(dim=1, keepdim=True) if count == 1 else values.topk(count, dim=1).indices
    return values.gather(1, pick), columns.gather(1, pick)


def _best_others(
    unit: Tensor, count: int, tile_size: int, dtype: torch.dtype | None = None, latents: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``count`` (≤ F-1, or 1) largest cosines of each query latent (``latents``, default all) with the *other*
    rows, and those rows' indices (``[n, count]`` each; in ``dtype`` if given). count == 1 keeps the first maximum
    (ties to the smallest index); a latent alone (F == 1) gets itself, the sentinel.

    For all latents the cosine matrix is symmetric, so only its upper triangle of ``tile_size`` blocks is computed:
    block ``U_I·U_Jᵀ`` gives block I its best among J and, transposed, block J its best among I; half the O(F²·d)
    work of a row-by-row pass, in O(tile_size²) memory. For some latents, ``tile_size`` query rows at a time against
    all rows (O(tile_size·F) memory).
    """
    rows = unit if dtype is None else unit.to(dtype)
    total = rows.shape[0]
    if latents is not None:
        values, columns = [], []
        for start in range(0, latents.shape[0], tile_size):
            tile = latents[start : start + tile_size]
            cosines = rows[tile] @ rows.T
            cosines[torch.arange(tile.shape[0], device=unit.device), tile] = float("-inf")
            best = _best_of(cosines, count, 1)
            values.append(best[0])
            columns.append(best[1])
        return torch.cat(values), torch.cat(columns)
    starts = range(0, total, tile_size)
    found: list[list[tuple[Tensor, Tensor]]] = [[] for _ in starts]  # per row block, one best per column block
    values = torch.empty(total, count, dtype=rows.dtype, device=unit.device)
    columns = torch.empty(total, count, dtype=torch.long, device=unit.device)
    for block, start in enumerate(starts):
        queries = rows[start : start + tile_size]
        for other, other_start in enumerate(starts[block:], block):
            cosines = queries @ rows[other_start : other_start + tile_size].T
            if other == block:
                cosines.fill_diagonal_(float("-inf"))
            best = _best_of(cosines, count, 1)
            found[block].append((best[0], best[1] + other_start))
            if other != block:  # the transposed block, for the later row block: blocks arrive in column order
                best = _best_of(cosines, count, 0)
                found[other].append((best[0], best[1] + start))
        end = start + queries.shape[0]
        values[start:end], columns[start:end] = _merged(found[block], count)
        found[block] = []
    return values, columns


def _argmax_other(unit: Tensor, tile_size: int, latents: Tensor | None = None) -> Tensor:
    """Index of the most similar *other* row of each query latent; ties go to the smallest index; with a single row
    the self entry wins: the sentinel."""
    return _best_others(unit, 1, tile_size, latents=latents)[1][:, 0]


@torch.no_grad()
def nearest_neighbors_exact(decoder_rows: Rows, *, tile_size: int = 4096, latents: Tensor | None = None) -> Tensor:
    """``j(i) = argmax_{j≠i} cos(W_i, W_j)`` over all F rows (LongTensor ``[F]``, or ``[n]`` for the given
    ``latents`` only, at O(n·F·d)).

    Computed ``tile_size`` rows at a time, so memory stays O(tile_size·F) rather than O(F²).
    """
    check_tile_size(tile_size)
    unit = unit_rows(decoder_rows)
    with full_precision(unit):
        return _argmax_other(unit, tile_size, latents)


@torch.no_grad()
def nearest_neighbors_chunked(
    decoder_rows: Rows,
    *,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    tile_size: int = 4096,
) -> Tensor:
    """The C²R paper's search: the neighbour of each latent among a random chunk of latents.

    A fresh permutation of the F latents (``torch.randperm(F, generator=generator)``) is cut into consecutive
    chunks of ``chunk_size`` (the last may be smaller) and each latent's neighbour is searched only inside its
    chunk. Chunk members are sorted, so ties go to the smallest index as in :func:`nearest_neighbors_exact`,
    which this equals when F <= chunk_size. Pass the same generator state on every DDP rank.
    """
    check_chunk_size(chunk_size)
    check_tile_size(tile_size)
    unit = unit_rows(decoder_rows)
    count = unit.shape[0]
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(count, generator=generator, device=perm_device).to(unit.device)
    with full_precision(unit):
        neighbors = torch.empty(count, dtype=torch.long, device=unit.device)
        for chunk in perm.split(chunk_size):
            members = chunk.sort().values
            neighbors[members] = members[_argmax_other(unit[members], tile_size)]
    return neighbors


CANDIDATE_ROWS = 16384
"""Latents whose listed cosines are computed at once, so the sparsity pattern and its values take
O(CANDIDATE_ROWS·m) memory."""


def listed_cosines(unit: Tensor, candidates: Tensor, latents: Tensor | None = None) -> Tensor:
    """``cos(W_i, W_c)`` for each query latent i (``latents``, default all) and each of its candidates c
    (``candidates [n, m]``, row r listing latent ``latents[r]``'s; each list sorted, with fewer than F entries;
    repeats allowed).

    Computed as a sampled dense-dense product (SDDMM): only the n·m listed entries of ``unit @ unit.T``, without
    gathering the n·m candidate rows into a buffer first (~3.4x faster on CPU at F=65536, m=16, d=576).
    """
    count, listed = candidates.shape
    cosines = torch.empty(candidates.shape, dtype=unit.dtype, device=unit.device)
    for start in range(0, count, CANDIDATE_ROWS):
        tile = candidates[start : start + CANDIDATE_ROWS]
        rows = tile.shape[0]
        queries = unit[start : start + rows] if latents is None else unit[latents[start : start + rows]]
        row_starts = torch.arange(0, rows * listed + 1, listed, device=unit.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": nothing a user can act on
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                row_starts, tile.reshape(-1), unit.new_zeros(rows * listed), size=(rows, unit.shape[0]),
                check_invariants=False,
            )
            product = torch.sparse.sampled_addmm(pattern, queries, unit.T, beta=0.0)
        cosines[start : start + rows] = product.values().view(rows, listed)
    return cosines


class CandidateLists(NamedTuple):
    """Each latent's ``m`` most similar other latents when the lists were made (``lists [n, m]`` long, each row
    sorted by index) and ``floors [n]``, the cosine of the most similar latent left out of the list (-inf when
    none was): how far ahead of every other latent the listed ones were."""

    lists: Tensor
    floors: Tensor


@torch.no_grad()
def top_candidates(
    decoder_rows: Rows,
    count: int,
    *,
    tile_size: int = 4096,
    first_pass_dtype: torch.dtype | None = None,
    pool: int | None = None,
    latents: Tensor | None = None,
) -> CandidateLists:
    """The ``count`` most similar other latents of each query latent (``latents``, default all; lists
    ``[n, min(count, F-1)]``), sorted by index, with their floors (:class:`CandidateLists`).

    The only O(n·F·d) work: one tiled pass over the query rows of the cosine matrix (for all latents its upper
    triangle, see :func:`_best_others`). With ``first_pass_dtype``
    (e.g. bf16 on a GPU, ~8× faster than fp32 there) that pass keeps a larger ``pool`` (default ``2·count``) of
    candidates by the low-precision cosines, which are then re-ranked by their full-precision cosines; the list
    equals the full-precision top ``count`` whenever those are inside the low-precision pool, and the floor is the
    best full-precision cosine of the pool left out. Lists sorted by index make :func:`best_candidates` break
    ties towards the smallest index, as the exact search does.
    """
    check_tile_size(tile_size)
    if count < 1:
        raise ValueError(f"candidates must be >= 1 (neighbours kept per latent), got {count}")
    unit = unit_rows(decoder_rows)
    total = unit.shape[0]
    queries = total if latents is None else latents.shape[0]
    count = min(count, total - 1)
    kept = min(count + 1, total - 1)  # one more than listed: the best latent left out gives the floor
    pool = kept if first_pass_dtype is None else min(total - 1, max(pool or 2 * count, kept))
    if kept == 0:  # a single latent: nothing to list
        return CandidateLists(torch.empty(queries, 0, dtype=torch.long, device=unit.device), unit.new_full((queries,), float("-inf")))
    with full_precision(unit):
        cosines, indices = _best_others(unit, pool, tile_size, first_pass_dtype, latents)
        if first_pass_dtype is not None:  # re-rank the low-precision pool by full-precision cosines
            indices = indices.sort(dim=1).values
            best = listed_cosines(unit, indices, latents).topk(kept, dim=1)
            indices, cosines = indices.gather(1, best.indices), best.values
    floors = cosines[:, count] if kept > count else cosines.new_full((queries,), float("-inf"))
    return CandidateLists(indices[:, :count].sort(dim=1).values, floors)


class BestListed(NamedTuple):
    """Each latent's best listed latent by the current cosines (``neighbors`` long) and that cosine (``cosines``)."""

    neighbors: Tensor
    cosines: Tensor


@torch.no_grad()
def best_candidates(decoder_rows: Rows, candidates: Tensor, latents: Tensor | None = None) -> BestListed:
    """``j(i)`` = the candidate of latent i (``latents``, default all; row r of ``candidates`` listing latent
    ``latents[r]``'s) with the highest *current* cosine, and that cosine, in O(n·m·d).

    Equals the exact global argmax whenever the true nearest neighbour is among the candidates. Latents
    without candidates (F == 1) get the sentinel ``j(i) = i`` and cosine -inf.
    """
    unit = unit_rows(decoder_rows)
    if candidates.shape[1] == 0:
        queries = torch.arange(candidates.shape[0], device=candidates.device) if latents is None else latents
        return BestListed(queries, unit.new_full(queries.shape, float("-inf")))
    with full_precision(unit):
        best = listed_cosines(unit, candidates, latents).max(dim=1, keepdim=True)
    return BestListed(candidates.gather(1, best.indices).squeeze(1), best.values.squeeze(1))
