"""Evaluating trained SAEs: core metrics, ground-truth metrics (absorption, splitting, ...), plots and reports.

:func:`run_evaluation` reads the rows once, encodes each batch once and feeds every selected evaluation (the
streaming protocol of :class:`c2r.evaluation.base.StreamingEval`), then writes ``eval.json``,
``eval.md`` and the PNG plots. ``python -m c2r.evaluate`` (``c2r/evaluate.py``) is the command-line front end.

The evaluations are the sections of ``conf/evaluation/default.yaml`` that name a ``_target_``: a factory ``(ctx:
EvalContext, **settings) -> StreamingEval | None``, instantiated by Hydra with the section's other keys (raise
:class:`~c2r.evaluation.base.NotApplicable` when this kind of data cannot support it; ``None`` = cannot run on this
data, with the reason appended to ``ctx.notes``). Adding one = one more section, in that file or from the command
line. **The language-model evaluations** (``ce_loss``: CE-loss and KL scores, :mod:`c2r.evaluation.ce_loss`;
``first_letter``: SAEBench-style first-letter absorption, :mod:`c2r.evaluation.first_letter`) need the LM and the hook that produced the shards (``ctx.source``,
``ctx.language_model()``) and run their own forward passes; such an evaluation takes what it needs in its factory,
ignores ``update`` and does its work in ``finalize``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from c2r import __version__
from c2r.evaluation.base import EvalContext, NotApplicable, SAELike, StreamingEval, scalar_metrics
from c2r.evaluation.data import EvalRows, select_rows
from c2r.evaluation.report import write_report
from c2r.jsonfile import write_json

RESULTS_FILE = "eval.json"
REPORT_FILE = "eval.md"


RUN_SETTINGS = ("evals", "tokens", "split", "batch_size", "device", "plots")
"""The keys of an evaluation config that configure the pass itself; every other key is one evaluation's section."""

AUTO_EVALS = ("core", "ground_truth", "ce_loss")
"""What ``evals="auto"`` means: these, each where the data supports it (``first_letter`` costs minutes of LM time,
so it is asked for by name)."""


@cache
def _default_settings_text() -> str:
    return resources.files("c2r.conf").joinpath("evaluation", "default.yaml").read_text()


def default_settings() -> dict[str, Any]:
    """``conf/evaluation/default.yaml`` as plain values (a fresh copy; the file is read once): the defaults of the
    Python API (inside Hydra jobs the composed config carries them)."""
    return OmegaConf.to_container(OmegaConf.create(_default_settings_text()), resolve=True)


def with_defaults(sections: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """The evaluation sections of :func:`default_settings`, each updated key by key from ``sections`` (whose
    :data:`RUN_SETTINGS` keys, if any, are not sections); a name that is not a default evaluation brings its own
    ``_target_``."""
    merged = {name: dict(value) for name, value in default_settings().items() if name not in RUN_SETTINGS}
    for name, section in (sections or {}).items():
        if name not in RUN_SETTINGS:
            merged[name] = {**merged.get(name, {}), **section}
    return merged


def available_evals(sections: Mapping[str, Mapping]) -> list[str]:
    """The names of the sections that are evaluations (they name a ``_target_``)."""
    return [name for name, section in sections.items() if isinstance(section, Mapping) and "_target_" in section]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def selected_evals(evals: str | Sequence[str], sections: Mapping[str, Mapping] | None = None) -> list[str]:
    """The evaluation names ``evals`` stands for (``"auto"``: :data:`AUTO_EVALS`), checked against the evaluations
    of ``sections``, complete ones (:func:`with_defaults`, or a composed evaluation config; default: those of
    ``conf/evaluation/default.yaml``)."""
    available = available_evals(default_settings() if sections is None else sections)
    names = list(AUTO_EVALS) if evals == "auto" else list(evals)
    for name in names:
        if name not in available:
            raise ValueError(f"unknown eval {name!r}; available: {', '.join(available)}")
    if not names:
        raise ValueError(f"no evals selected; choose from {', '.join(available)}")
    return names


@torch.no_grad()
def evaluate_rows(
    sae: SAELike,
    rows: EvalRows,
    *,
    evals: str | Sequence[str] = "auto",
    settings: Mapping[str, Mapping] | None = None,
    batch_size: int = 8192,
    device: str | torch.device = "cpu",
    plot_dir: Path | None = None,
    source: Any = None,
) -> dict:
    """Run ``evals`` on ``rows`` (one pass, each batch encoded once); returns ``{eval name: results, "evals": [those
    run], "not_applicable": {eval name: why}, "notes": [...]}``. ``settings``: evaluation sections that update the
    defaults (:func:`with_defaults`). With ``evals="auto"``, those of :data:`AUTO_EVALS`
    the data cannot support are left out quietly; one asked for by name that does not apply is also a note.

    The SAE sees the rows as stored (raw activations): pass an exported SAE (``c2r.load_sae``), which works on
    raw activations. A module is put in eval mode (BatchTopK then uses its inference threshold) and moved to
    ``device`` for the pass, then restored.
    """
    sections = with_defaults(settings)
    names = selected_evals(evals, sections)
    device = resolve_device(device)
    module = sae if isinstance(sae, nn.Module) else None
    was_training = module.training if module is not None else False
    parameters = list(module.parameters()) if module is not None else []
    original_device = parameters[0].device if parameters else None
    if module is not None:
        module.eval().to(device)
    try:
        ctx = EvalContext(
            sae=sae, rows=rows, device=device, plot_dir=plot_dir, notes=list(rows.notes), source=source
        )
        active, not_applicable = {}, {}
        for name in names:
            try:
                made = instantiate(sections[name], _partial_=True, _convert_="all")(ctx)
            except NotApplicable as reason:
                not_applicable[name] = str(reason)
                if evals != "auto":
                    ctx.notes.append(f"{name} skipped: {reason}")
                continue
            if made is not None:
                active[name] = made
        for batch in rows.batches(batch_size, device):
            acts = sae.encode(batch.x)
            recon = sae.decode(acts)
            for evaluation in active.values():
                evaluation.update(batch, acts, recon)
        results = {name: evaluation.finalize() for name, evaluation in active.items()}
    finally:
        if module is not None:
            module.train(was_training)
            if original_device is not None:
                module.to(original_device)
    return {**results, "evals": list(active), "not_applicable": not_applicable, "notes": ctx.notes}


def run_evaluation(
    sae: SAELike,
    shard_dir: str | Path,
    out_dir: str | Path | None,
    *,
    evals: str | Sequence[str] = "auto",
    tokens: int | None = None,
    split: str = "val",
    batch_size: int = 8192,
    device: str | torch.device = "cpu",
    settings: Mapping[str, Mapping] | None = None,
    plots: bool = True,
    sae_path: str | Path | None = None,
    source: Any = None,
) -> dict:
    """Evaluate ``sae`` on the first ``tokens`` rows (``None``: all) of ``split`` of ``shard_dir``; with ``out_dir``, write
    ``eval.json``, ``eval.md`` and (``plots``) ``eval_*.png`` there. ``source``: the shard source of
    ``shard_dir`` (needed by the language-model evals). Returns what ``eval.json`` holds."""
    started = time.time()
    selected_evals(evals, with_defaults(settings))  # fail before reading any rows
    rows = select_rows(shard_dir, tokens=tokens, split=split)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_rows(
        sae,
        rows,
        evals=evals,
        settings=settings,
        batch_size=batch_size,
        device=device,
        plot_dir=out_dir if plots else None,
        source=source,
    )
    result = {
        "c2r_version": __version__,
        "sae": {"path": str(sae_path) if sae_path is not None else None, **_sae_summary(sae)},
        "data": {
            "shard_dir": str(rows.directory),
            "split": rows.split,
            "rows": rows.rows,
            "tokens_requested": rows.requested,
            "source": rows.manifest.source,
        },
        **results,
        "wall_time_s": round(time.time() - started, 2),
    }
    if out_dir is not None:
        write_json(out_dir / RESULTS_FILE, result)
        write_report(result, out_dir / REPORT_FILE)
    return result


def _sae_summary(sae: SAELike) -> dict:
    cfg = getattr(sae, "cfg", None)
    summary = {"d_in": int(sae.W_dec.shape[1]), "d_sae": int(sae.W_dec.shape[0])}
    if isinstance(cfg, dict):
        summary.update({k: cfg[k] for k in ("architecture", "k", "hook_name", "model_name") if k in cfg})
    return summary


__all__ = [
    "AUTO_EVALS",
    "RUN_SETTINGS",
    "EvalContext",
    "NotApplicable",
    "StreamingEval",
    "available_evals",
    "default_settings",
    "evaluate_rows",
    "run_evaluation",
    "scalar_metrics",
    "select_rows",
    "selected_evals",
    "with_defaults",
]
