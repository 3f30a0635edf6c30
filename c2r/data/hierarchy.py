"""Synthetic activations with hierarchical ground-truth features: the benchmark for absorption and splitting.

Each row is ``x = Σ_i a_i · g_i + noise`` over ground-truth features ``g_i`` (unit directions, saved as
``features.npy``) with non-negative coefficients ``a_i`` (the row's *code*). The features are laid out as

- ``0 … P−1``: **parents**;
- ``P … P + P·C − 1``: their **children**, ``C = children_per_parent`` per parent (parent ``p`` owns
  ``P + p·C … P + p·C + C − 1``);
- the rest: **independent** features, with no parent and no children.

Parents and independent features are *roots*. Root ``r`` (parents first, then independent features) fires with
probability ``p_r = c · (r + 1)^−zipf_exponent`` in each row, ``c`` chosen so that the expected number of active
features per row is ``l0``. With ``hierarchy=True``, when a parent fires one of its children (uniformly chosen)
fires too with probability ``child_prob``; children never fire without their parent and siblings are mutually
exclusive. With ``hierarchy=False`` the same features fire with the same marginal rates but independently (each
child with probability ``p_parent · child_prob / C``): the control in which an SAE has no reason to absorb.
``correlation > 0`` correlates the firing of roots in consecutive groups of ``correlation_group_size`` through a
shared Gaussian factor (a Gaussian copula: each root keeps its marginal rate, pairs in a group get latent
correlation ``correlation``). Active coefficients are uniform in ``[magnitude_min, magnitude_max]``.

The directory holds, next to the ordinary shards: ``features.npy`` (``[G, d]``), ``parents.npy`` (``[G]`` int64,
the parent of each feature, −1 for roots), ``ground_truth.json`` (the layout and firing probabilities) and, per
shard, ``codes_00000.npz``: every row's code as a sparse CSR matrix (``indptr``, ``indices``, ``values``), so an
evaluation reads the exact truth behind each row without regenerating anything. :func:`load_ground_truth` reads
all of it back (and the dictionary alone from any directory with a ``features.npy``, such as ``data=synthetic``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from c2r.data.shards import check_shard_split, shard_name
from c2r.data.synthetic import FEATURES_FILE, GeneratedShards, check_magnitudes

GENERATOR_VERSION = 2  # 2: streams named in c2r.seeds
PARENTS_FILE = "parents.npy"
GROUND_TRUTH_FILE = "ground_truth.json"


def codes_name(shard_file: str) -> str:
    """File name of the codes that belong to shard file ``shard_file`` (``shard_00003.npy`` → ``codes_00003.npz``)."""
    return shard_file.replace("shard_", "codes_", 1).removesuffix(".npy") + ".npz"


@dataclass
class GroundTruth:
    """What is known about the features behind a shard directory.

    ``features [G, d]``: unit directions in the raw (unnormalised) activation space. ``parents [G]``: the parent of
    each feature, −1 for a root; ``None`` when the data has no hierarchy. ``directory``: where per-shard codes are
    read from (``None`` when there are none).
    """

    features: Tensor
    parents: Tensor | None = None
    directory: Path | None = None

    @property
    def has_codes(self) -> bool:
        return self.directory is not None

    def children(self) -> dict[int, list[int]]:
        """``{parent: [children]}`` for every feature that has children."""
        out: dict[int, list[int]] = {}
        if self.parents is not None:
            for child, parent in enumerate(self.parents.tolist()):
                if parent >= 0:
                    out.setdefault(parent, []).append(child)
        return out

    def codes(self, shard_file: str, start: int = 0, stop: int | None = None) -> Tensor:
        """The dense codes ``[stop − start, G]`` (float32) of rows ``start:stop`` of shard file ``shard_file``."""
        if self.directory is None:
            raise ValueError("this ground truth has no per-row codes")
        with np.load(self.directory / codes_name(shard_file)) as csr:
            indptr = csr["indptr"]
            stop = len(indptr) - 1 if stop is None else stop
            lo, hi = int(indptr[start]), int(indptr[stop])
            rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
            dense = np.zeros((stop - start, self.features.shape[0]), dtype=np.float32)
            dense[rows, csr["indices"][lo:hi]] = csr["values"][lo:hi]
        return torch.from_numpy(dense)


def load_ground_truth(shard_dir: str | Path) -> GroundTruth | None:
    """The ground truth saved in ``shard_dir``, or ``None`` if it has none (e.g. harvested LM activations)."""
    shard_dir = Path(shard_dir)
    if not (shard_dir / FEATURES_FILE).is_file():
        return None
    features = torch.from_numpy(np.load(shard_dir / FEATURES_FILE)).float()
    parents = None
    if (shard_dir / PARENTS_FILE).is_file():
        parents = torch.from_numpy(np.load(shard_dir / PARENTS_FILE)).long()
    has_codes = (shard_dir / GROUND_TRUTH_FILE).is_file()
    return GroundTruth(features=features, parents=parents, directory=shard_dir if has_codes else None)


class HierarchicalShards(GeneratedShards):
    """Shard source for generated hierarchical sparse-feature data (see the module docstring), cached under
    ``cache_dir/synthetic/<hash of every parameter>`` together with its ground truth."""

    def __init__(
        self,
        *,
        d: int = 64,
        n_parents: int = 16,
        children_per_parent: int = 4,
        n_independent: int = 64,
        l0: float = 6.0,
        child_prob: float = 0.75,
        hierarchy: bool = True,
        zipf_exponent: float = 0.5,
        correlation: float = 0.0,
        correlation_group_size: int = 4,
        magnitude_min: float = 0.5,
        magnitude_max: float = 1.5,
        noise_std: float = 0.0,
        orthogonal: bool = False,
        rows: int = 262144,
        rows_per_shard: int = 16384,
        val_shards: int = 2,
        seed: int = 0,
        cache_dir: str | Path,
    ):
        self.d = int(d)
        self.n_parents = int(n_parents)
        self.children_per_parent = int(children_per_parent)
        self.n_independent = int(n_independent)
        self.l0 = float(l0)
        self.child_prob = float(child_prob)
        self.hierarchy = bool(hierarchy)
        self.zipf_exponent = float(zipf_exponent)
        self.correlation = float(correlation)
        self.correlation_group_size = int(correlation_group_size)
        self.magnitude_min = float(magnitude_min)
        self.magnitude_max = float(magnitude_max)
        self.noise_std = float(noise_std)
        self.orthogonal = bool(orthogonal)
        self.rows = int(rows)
        self.rows_per_shard = int(rows_per_shard)
        self.val_shards = int(val_shards)
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir)
        self._validate()

    # ---- layout ------------------------------------------------------------------------------------
    @property
    def n_children(self) -> int:
        return self.n_parents * self.children_per_parent

    @property
    def n_roots(self) -> int:
        return self.n_parents + self.n_independent

    @property
    def n_features(self) -> int:
        return self.n_parents + self.n_children + self.n_independent

    def parents(self) -> Tensor:
        """The parent of each feature (``[G]`` long), −1 for roots."""
        parents = torch.full((self.n_features,), -1, dtype=torch.long)
        parents[self.n_parents : self.n_parents + self.n_children] = torch.arange(self.n_parents).repeat_interleave(
            self.children_per_parent
        )
        return parents

    def root_probabilities(self) -> Tensor:
        """Per-row firing probability of each root (``[n_roots]`` float64; parents first)."""
        weights = torch.arange(1, self.n_roots + 1, dtype=torch.float64).pow(-self.zipf_exponent)
        features_per_firing = torch.ones(self.n_roots, dtype=torch.float64)
        features_per_firing[: self.n_parents] += self.child_prob  # a parent brings a child along that often
        return weights * (self.l0 / (weights * features_per_firing).sum())

    def _validate(self) -> None:
        if self.d < 1:
            raise ValueError(f"d must be >= 1, got {self.d}")
        if self.n_parents < 0 or self.n_independent < 0 or self.children_per_parent < 0:
            raise ValueError("n_parents, children_per_parent and n_independent must be >= 0")
        if self.n_roots < 1:
            raise ValueError("need at least one root feature: set n_parents or n_independent > 0")
        if self.n_parents > 0 and self.children_per_parent < 1:
            raise ValueError("parents need children: set children_per_parent >= 1 (or n_parents=0)")
        if not 0 <= self.child_prob <= 1:
            raise ValueError(f"child_prob must be in [0, 1], got {self.child_prob}")
        if not self.l0 > 0:
            raise ValueError(f"l0 (expected active features per row) must be > 0, got {self.l0}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0 (0 = every root equally frequent), got {self.zipf_exponent}")
        top = float(self.root_probabilities()[0])
        if top > 1:
            raise ValueError(
                f"l0={self.l0} needs the most frequent root to fire with probability {top:.2f} > 1 at "
                f"zipf_exponent={self.zipf_exponent}: lower l0 or zipf_exponent, or add features"
            )
        if not 0 <= self.correlation < 1:
            raise ValueError(f"correlation must be in [0, 1), got {self.correlation}")
        if self.correlation_group_size < 2 and self.correlation > 0:
            raise ValueError(f"correlation_group_size must be >= 2, got {self.correlation_group_size}")
        check_magnitudes(self.magnitude_min, self.magnitude_max, self.noise_std)
        if self.orthogonal and self.n_features > self.d:
            raise ValueError(
                f"orthogonal=true needs n_features <= d, but there are {self.n_features} features in d={self.d}"
            )
        check_shard_split(self.rows, self.rows_per_shard, self.val_shards)

    # ---- identity ----------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Every parameter that changes the generated data (recorded in the manifest's ``source``)."""
        return {
            "kind": "synthetic_hierarchy",
            "generator_version": GENERATOR_VERSION,
            "d": self.d,
            "n_parents": self.n_parents,
            "children_per_parent": self.children_per_parent,
            "n_independent": self.n_independent,
            "l0": self.l0,
            "child_prob": self.child_prob,
            "hierarchy": self.hierarchy,
            "zipf_exponent": self.zipf_exponent,
            "correlation": self.correlation,
            "correlation_group_size": self.correlation_group_size,
            "magnitude_min": self.magnitude_min,
            "magnitude_max": self.magnitude_max,
            "noise_std": self.noise_std,
            "orthogonal": self.orthogonal,
            "rows": self.rows,
            "rows_per_shard": self.rows_per_shard,
            "val_shards": self.val_shards,
            "seed": self.seed,
        }

    # ---- generation --------------------------------------------------------------------------------
    def _make_features(self, gen: torch.Generator) -> Tensor:
        """Random unit directions (orthonormal with ``orthogonal``)."""
        directions = torch.randn(self.n_features, self.d, generator=gen, dtype=torch.float64)
        if self.orthogonal:
            directions = torch.linalg.qr(directions.T).Q.T
        return (directions / directions.norm(dim=1, keepdim=True)).float()

    def ground_truth(self) -> GroundTruth:
        """The truth of the cached directory (generated first if needed)."""
        return load_ground_truth(self.ensure())

    def _fire_roots(self, n: int, gen: torch.Generator) -> Tensor:
        """``[n, n_roots]`` bool: which roots fire in each row."""
        probs = self.root_probabilities()
        if self.correlation == 0:
            return torch.rand(n, self.n_roots, generator=gen, dtype=torch.float64) < probs
        groups = torch.arange(self.n_roots) // self.correlation_group_size
        shared = torch.randn(n, int(groups.max()) + 1, generator=gen, dtype=torch.float64)[:, groups]
        own = torch.randn(n, self.n_roots, generator=gen, dtype=torch.float64)
        latent = self.correlation**0.5 * shared + (1 - self.correlation) ** 0.5 * own
        return latent < torch.special.ndtri(probs)

    def sample_shard(self, index: int) -> tuple[Tensor, Tensor]:
        """Rows of shard ``index`` as ``(x [n, d], codes [n, G])``; each shard has its own seeded stream."""
        n = self.shard_rows(index)
        gen = self._shard_generator(index)
        P, C = self.n_parents, self.children_per_parent
        roots = self._fire_roots(n, gen)
        active = torch.zeros(n, self.n_features, dtype=torch.bool)
        active[:, :P] = roots[:, :P]
        active[:, P + self.n_children :] = roots[:, P:]
        if P:
            parent_probs = self.root_probabilities()[:P]
            if self.hierarchy:
                with_child = roots[:, :P] & (torch.rand(n, P, generator=gen, dtype=torch.float64) < self.child_prob)
                which = torch.randint(C, (n, P), generator=gen)
                child = P + torch.arange(P) * C + which  # [n, P], distinct columns in each row
                active.scatter_(1, child, with_child)
            else:
                rates = (parent_probs * self.child_prob / C).repeat_interleave(C)
                active[:, P : P + self.n_children] = torch.rand(n, self.n_children, generator=gen, dtype=torch.float64) < rates
        magnitudes = torch.empty(n, self.n_features).uniform_(self.magnitude_min, self.magnitude_max, generator=gen)
        codes = magnitudes * active
        x = codes @ self.features()
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n, self.d, generator=gen)
        return x, codes

    # ---- what is saved beside the shards -------------------------------------------------------------
    def _save_truth(self, directory: Path) -> None:
        super()._save_truth(directory)
        np.save(directory / PARENTS_FILE, self.parents().numpy())
        probs = self.root_probabilities()
        truth = {
            "params": self.params(),
            "n_features": self.n_features,
            "parents": list(range(self.n_parents)),
            "children": {
                str(p): list(range(self.n_parents + p * self.children_per_parent,
                                   self.n_parents + (p + 1) * self.children_per_parent))
                for p in range(self.n_parents)
            },
            "independent": list(range(self.n_parents + self.n_children, self.n_features)),
            "root_firing_probability": probs.tolist(),
        }
        (directory / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=1))

    def _save_shard_truth(self, directory: Path, index: int, sample: tuple[Tensor, ...]) -> None:
        """Every row's code as a sparse CSR matrix, so an evaluation reads the truth behind each row."""
        codes = sample[1]
        nonzero = codes.nonzero()
        indptr = np.zeros(len(codes) + 1, dtype=np.int64)
        np.cumsum(np.bincount(nonzero[:, 0].numpy(), minlength=len(codes)), out=indptr[1:])
        np.savez(
            directory / codes_name(shard_name(index)),
            indptr=indptr,
            indices=nonzero[:, 1].numpy().astype(np.int32),
            values=codes[nonzero[:, 0], nonzero[:, 1]].numpy(),
        )
