"""Metrics against a known ground truth: coverage, splitting, absorption and hedging.

Notation: ground-truth features ``g_i`` (unit directions in the evaluated space, :class:`GroundTruth`), a row's
true code ``a`` (``a_i > 0`` iff feature i is active), SAE codes ``f = encode(x)`` and decoder rows ``W_j``.
A latent is *live* when it fires (``f_j ≠ 0``) on at least one evaluated row; only live latents can match a
feature.

Dictionary metrics (every ground-truth feature):

- ``mmcs``: mean over features of ``max_j cos(g_i, W_j)`` over live latents;
- ``coverage``: share of features with a live latent at ``cos(g_i, W_j) ≥ coverage_threshold`` (default 0.9);
- ``splitting@τ``: mean over features of ``max(0, #{live j : cos(g_i, W_j) ≥ τ} − 1)``, the latents beyond the
  first that point at the same feature (a duplicated latent counts as one split), reported for each τ of
  ``split_thresholds`` (default 0.5, 0.7, 0.9); ``split_features@τ`` = share of features with at least one split.
  A latent for "parent and child together" (direction ∝ g_p + g_c) has cosine ≈ 0.71 to both, so it counts as a
  split of the parent at τ ≤ 0.7 but not at 0.9.

Hierarchy metrics (every parent p with children C(p); data with ``parents.npy``). The *parent latent* m(p) is the
live latent with the largest decoder cosine to g_p among its ``n_candidates`` best (a parent whose best live
latent has cosine below ``min_match_cos`` is *unmatched*: its metrics are null). Rows where p is active split
into ``A`` (some child of p active too) and ``B`` (p active without a child). Full absorption and the absorption
fraction compare A and B **within strata** of rows with the same number n of active features (``Σ_n w_n [A_n − B_n]``,
``w_n`` = share of A's rows in stratum n, over the strata that have rows of both): a row of A has one more active
feature than a row of B otherwise, and under TopK an extra feature alone crowds latents out; stratified, an SAE
trained without a hierarchy scores ≈ 0.

- ``full_absorption`` = ``Σ_n w_n [P(f_m = 0 | A, n) − P(f_m = 0 | B, n)]``: how much more often the parent latent
  is silent when a child fires than when the parent fires alone (0 for a faithful latent; 1 when children switch
  it off entirely; not clipped, so noise averages out);
- ``partial_absorption`` = 1 − r_A / r_B with ``r_S = Σ_{S, f_m>0} f_m / Σ_{S, f_m>0} a_p`` (not stratified): the
  relative loss of the parent latent's magnitude (per unit of true parent magnitude) when a child fires, over rows
  where it fires at all (full absorption is excluded, it is measured above); negative when it fires more strongly
  next to a child;
- ``absorption_fraction`` = ``Σ_n w_n [s̄(A, n) − s̄(B, n)]``, with ``s̄`` the mean over the rows of
  ``s = (⟨Σ_{j≠m} f_j W_j, g_p⟩ − ⟨Σ_{i≠p} a_i g_i, g_p⟩) / a_p``: the share of the parent's true component that the
  *other* latents carry, beyond what the other active features' directions contribute to g_p by themselves, when
  a child fires compared with when it does not (0 when every other latent reconstructs its own feature; 1 when
  e.g. child latents carry the whole parent); the decoder bias is not a latent and is left out;
- ``hedging_decoder`` / ``hedging_encoder`` = ‖Q^T u‖ for the unit decoder row / encoder column u of m(p), with Q
  an orthonormal basis of the children's directions made orthogonal to g_p: how much of the parent latent's
  direction lies along its children (0 = none; ``g_p`` itself scores 0 even when features are not orthogonal);
  ``child_alignment_decoder`` / ``_encoder`` = mean over children of ``⟨u, ĝ_c⟩`` with ĝ_c the unit component of
  g_c orthogonal to g_p: positive when children are mixed in (hedging), negative when they are subtracted (the
  encoder of an absorbing parent latent, which children switch off).

A parent needs at least ``min_events`` rows in A and in B (and, for partial absorption, rows where m(p) fires in
each) for its absorption metrics; otherwise they are null. Summaries average over the parents where defined
(``*_parents`` says how many).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from c2r.data.hierarchy import GroundTruth, load_ground_truth
from c2r.evaluation.base import EvalContext, NotApplicable, nan_to_none
from c2r.evaluation.data import RowBatch


def feature_latent_cosines(features: Tensor, decoder_rows: Tensor, *, tile_size: int = 1024):
    """Yield ``(start, cos [tile, F])``: cosines of features ``start:start+tile`` to every decoder row (float64)."""
    unit_latents = F.normalize(decoder_rows.detach().double(), dim=1)
    unit_features = F.normalize(features.detach().double(), dim=1).to(unit_latents.device)
    for start in range(0, unit_features.shape[0], tile_size):
        yield start, unit_features[start : start + tile_size] @ unit_latents.T


def dictionary_metrics(
    features: Tensor,
    decoder_rows: Tensor,
    live: Tensor,
    *,
    split_thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
    coverage_threshold: float = 0.9,
    tile_size: int = 1024,
) -> tuple[dict, dict[str, Tensor]]:
    """Coverage, MMCS and splitting of a dictionary against ground-truth ``features`` (module docstring), and the
    per-feature tensors behind them (``best_cos``, ``best_latent``, ``splits@τ``)."""
    best_cos = torch.full((features.shape[0],), float("nan"), dtype=torch.float64)
    best_latent = torch.full((features.shape[0],), -1, dtype=torch.long)
    splits = {t: torch.zeros(features.shape[0], dtype=torch.long) for t in split_thresholds}
    live = live.to(decoder_rows.device)
    for start, cos in feature_latent_cosines(features, decoder_rows, tile_size=tile_size):
        cos = cos.masked_fill(~live, float("-inf"))
        stop = start + cos.shape[0]
        if live.any():
            values, indices = cos.max(dim=1)
            best_cos[start:stop], best_latent[start:stop] = values.cpu(), indices.cpu()
        for t in split_thresholds:
            splits[t][start:stop] = ((cos >= t).sum(dim=1) - 1).clamp_min(0).cpu()
    covered = torch.nan_to_num(best_cos, nan=-1.0) >= coverage_threshold
    summary = {
        "features": int(features.shape[0]),
        "mmcs": nan_to_none(torch.nan_to_num(best_cos, nan=0.0).mean()),
        "coverage": float(covered.double().mean()),
        **{f"splitting@{t}": float(s.double().mean()) for t, s in splits.items()},
        **{f"split_features@{t}": float((s > 0).double().mean()) for t, s in splits.items()},
    }
    per_feature = {"best_cos": best_cos, "best_latent": best_latent, **{f"splits@{t}": s for t, s in splits.items()}}
    return summary, per_feature


def children_basis(features: Tensor, parent: int, children: list[int]) -> tuple[Tensor, Tensor]:
    """``(Q [d, r], U [C, d])``: an orthonormal basis of the children's directions made orthogonal to the parent's,
    and each child's unit component orthogonal to the parent (float64)."""
    unit = F.normalize(features.double(), dim=1)
    g = unit[parent]
    residual = unit[children] - (unit[children] @ g)[:, None] * g
    U = F.normalize(residual, dim=1)
    Q, R = torch.linalg.qr(residual.T)
    keep = R.diagonal().abs() > 1e-8 * max(1.0, float(R.abs().max()))
    return Q[:, keep], U


class GroundTruthEval:
    """Streaming accumulator of the ground-truth metrics (see the module docstring for the definitions)."""

    name = "ground_truth"

    def __init__(
        self,
        ctx: EvalContext,
        truth: GroundTruth,
        *,
        split_thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
        coverage_threshold: float = 0.9,
        min_events: int = 20,
        min_match_cos: float = 0.5,
        n_candidates: int = 8,
        tile_size: int = 1024,
    ) -> None:
        sae, device = ctx.sae, ctx.device
        if truth.features.shape[1] != sae.W_dec.shape[1]:
            raise ValueError(
                f"the ground-truth features have d={truth.features.shape[1]} but the SAE has d_in={sae.W_dec.shape[1]}"
            )
        self.ctx = ctx
        self.truth = truth
        self.split_thresholds = tuple(float(t) for t in split_thresholds)
        self.coverage_threshold = float(coverage_threshold)
        self.min_events = int(min_events)
        self.min_match_cos = float(min_match_cos)
        self.tile_size = int(tile_size)
        n_latents = sae.W_dec.shape[0]
        self.fired = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.rows = 0

        self.children = truth.children() if truth.has_codes else {}
        self.parent_ids = sorted(self.children)
        if not self.parent_ids:
            return
        P = len(self.parent_ids)
        features = truth.features.double().to(device)
        unit = F.normalize(features, dim=1)
        g_parents = unit[self.parent_ids]  # [P, d]
        decoder = sae.W_dec.detach().double().to(device)
        parent_cos = g_parents @ F.normalize(decoder, dim=1).T  # [P, F]
        K = min(int(n_candidates), n_latents)
        self.candidate_cos, self.candidates = parent_cos.topk(K, dim=1)  # [P, K], best first
        self.decoder_projection = decoder @ g_parents.T  # [F, P]: ⟨W_j, g_p⟩
        self.candidate_projection = self.decoder_projection[self.candidates, torch.arange(P, device=device)[:, None]]
        self.feature_projection = features @ g_parents.T  # [G, P]: ⟨g_i, g_p⟩
        membership = torch.zeros(features.shape[0], P, dtype=torch.float64, device=device)
        for column, parent in enumerate(self.parent_ids):
            membership[self.children[parent], column] = 1.0
        self.membership = membership
        S = MAX_STRATUM + 1
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        # Per group (A: parent with a child, B: parent alone) and stratum (number of active features in the row).
        self.n = {"A": zeros(P, S), "B": zeros(P, S)}
        self.silent = {"A": zeros(P, K, S), "B": zeros(P, K, S)}
        self.others_share = {"A": zeros(P, S), "B": zeros(P, S)}  # Σ (⟨Σ_j f_j W_j, g_p⟩ − ⟨Σ_{i≠p} a_i g_i, g_p⟩) / a_p
        self.own_share = {"A": zeros(P, K, S), "B": zeros(P, K, S)}  # Σ f_k ⟨W_k, g_p⟩ / a_p
        # Not stratified: Σ f_k and Σ a_p over the rows of each group where candidate k fires.
        self.sum_f = {"A": zeros(P, K), "B": zeros(P, K)}
        self.sum_a = {"A": zeros(P, K), "B": zeros(P, K)}

    @torch.no_grad()
    def update(self, batch: RowBatch, acts: Tensor, recon: Tensor) -> None:
        self.fired += (acts != 0).sum(dim=0).double()
        self.rows += acts.shape[0]
        if not self.parent_ids:
            return
        n_rows = acts.shape[0]
        codes = self.truth.codes(batch.shard, batch.start, batch.start + n_rows).to(acts.device).double()
        acts = acts.double()
        active = codes > 0
        strata = F.one_hot(active.sum(dim=1).clamp_max(MAX_STRATUM), MAX_STRATUM + 1).double()  # [n, S]
        a_parent = codes[:, self.parent_ids]  # [n, P]
        parent_on = a_parent > 0
        child_on = (active.double() @ self.membership) > 0
        f = acts[:, self.candidates.flatten()].view(n_rows, *self.candidates.shape)  # [n, P, K]
        firing = f > 0
        safe_a = torch.where(parent_on, a_parent, 1.0)
        share = (acts @ self.decoder_projection - (codes @ self.feature_projection - a_parent)) / safe_a  # [n, P]
        own = f * self.candidate_projection / safe_a[:, :, None]  # [n, P, K]

        def per_stratum(values: Tensor) -> Tensor:  # [n, ...] → [..., S]: sums over the rows of each stratum
            return (values.reshape(n_rows, -1).T @ strata).view(*values.shape[1:], -1)

        for key, rows in (("A", parent_on & child_on), ("B", parent_on & ~child_on)):
            mask = rows[:, :, None]
            weight = rows.double()
            self.n[key] += per_stratum(weight)
            self.silent[key] += per_stratum((mask & ~firing).double())
            self.others_share[key] += per_stratum(share * weight)
            self.own_share[key] += per_stratum(own * mask)
            self.sum_f[key] += (f * (mask & firing)).sum(dim=0)
            self.sum_a[key] += (a_parent[:, :, None] * (mask & firing)).sum(dim=0)

    def live(self) -> Tensor:
        return self.fired > 0

    def finalize(self) -> dict:
        live = self.live()
        features = self.truth.features
        summary, per_feature = dictionary_metrics(
            features,
            self.ctx.sae.W_dec.to(self.ctx.device),
            live,
            split_thresholds=self.split_thresholds,
            coverage_threshold=self.coverage_threshold,
            tile_size=self.tile_size,
        )
        result = {"summary": summary, "settings": self.settings()}
        if self.truth.parents is None or not self.truth.children():
            self.ctx.notes.append("the ground truth has no hierarchy: absorption and hedging were not computed")
        elif not self.truth.has_codes:
            self.ctx.notes.append("the ground truth has no per-row codes: absorption and hedging were not computed")
        else:
            per_parent = self.parent_metrics(live)
            result["per_parent"] = per_parent
            result["summary"].update(self.average(per_parent))
            parents = torch.tensor(self.parent_ids)
            for t in self.split_thresholds:
                result["summary"][f"splitting_parents@{t}"] = float(per_feature[f"splits@{t}"][parents].double().mean())
        if self.ctx.plot_dir is not None:
            from c2r.evaluation.plots import plot_ground_truth

            result["plots"] = [p.name for p in plot_ground_truth(self.ctx.plot_dir, result, per_feature)]
        return result

    def settings(self) -> dict:
        return {
            "split_thresholds": list(self.split_thresholds),
            "coverage_threshold": self.coverage_threshold,
            "min_events": self.min_events,
            "min_match_cos": self.min_match_cos,
            "rows": self.rows,
        }

    def parent_metrics(self, live: Tensor) -> list[dict]:
        sae = self.ctx.sae
        out = []
        for column, parent in enumerate(self.parent_ids):
            candidates_live = live[self.candidates[column]]
            choice = next(
                (
                    k
                    for k in range(self.candidates.shape[1])
                    if candidates_live[k] and self.candidate_cos[column, k] >= self.min_match_cos
                ),
                None,
            )
            entry = {
                "parent": parent,
                "children": self.children[parent],
                "rows_alone": int(self.n["B"][column].sum()),
                "rows_with_child": int(self.n["A"][column].sum()),
                "latent": None,
                "latent_cos": None,
            }
            metrics = dict.fromkeys(PARENT_METRICS)
            if choice is not None:
                latent = int(self.candidates[column, choice])
                entry["latent"], entry["latent_cos"] = latent, float(self.candidate_cos[column, choice])
                metrics.update(self.absorption(column, choice))
                metrics.update(self.hedging(parent, latent, sae))
            out.append({**entry, **{k: nan_to_none(v) if v is not None else None for k, v in metrics.items()}})
        return out

    def absorption(self, column: int, k: int) -> dict[str, float]:
        nan = float("nan")
        n_a, n_b = self.n["A"][column], self.n["B"][column]  # [S]
        both = (n_a > 0) & (n_b > 0)
        matched_a, matched_b = float(n_a[both].sum()), float(n_b[both].sum())
        out = {"full_absorption": nan, "partial_absorption": nan, "absorption_fraction": nan}
        if min(matched_a, matched_b) < self.min_events:
            return out
        weights = n_a[both] / matched_a  # strata weighted as the rows with a child

        def contrast(sum_a: Tensor, sum_b: Tensor) -> float:  # Σ_s w_s (mean over A_s − mean over B_s)
            return float((weights * (sum_a[both] / n_a[both] - sum_b[both] / n_b[both])).sum())

        out["full_absorption"] = contrast(self.silent["A"][column, k], self.silent["B"][column, k])
        out["absorption_fraction"] = contrast(
            self.others_share["A"][column] - self.own_share["A"][column, k],
            self.others_share["B"][column] - self.own_share["B"][column, k],
        )
        fired_a = float(self.n["A"][column].sum() - self.silent["A"][column, k].sum())
        fired_b = float(self.n["B"][column].sum() - self.silent["B"][column, k].sum())
        if min(fired_a, fired_b) >= self.min_events:
            ratio_a = float(self.sum_f["A"][column, k] / self.sum_a["A"][column, k])
            ratio_b = float(self.sum_f["B"][column, k] / self.sum_a["B"][column, k])
            out["partial_absorption"] = 1.0 - ratio_a / ratio_b if ratio_b > 0 else nan
        return out

    def hedging(self, parent: int, latent: int, sae) -> dict[str, float]:
        Q, U = children_basis(self.truth.features, parent, self.children[parent])
        out = {}
        for name, direction in (("decoder", sae.W_dec[latent]), ("encoder", sae.W_enc[:, latent])):
            u = F.normalize(direction.detach().double().cpu(), dim=0)
            out[f"hedging_{name}"] = float((Q.T @ u).norm())
            out[f"child_alignment_{name}"] = float((U @ u).mean())
        return out

    def average(self, per_parent: list[dict]) -> dict:
        summary = {
            "parents": len(per_parent),
            "parents_unmatched": sum(p["latent"] is None for p in per_parent),
        }
        for name in PARENT_METRICS:
            values = [p[name] for p in per_parent if p[name] is not None and math.isfinite(p[name])]
            summary[name] = sum(values) / len(values) if values else None
            summary[f"{name}_parents"] = len(values)
        return summary


MAX_STRATUM = 32
"""Rows are stratified by their number of active features, pooling rows with more than this many."""

PARENT_METRICS = (
    "full_absorption",
    "partial_absorption",
    "absorption_fraction",
    "hedging_decoder",
    "hedging_encoder",
    "child_alignment_decoder",
    "child_alignment_encoder",
)


def ground_truth_eval(ctx: EvalContext, **settings) -> GroundTruthEval:
    """Factory of the ``ground_truth`` evaluation: :class:`NotApplicable` when the shards hold no ground truth."""
    truth = load_ground_truth(ctx.rows.directory)
    if truth is None:
        raise NotApplicable(
            f"{ctx.rows.directory} has no ground truth (features.npy); use data=synthetic_hierarchy or data=synthetic"
        )
    return GroundTruthEval(ctx, truth, **settings)
