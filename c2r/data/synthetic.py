"""Synthetic activations with known sparse features, written as ordinary shards.

Each row is ``x = Σ_{i ∈ active} m_i · D_i + noise`` with ``D`` a fixed set of random unit directions
(the ground-truth dictionary, saved as ``features.npy``), exactly ``l0`` active features per row drawn
without replacement with probability ∝ firing weights, and magnitudes ``m ~ U(min, max)``. Because the
truth is known, SAE training and metrics can be tested in seconds on a CPU.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from c2r.data.shards import ShardWriter, check_shard_split
from c2r.data.sources import CachedShards, generate_once
from c2r.seeds import stream_generator

# Bump when the generated numbers change for the same parameters, so old caches are not reused.
GENERATOR_VERSION = 2  # 2: streams named in c2r.seeds
FEATURES_FILE = "features.npy"


def check_magnitudes(magnitude_min: float, magnitude_max: float, noise_std: float) -> None:
    """The settings every synthetic generator shares: active features' magnitude range and the noise level."""
    if not 0 < magnitude_min <= magnitude_max:
        raise ValueError(
            "need 0 < magnitude_min <= magnitude_max (a zero magnitude would make an 'active' "
            f"feature invisible), got {magnitude_min}, {magnitude_max}"
        )
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")


class GeneratedShards(CachedShards):
    """A generated shard source: ground-truth features (``features.npy``) and rows drawn shard by shard from seeded
    streams, cached under ``cache_dir/synthetic/<key>``. A subclass draws the features and the rows; this class
    writes them (and whatever truth the subclass saves beside them) into a directory that appears complete or
    not at all."""

    folder = "synthetic"
    d: int
    rows: int
    rows_per_shard: int
    val_shards: int
    seed: int
    _features: torch.Tensor | None = None

    @property
    def n_shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def shard_rows(self, index: int) -> int:
        """How many rows shard ``index`` holds (the last one may be smaller)."""
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard index {index} out of range [0, {self.n_shards})")
        return min(self.rows_per_shard, self.rows - index * self.rows_per_shard)

    def features(self) -> torch.Tensor:
        """The ground-truth dictionary ``[n_features, d]``, drawn once from the ``synthetic.features`` stream."""
        if self._features is None:
            self._features = self._make_features(stream_generator(self.seed, "synthetic.features"))
        return self._features

    @abstractmethod
    def _make_features(self, gen: torch.Generator) -> torch.Tensor:
        """Draw the ground-truth dictionary from ``gen``."""

    @abstractmethod
    def sample_shard(self, index: int) -> tuple[torch.Tensor, ...]:
        """Rows of shard ``index``, ``x [n, d]`` first, from the shard's own ``synthetic.rows`` stream."""

    def _shard_generator(self, index: int) -> torch.Generator:
        return stream_generator(self.seed, "synthetic.rows", index)

    def _save_truth(self, directory: Path) -> None:
        """Save what is known about the whole directory beside the shards (by default the features)."""
        np.save(directory / FEATURES_FILE, self.features().numpy())

    def _save_shard_truth(self, directory: Path, index: int, sample: tuple[torch.Tensor, ...]) -> None:
        """Save what is known about the rows of shard ``index`` (nothing by default)."""

    # ---- shard source protocol ---------------------------------------------------------------------
    def ensure(self) -> Path:
        """Generate the shards unless a complete copy is cached; return the shard directory (written into a
        temporary sibling and renamed into place, so concurrent or interrupted runs never see a partial one)."""
        return generate_once(self.shard_dir, self._write)

    def _write(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self._save_truth(directory)
        writer = ShardWriter(
            directory,
            d=self.d,
            rows_per_shard=self.rows_per_shard,
            dtype="float32",
            seed=self.seed,
            source=self.params(),
            shuffle=False,  # rows are independent already; in order, sample_shard reproduces them and truth stays aligned
        )
        for index in range(self.n_shards):
            sample = self.sample_shard(index)
            writer.add(sample[0].numpy())
            self._save_shard_truth(directory, index, sample)
        writer.finalize(val_shards=self.val_shards)

    def repr_settings(self) -> dict[str, Any]:
        hidden = ("kind", "generator_version")
        return {**{k: v for k, v in self.params().items() if k not in hidden}, "cache_dir": str(self.cache_dir)}


class SyntheticShards(GeneratedShards):
    """Shard source for generated sparse-feature data (see the module docstring), cached under
    ``cache_dir/synthetic/<key of every parameter that changes the data>``."""

    def __init__(
        self,
        *,
        d: int = 64,
        n_features: int = 256,
        l0: int = 8,
        rows: int = 131072,
        rows_per_shard: int = 16384,
        val_shards: int = 1,
        zipf_exponent: float = 0.0,
        magnitude_min: float = 0.5,
        magnitude_max: float = 1.5,
        noise_std: float = 0.0,
        seed: int = 0,
        cache_dir: str | Path,
    ):
        self.d = int(d)
        self.n_features = int(n_features)
        self.l0 = int(l0)
        self.rows = int(rows)
        self.rows_per_shard = int(rows_per_shard)
        self.val_shards = int(val_shards)
        self.zipf_exponent = float(zipf_exponent)
        self.magnitude_min = float(magnitude_min)
        self.magnitude_max = float(magnitude_max)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir)
        self._validate()

    def _validate(self) -> None:
        if self.d < 1 or self.n_features < 1:
            raise ValueError(f"d and n_features must be >= 1, got d={self.d}, n_features={self.n_features}")
        if not 1 <= self.l0 <= self.n_features:
            raise ValueError(
                f"l0 must be between 1 and n_features={self.n_features} (each row has exactly l0 "
                f"distinct active features), got l0={self.l0}"
            )
        check_shard_split(self.rows, self.rows_per_shard, self.val_shards)
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0 (0 = uniform), got {self.zipf_exponent}")
        check_magnitudes(self.magnitude_min, self.magnitude_max, self.noise_std)

    # ---- identity ----------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Every parameter that changes the generated data (recorded in the manifest's ``source``)."""
        return {
            "kind": "synthetic",
            "generator_version": GENERATOR_VERSION,
            "d": self.d,
            "n_features": self.n_features,
            "l0": self.l0,
            "rows": self.rows,
            "rows_per_shard": self.rows_per_shard,
            "val_shards": self.val_shards,
            "zipf_exponent": self.zipf_exponent,
            "magnitude_min": self.magnitude_min,
            "magnitude_max": self.magnitude_max,
            "noise_std": self.noise_std,
            "seed": self.seed,
        }

    # ---- generation --------------------------------------------------------------------------------
    def _make_features(self, gen: torch.Generator) -> torch.Tensor:
        """Random unit-norm directions."""
        directions = torch.randn(self.n_features, self.d, generator=gen, dtype=torch.float64)
        return (directions / directions.norm(dim=1, keepdim=True)).float()

    def firing_weights(self) -> torch.Tensor:
        """Relative firing weights ``(i+1)^-zipf_exponent`` (all equal when the exponent is 0)."""
        ranks = torch.arange(1, self.n_features + 1, dtype=torch.float64)
        return ranks.pow(-self.zipf_exponent)

    def sample_shard(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of shard ``index`` as ``(x [n, d], active [n, l0], magnitudes [n, l0])``.

        Each shard has its own seeded stream, so any shard can be regenerated on its own.
        """
        n = self.shard_rows(index)
        gen = self._shard_generator(index)
        active = self._sample_active(n, gen)
        magnitudes = torch.empty(n, self.l0).uniform_(self.magnitude_min, self.magnitude_max, generator=gen)
        x = torch.einsum("nl,nld->nd", magnitudes, self.features()[active])
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n, self.d, generator=gen)
        return x, active, magnitudes

    def _sample_active(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``l0`` distinct feature indices per row, drawn ∝ firing weights without replacement.

        Efraimidis–Spirakis: the ``l0`` largest keys ``u_i^(1/w_i)`` (``u`` uniform) form a weighted
        sample without replacement; we rank ``log(u_i) / w_i``, which orders the same. With uniform
        weights the keys are just ``u``. Done in row chunks so memory stays bounded for large
        ``n_features``.
        """
        weights = self.firing_weights()
        inv_w = None if self.zipf_exponent == 0 else (1.0 / (weights / weights.max())).float()
        chunk = max(1, (1 << 22) // self.n_features)
        out = []
        for start in range(0, n, chunk):
            keys = torch.rand(min(chunk, n - start), self.n_features, generator=gen)
            if inv_w is not None:
                keys = keys.clamp_(min=1e-30).log_().mul_(inv_w)
            out.append(keys.topk(self.l0, dim=1).indices)
        return torch.cat(out)
