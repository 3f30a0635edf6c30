"""What both sides of ``batchtopk_parity.py`` share: the rows, their order and the metrics. Imported by c2r's
interpreter and by SAELens's (``saelens_train.py``), so it needs numpy and torch only, never c2r: a shard folder
is read through its ``manifest.json`` alone, rows normalised by the manifest's ``normalization_factor``
(E‖x‖² = 1, as c2r trains), and every metric is computed by the same code for both trainers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


SMOLLM2 = "activations/smollm2-135m_blocks.5.hook_resid_post_d53c4fdb8b30c1eb"
"""The SmolLM2 default's shards under the cache folder (``python -m c2r.train`` harvests them on first use)."""


def load_rows(shard_dir: str | Path, split: str) -> Tensor:
    """Every row of ``split`` ("train" or "val"), in shard order, normalised (float32)."""
    shard_dir = Path(shard_dir)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    files = [entry["file"] for entry in manifest["shards"] if entry["split"] == split]
    rows = np.concatenate([np.load(shard_dir / name).astype(np.float32) for name in files])
    return torch.from_numpy(rows) * float(manifest["normalization_factor"])


def ground_truth_features(shard_dir: str | Path) -> Tensor | None:
    """The true feature directions ``[G, d]`` of generated data, ``None`` for LM activations."""
    path = Path(shard_dir) / "features.npy"
    return torch.from_numpy(np.load(path)).float() if path.is_file() else None


def batch_order(n_rows: int, steps: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """The row indices of each training batch: epochs of seeded permutations, read in consecutive slices; the
    same sequence in both interpreters (numpy's PCG64 draws, not torch's)."""
    rng = np.random.default_rng(seed)
    pending = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(n_rows)])
        yield torch.from_numpy(pending[:batch_size])
        pending = pending[batch_size:]


def inference_metrics(
    x: Tensor, encode, decode, W_dec: Tensor, features: Tensor | None, chunk: int = 8192
) -> dict[str, float | int]:
    """FVU (``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over all rows), mean L0, dead latents (firing on no row) and, with
    ground truth, ``coverage``: the share of true features with a live decoder row at cosine ≥ 0.9.
    ``encode``/``decode`` are the SAE's inference functions; ``x`` is in the space they expect."""
    error = total = active = 0.0
    fired = torch.zeros(W_dec.shape[0], dtype=torch.bool)
    mean = x.mean(dim=0)
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            rows = x[start : start + chunk]
            codes = encode(rows)
            error += float((decode(codes) - rows).double().pow(2).sum())
            total += float((rows - mean).double().pow(2).sum())
            active += float((codes != 0).sum())
            fired |= (codes != 0).any(dim=0)
    out: dict[str, float | int] = {"fvu": error / total, "l0": active / len(x), "dead": int((~fired).sum())}
    if features is not None:
        directions = W_dec.detach().float() / W_dec.detach().float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (features / features.norm(dim=1, keepdim=True)) @ directions[fired].T
        out["coverage"] = float((cos.max(dim=1).values >= 0.9).double().mean()) if fired.any() else 0.0
    return out
