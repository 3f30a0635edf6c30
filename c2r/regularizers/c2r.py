"""C²R, Cross-sample Consistency Regularization (docs/design.md §1).

For post-sparsity activations ``f [B, F]`` and decoder rows ``W [F, d]``::

    ŵ_i = W_i / ‖W_i‖,   n_i = ‖f[:, i]‖₂ (over the batch),
    j(i) = argmax_{j≠i} ŵ_i·ŵ_j,   s_i = max(0, ŵ_i·ŵ_{j(i)})²,
    L = (1/F) Σ_i s_i (n_i + n_{j(i)})^α.

It is computed as one mechanism in two steps:

1. a neighbour search without gradient that returns ``j`` as a LongTensor ``[F]`` (:mod:`c2r.geometry`:
   exact, the paper's chunks, or the best of each latent's candidate list);
2. :func:`pair_loss`, the differentiable loss on the gathered pairs ``(i, j(i))``, costing O(F·d + B·F) on
   dense codes and O(F·d + B·k) on the selected entries of a k-sparse SAE (:class:`~c2r.sae.SparseCodes`).
   Gradients reach ``f`` and both rows of each pair (through the normalisation); none flow through the argmax.

Latents without a neighbour (F == 1, or a latent alone in its chunk) get ``j(i) = i`` and :func:`pair_loss`
sets ``s_i = 0`` there, so they add 0 to the sum while still counting in the mean over F. The loss runs with
autocast disabled in at least fp32 (bf16/fp16 inputs are upcast; fp64 stays fp64).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed.nn.functional as distributed_functional
from torch import Tensor

from c2r.geometry import (
    BestListed,
    Rows,
    UnitRows,
    at_least_fp32,
    best_candidates,
    check_chunk_size,
    check_tile_size,
    full_precision,
    listed_cosines,
    nearest_neighbors_chunked,
    nearest_neighbors_exact,
    top_candidates,
    unit_and_norms,
)
from c2r.sae.base import SparseCodes
from c2r.seeds import stream_generator

from .base import Regularizer

NEIGHBOR_SEARCHES = ("exact", "chunked")
"""Stateless searches (:func:`find_neighbors`, :func:`c2r_loss`): "chunked" is the paper's, "exact" the global
argmax."""

C2R_NEIGHBOR_SEARCHES = ("candidates", *NEIGHBOR_SEARCHES)
"""What :class:`C2R` accepts: also "candidates", the exact argmax over per-latent lists kept between refreshes."""

REFRESH_PRECISIONS = ("auto", "float32", "bfloat16")

PROBE_STREAM, RENEWAL_PROBE_STREAM = "c2r.probe", "c2r.renewal_probe"
"""The streams that draw the probe's latents, before and after a renewal: independent samples, so the check after a
renewal is not the sample that found the misses."""


def _check_neighbor_search(neighbor_search: str, valid: tuple[str, ...] = NEIGHBOR_SEARCHES) -> None:
    if neighbor_search == "cached":
        raise ValueError(
            "C2R neighbor_search='cached' was replaced by 'candidates', which re-ranks a list of neighbours kept "
            "at each refresh on every step (candidates=1 behaves like the old 'cached'): set "
            "regularizer.neighbor_search=candidates"
        )
    if neighbor_search not in valid:
        raise ValueError(f"unknown C2R neighbor_search {neighbor_search!r}; choose one of {', '.join(map(repr, valid))}")


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"C2R alpha must be > 0 (the exponent of n_i + n_j; the paper uses 1), got {alpha}")


def find_neighbors(
    decoder_rows: Rows,
    neighbor_search: str = "exact",
    *,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    tile_size: int = 4096,
) -> Tensor:
    """Dispatch to the stateless search named by ``neighbor_search`` (one of :data:`NEIGHBOR_SEARCHES`)."""
    _check_neighbor_search(neighbor_search)
    if neighbor_search == "chunked":
        return nearest_neighbors_chunked(decoder_rows, chunk_size=chunk_size, generator=generator, tile_size=tile_size)
    return nearest_neighbors_exact(decoder_rows, tile_size=tile_size)


def latent_norms(codes: Tensor | SparseCodes, *, across_ranks: bool = False) -> Tensor:
    """``n_i = ‖f[:, i]‖₂`` over the batch (``[F]``, at least fp32), from the dense codes ``f [B, F]`` or,
    cheaper and with the same value and gradients, from their non-zero entries (:class:`SparseCodes`).

    With ``across_ranks`` the batch is the global one of a DDP job: ``Σ_b f²`` is all-reduced (summed)
    differentiably before the square root, so every rank gets the same norms and gradients flow back to each
    rank's own rows. Dead latents (``Σ f² = 0``, where the root has no derivative) get norm 0 and gradient 0.
    """
    like = codes.values if isinstance(codes, SparseCodes) else codes
    with full_precision(like):
        if isinstance(codes, SparseCodes):
            values = at_least_fp32(codes.values)
            squares = values.new_zeros(codes.dict_size).index_add(0, codes.latents, values.square())
        else:
            squares = at_least_fp32(codes).square().sum(dim=0)
        if across_ranks:
            squares = distributed_functional.all_reduce(squares)
        alive = squares > 0
        return torch.where(alive, torch.where(alive, squares, 1.0).sqrt(), 0.0)


class PairCosines(torch.autograd.Function):
    """``cos(W_i, W_{j(i)})`` for every row i (``[F]``), with the gradient written out.

    With ``ŵ = W/‖W‖`` and ``c_i = ŵ_i·ŵ_j``: ``∂c_i/∂W_i = (ŵ_j − c_i ŵ_i)/‖W_i‖`` and ``∂c_i/∂W_j = (ŵ_i −
    c_i ŵ_j)/‖W_j‖``. The forward is the sampled product of :func:`~c2r.geometry.listed_cosines` (no ``[F, d]``
    buffer of partner rows, kept until the backward); the backward gathers the partners once and passes over the
    ``[F, d]`` rows about 6 times instead of the ~20 of autograd through ``F.normalize`` and the gather (forward and
    backward 0.30 s instead of 0.44 s with a gathered forward, and ~3x faster than autograd, at F=65536, d=576 on
    CPU); tested against autograd on the plain formula. ``directions`` are the rows'
    :class:`~c2r.geometry.UnitRows` (norms clamped to ≥ 1e-12 like ``F.normalize``), computed once by the caller and
    shared with the neighbour search.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, neighbors: Tensor, directions: UnitRows) -> Tensor:
        unit, norms = directions
        cosines = listed_cosines(unit, neighbors[:, None])[:, 0]
        ctx.save_for_backward(unit, norms, cosines, neighbors)
        return cosines

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        unit, norms, cosines, neighbors = ctx.saved_tensors
        partner = unit.index_select(0, neighbors)
        toward_self = torch.addcmul(unit, partner, cosines[:, None], value=-1).mul_((grad / norms.index_select(0, neighbors))[:, None])
        toward_partner = partner.addcmul_(unit, cosines[:, None], value=-1).mul_((grad / norms)[:, None])
        return toward_partner.index_add_(0, neighbors, toward_self), None, None


def pair_similarity(decoder_rows: Tensor, neighbors: Tensor, directions: UnitRows | None = None) -> Tensor:
    """``s_i = max(0, cos(W_i, W_{j(i)}))²`` for given ``neighbors = j`` (``[F]``), 0 where ``j(i) == i`` (no
    neighbour); differentiable in the rows, in at least fp32 with autocast off. Shared by C²R and OrtSAE.
    ``directions``: the rows' :func:`~c2r.geometry.unit_and_norms` where the caller already has them."""
    with full_precision(decoder_rows):
        rows = at_least_fp32(decoder_rows)
        cosines = PairCosines.apply(rows, neighbors, unit_and_norms(rows) if directions is None else directions)
        has_neighbor = neighbors != torch.arange(neighbors.shape[0], device=neighbors.device)
        return torch.where(has_neighbor, cosines.clamp_min(0).square(), 0.0)


def pair_loss(
    acts: Tensor | SparseCodes,
    decoder_rows: Tensor,
    neighbors: Tensor,
    *,
    alpha: float = 1.0,
    across_ranks: bool = False,
    directions: UnitRows | None = None,
) -> Tensor:
    """The differentiable C²R loss (scalar) for given neighbours ``j = neighbors`` (``[F]``, long).

    Costs O(F·d + B·F) on dense codes, O(F·d + B·k) on :class:`SparseCodes`: only the F pairs ``(i, j(i))``
    are touched. Latents with ``j(i) == i`` have no
    neighbour and add 0. Gradients stay finite for dead latents (all-zero columns, where ‖·‖ has no
    derivative) and for ``n_i + n_j = 0`` with ``alpha < 1`` (where the power's derivative is infinite):
    the power is taken only on positive bases and is 0 elsewhere. ``across_ranks``: see :func:`latent_norms`;
    ``directions``: see :func:`pair_similarity`.
    """
    _check_alpha(alpha)
    norms = latent_norms(acts, across_ranks=across_ranks)
    similarity = pair_similarity(decoder_rows, neighbors, directions)
    with full_precision(norms):
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


def _same_on_all_ranks(tensor: Tensor) -> Tensor:
    """Rank 0's value everywhere: a tie broken differently by one GPU must not split the ranks."""
    if _distributed():
        torch.distributed.broadcast(tensor, src=0)
    return tensor


class C2R(Regularizer):
    """C²R as a scheduled :class:`Regularizer` (defaults: the paper's coef=5, alpha=1, interval=5).

    Neighbour search (``neighbor_search``):

    - ``"candidates"`` (default): one tiled exact pass keeps, per latent, the ``candidates`` most similar other
      latents; on every C²R step ``j(i)`` is the argmax of the *current* fp32 cosines over latent i's list
      (O(F·m·d), no O(F²) work). That is the exact ``j(i)`` whenever the true neighbour is in the list. C²R pushes
      the listed pairs apart, so lists go stale at a rate set by coef, learning rate and phase of training; a
      probe keeps them exact: on every ``probe_every``-th C²R step the lists of ``probe_latents`` random latents are
      rebuilt by an exact search of their rows (O(probe_latents·F·d)), which also tells the share of them whose
      chosen neighbour was not the exact one; as soon as that share exceeds a quarter of ``1 - target_agreement``
      the lists of the ``renew_share`` of latents most likely stale (the smallest leads, see :meth:`_renew`) are
      rebuilt too (O(renew_share·F²·d)) and, if a second probe still finds misses, all lists are refreshed; they
      are refreshed at least every ``refresh_every`` steps. ``refresh_precision``: the refresh's first pass runs
      in bf16 on CUDA (``auto``) and its pool of ``2·candidates`` is re-ranked in fp32.
    - ``"exact"``: the global argmax over all F latents at every call (tiled; O(F²·d) per call): the reference.
    - ``"chunked"``: the paper's; the permutation at a step is drawn from a generator seeded from
      ``(seed, step)``, so every DDP rank draws the same chunks at the same step and a resumed run repeats them.

    ``audit_every`` (0 = off) computes the exact neighbours on every ``audit_every``-th C²R step as well and
    logs ``exact_agreement`` (share of latents whose chosen neighbour is the exact one) and ``exact_loss_ratio``
    (loss on the chosen pairs / loss on the exact pairs): how exact the chosen search is, at O(F²·d) per audit.

    The candidate lists and their refresh state are checkpointed, so a resumed run continues with the same
    lists. Under DDP, ``n_i`` is the norm over the global batch and the neighbours are broadcast from rank 0, so
    the loss is the same on every rank and equals a single process on the concatenated batch.
    """

    def __init__(
        self,
        coef: float = 5.0,
        alpha: float = 1.0,
        interval: int = 5,
        start_step: int = 0,
        neighbor_search: str = "candidates",
        candidates: int = 16,
        refresh_every: int = 100,
        probe_latents: int = 512,
        probe_every: int = 1,
        target_agreement: float = 0.99,
        renew_share: float = 0.125,
        refresh_precision: str = "auto",
        chunk_size: int = 8192,
        tile_size: int = 4096,
        audit_every: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(coef=coef, start_step=start_step, interval=interval)
        _check_alpha(alpha)
        _check_neighbor_search(neighbor_search, C2R_NEIGHBOR_SEARCHES)
        check_chunk_size(chunk_size)
        check_tile_size(tile_size)
        if candidates < 1:
            raise ValueError(f"C2R candidates must be >= 1 (neighbours kept per latent between refreshes), got {candidates}")
        if refresh_every < 1:
            raise ValueError(f"C2R refresh_every must be >= 1 (most steps between refreshes of the lists), got {refresh_every}")
        if probe_latents < 0:
            raise ValueError(f"C2R probe_latents must be >= 0 (0 = no probe: refresh every refresh_every steps), got {probe_latents}")
        if probe_every < 1:
            raise ValueError(f"C2R probe_every must be >= 1 (C2R steps between probes of the lists), got {probe_every}")
        if not 0 < target_agreement < 1:
            raise ValueError(f"C2R target_agreement must be in (0, 1) (share of exact neighbours to keep), got {target_agreement}")
        if not 0 < renew_share <= 1:
            raise ValueError(f"C2R renew_share must be in (0, 1] (share of latents whose lists a stale probe rebuilds), got {renew_share}")
        if refresh_precision not in REFRESH_PRECISIONS:
            raise ValueError(
                f"unknown C2R refresh_precision {refresh_precision!r}; choose one of {', '.join(map(repr, REFRESH_PRECISIONS))}"
            )
        if audit_every < 0:
            raise ValueError(f"C2R audit_every must be >= 0 (0 = off, n = every n-th C2R step), got {audit_every}")
        self.alpha = float(alpha)
        self.neighbor_search = neighbor_search
        self.candidates = int(candidates)
        self.refresh_every = int(refresh_every)
        self.probe_latents = int(probe_latents)
        self.probe_every = int(probe_every)
        self.target_agreement = float(target_agreement)
        self.renew_share = float(renew_share)
        self.refresh_precision = refresh_precision
        self.chunk_size = int(chunk_size)
        self.tile_size = int(tile_size)
        self.audit_every = int(audit_every)
        self.seed = int(seed)
        # "candidates" state, checkpointed: the lists and their floors (sized at the first refresh, when F is
        # known), when they were refreshed, how many refreshes, renewals and calls so far (the extra state).
        self.register_buffer("candidate_lists", torch.empty(0, 0, dtype=torch.long))
        self.register_buffer("candidate_floors", torch.empty(0))
        self.refreshed_at = -1
        self.refreshes = 0
        self.renewals = 0
        self.calls = 0
        # What the last refresh found; reported on every call until the next refresh, so that it reaches the
        # logger whatever the logging interval; likewise the last probe's.
        self.refresh_metrics: dict[str, Tensor] = {}
        self.probe_metrics: dict[str, Tensor] = {}

    @torch.no_grad()
    def neighbors(self, decoder_rows: Rows, step: int) -> Tensor:
        """``j(i)`` for every latent at ``step`` (no gradient), identical on every DDP rank."""
        if not isinstance(decoder_rows, UnitRows):
            decoder_rows = unit_and_norms(decoder_rows)  # once, for the re-rank, the probe and a renewal
        if self.neighbor_search == "candidates":
            if self.candidate_lists.shape[0] != decoder_rows.unit.shape[0] or step - self.refreshed_at >= self.refresh_every:
                return _same_on_all_ranks(self.refresh(decoder_rows, step))
            best = best_candidates(decoder_rows, self.candidate_lists)
            chosen = best.neighbors
            if self.probe_latents and self.calls % self.probe_every == 0:
                chosen = self._probe(decoder_rows, best, step)
            return _same_on_all_ranks(chosen)
        generator = stream_generator(self.seed, "c2r.chunks", step) if self.neighbor_search == "chunked" else None
        return _same_on_all_ranks(
            find_neighbors(
                decoder_rows, self.neighbor_search, chunk_size=self.chunk_size, generator=generator, tile_size=self.tile_size
            )
        )

    @torch.no_grad()
    def refresh(self, decoder_rows: Rows, step: int) -> Tensor:
        """Recompute the candidate lists (the only O(F²·d) work of this mode), log how many of the fresh exact
        neighbours the old lists held, and return those exact neighbours (the best of the fresh lists)."""
        fresh = top_candidates(
            decoder_rows, self.candidates, tile_size=self.tile_size, first_pass_dtype=self._first_pass_dtype(decoder_rows)
        )
        old = self.candidate_lists
        self.candidate_lists = _same_on_all_ranks(fresh.lists)
        self.candidate_floors = _same_on_all_ranks(fresh.floors)
        exact = best_candidates(decoder_rows, self.candidate_lists).neighbors
        if old.shape == self.candidate_lists.shape and old.shape[1] > 0:
            self.refresh_metrics["candidate_recall"] = (old == exact[:, None]).any(dim=1).float().mean()
        self.refreshed_at = step
        self.refreshes += 1
        self.refresh_metrics["refreshes"] = torch.tensor(float(self.refreshes))
        return exact

    @torch.no_grad()
    def _probe(self, decoder_rows: UnitRows, best: BestListed, step: int) -> Tensor:
        """The probe and what it asks for; returns the chosen neighbours after it. The probed lists are rebuilt
        (a rolling refresh); when too many probed latents were wrong, the ``renew_share`` with the smallest leads
        are rebuilt as well and a second probe decides whether all lists must be refreshed."""
        chosen, leads = best.neighbors, best.cosines - self.candidate_floors
        misses = self._renew(decoder_rows, chosen, leads, self._sample(step, PROBE_STREAM))
        self.probe_metrics = {"probe_agreement": 1 - misses}
        if not self._too_many(misses):
            return chosen
        self._renew(decoder_rows, chosen, leads, chosen.new_empty(0), math.ceil(self.renew_share * chosen.shape[0]))
        self.renewals += 1
        self.refresh_metrics["renewals"] = torch.tensor(float(self.renewals))
        if self._too_many(self._renew(decoder_rows, chosen, leads, self._sample(step, RENEWAL_PROBE_STREAM))):
            return self.refresh(decoder_rows, step)
        return chosen

    @torch.no_grad()
    def _renew(
        self, decoder_rows: UnitRows, chosen: Tensor, leads: Tensor, sample: Tensor, at_risk: int = 0
    ) -> Tensor:
        """Rebuild, by an exact search of their rows (O(n·F·d)), the lists of the ``sample`` latents and of the
        ``at_risk`` latents with the smallest ``leads``; set their ``chosen`` neighbours to the exact ones, their
        leads to +inf (fresh), and return the share of the sample whose chosen neighbour was not the exact one.

        A list goes stale when a latent left out of it overtakes the best listed one. Its lead, the current cosine of
        the best listed latent minus the floor (the best left-out cosine when the list was made), is how far the
        outsiders must climb for that: C²R pushes each chosen pair apart, so leads shrink, and the smallest leads
        hold most of the stale lists (docs/design.md §1).
        """
        rows = torch.cat([sample, leads.topk(min(at_risk, leads.shape[0]), largest=False).indices])
        rows = _same_on_all_ranks(rows)
        fresh = top_candidates(
            decoder_rows, self.candidates, tile_size=self.tile_size, first_pass_dtype=self._first_pass_dtype(decoder_rows),
            latents=rows,
        )
        lists, floors = _same_on_all_ranks(fresh.lists), _same_on_all_ranks(fresh.floors)
        exact = best_candidates(decoder_rows, lists, latents=rows).neighbors
        misses = (chosen[sample] != exact[: sample.shape[0]]).float().mean() if sample.numel() else leads.new_zeros(())
        self.candidate_lists[rows], self.candidate_floors[rows] = lists, floors
        chosen[rows], leads[rows] = exact, float("inf")
        return _same_on_all_ranks(misses)

    def _sample(self, step: int, stream: str) -> Tensor:
        """``probe_latents`` random latents, drawn from ``stream`` at ``step``: the same sample on every DDP rank."""
        count = self.candidate_lists.shape[0]
        sample = torch.randperm(count, generator=stream_generator(self.seed, stream, step))[: self.probe_latents]
        return sample.to(self.candidate_lists.device)

    def _too_many(self, misses: Tensor) -> bool:
        """More misses than a quarter of what the target allows (a device->host read)."""
        return bool(misses > (1 - self.target_agreement) / 4)

    def _first_pass_dtype(self, decoder_rows: Rows) -> torch.dtype | None:
        on_cuda = (decoder_rows.unit if isinstance(decoder_rows, UnitRows) else decoder_rows).is_cuda
        if self.refresh_precision == "bfloat16" or (self.refresh_precision == "auto" and on_cuda):
            return torch.bfloat16
        return None

    def forward(self, acts: Tensor | SparseCodes, decoder_rows: Tensor, step: int) -> Tensor:
        """The raw (unweighted) C²R loss of the codes (dense ``[B, F]`` or sparse entries) and
        ``decoder_rows [F, d]`` at ``step``."""
        with torch.no_grad(), full_precision(decoder_rows):
            directions = unit_and_norms(decoder_rows)
        neighbors = self.neighbors(directions, step)
        self.metrics = {**self.refresh_metrics, **self.probe_metrics}
        loss = pair_loss(acts, decoder_rows, neighbors, alpha=self.alpha, across_ranks=_distributed(), directions=directions)
        if self.audit_every and self.calls % self.audit_every == 0:
            self._audit(acts, decoder_rows, directions, neighbors, loss.detach(), step)
        self.calls += 1
        return loss

    @torch.no_grad()
    def _audit(
        self, acts: Tensor | SparseCodes, decoder_rows: Tensor, directions: UnitRows, chosen: Tensor, loss: Tensor, step: int
    ) -> None:
        exact = _same_on_all_ranks(nearest_neighbors_exact(directions, tile_size=self.tile_size))
        exact_loss = pair_loss(acts, decoder_rows, exact, alpha=self.alpha, across_ranks=_distributed(), directions=directions)
        self.metrics["exact_agreement"] = (chosen == exact).float().mean()
        self.metrics["exact_loss_ratio"] = torch.where(exact_loss > 0, loss / exact_loss, 1.0)
        if self.neighbor_search == "candidates":
            self.metrics["steps_since_refresh"] = torch.tensor(float(step - self.refreshed_at))

    def get_extra_state(self) -> dict[str, Any]:
        return {"refreshed_at": self.refreshed_at, "refreshes": self.refreshes, "renewals": self.renewals, "calls": self.calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.refreshed_at, self.refreshes, self.calls = state["refreshed_at"], state["refreshes"], state["calls"]
        self.renewals = state.get("renewals", 0)  # checkpoints from before renewals existed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The lists are sized at the first refresh: take the checkpoint's size before loading into them.
        saved = state_dict.get(prefix + "candidate_lists")
        if saved is not None:
            # Checkpoints from before floors: none known, so a renewal picks arbitrary lists until the next refresh.
            floors = state_dict.setdefault(prefix + "candidate_floors", torch.full(saved.shape[:1], float("-inf")))
            self.candidate_lists = torch.empty_like(saved, device=self.candidate_lists.device)
            self.candidate_floors = torch.empty_like(floors, device=self.candidate_floors.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.schedule}, alpha={self.alpha}, "
            f"neighbor_search={self.neighbor_search!r}, candidates={self.candidates}, refresh_every={self.refresh_every}, "
            f"probe_latents={self.probe_latents}, probe_every={self.probe_every}, target_agreement={self.target_agreement}, renew_share={self.renew_share}, chunk_size={self.chunk_size}, tile_size={self.tile_size}, "
            f"seed={self.seed}"
        )
