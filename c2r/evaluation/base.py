"""What every evaluation shares: the SAE interface it relies on, its context and the streaming protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from c2r.evaluation.data import EvalRows, RowBatch


class NotApplicable(Exception):
    """Raised by an evaluation's factory when the data cannot support it (no ground truth, not from an LM): left
    out quietly under ``evals="auto"``, a note when the evaluation was asked for by name."""


class SAELike(Protocol):
    """What the evaluations use of an SAE: an exported one from ``c2r.load_sae`` (raw activations) or one in
    training (normalised activations: pass rows in its scale) both fit."""

    W_enc: Tensor  # [d, F]
    W_dec: Tensor  # [F, d]

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, acts: Tensor) -> Tensor: ...


@dataclass
class EvalContext:
    """Everything an evaluation may read: the SAE, the rows it is evaluated on (and through ``rows.manifest`` the
    data's provenance: model, hook, dataset), the shard source that made them (for the language-model evals: a
    :class:`~c2r.data.HarvestedShards` knows its model, hook and text), the device and the folder its plots go to.
    """

    sae: SAELike
    rows: EvalRows
    device: torch.device
    plot_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    source: Any = None
    _language_model: Any = field(default=None, repr=False)

    def language_model(self) -> Any:
        """The LM the rows were harvested from, loaded once and shared by every evaluation that needs it;
        ``None`` when the source is not a language model (synthetic data, bare shard folders)."""
        if self._language_model is None and hasattr(self.source, "load_model"):
            self._language_model = self.source.load_model()
        return self._language_model


class StreamingEval(Protocol):
    """One evaluation fed by the shared pass over the rows (each batch is encoded once for all evaluations).

    ``update`` sees every batch with its SAE codes and reconstruction; ``finalize`` returns the results (plain
    JSON-able values) and writes its plots into ``ctx.plot_dir`` when that is set.
    """

    name: str

    def update(self, batch: RowBatch, acts: Tensor, recon: Tensor) -> None: ...

    def finalize(self) -> dict: ...


def histogram(values: Tensor, bins: int, low: float, high: float) -> dict[str, list[float]]:
    """``{"edges": [bins + 1], "counts": [bins]}`` of ``values`` clipped into ``[low, high]``."""
    values = values.detach().double().cpu().clamp(low, high)
    counts = torch.histc(values, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined values are written as null."""
    value = float(value)
    return None if value != value else value


def scalar_metrics(result: dict) -> dict[str, float]:
    """Every number of an ``eval.json`` as ``<eval>.<path>`` (e.g. ``core.fvu``, ``ground_truth.coverage``):
    what sweep tables and loggers show. ``summary`` levels are dropped; settings, plot paths, lists and
    per-item details are left out."""
    flat = {}
    for name in result.get("evals", []):
        flat.update(_flatten_numbers(result.get(name, {}), name))
    return flat


def _flatten_numbers(values: dict, prefix: str) -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        if key in ("settings", "plots"):
            continue
        name = prefix if key == "summary" else f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(_flatten_numbers(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat
