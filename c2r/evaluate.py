"""``python -m c2r.evaluate``: evaluate a trained SAE and write ``eval.json``, ``eval.md`` and ``eval_*.png``; also
the end-of-training evaluation of ``c2r.train`` (:func:`evaluate_run`, :func:`log_evaluation`).

``run=<run folder>`` evaluates ``<run>/sae`` on the run's own data config (``<run>/run_config.yaml``) and
writes into the run folder; ``sae=<exported SAE folder>`` evaluates an SAE on the data selected with ``data=...``.
The SAE is evaluated through :func:`c2r.load_sae`, i.e. in its exported, inference form on raw activations: what
users and SAELens/SAEBench see (BatchTopK as JumpReLU with its inference threshold). See ``conf/evaluate.yaml`` and
``conf/evaluation/default.yaml`` for every setting and :mod:`c2r.evaluation` for the metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# c2r.evaluation and c2r.export (torch, the LM stack, matplotlib) are imported where they are used, so that
# --help comes at once.
from c2r.run_folder import failures_recorded, load_run_config

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)

def settings_of(cfg: DictConfig) -> dict[str, Any]:
    """The evaluation settings at the root of an ``evaluate`` config (conf/evaluation/default.yaml composed
    there, plus sections added on the command line), as plain values."""
    from c2r.evaluation import RUN_SETTINGS, available_evals

    keys = [*(key for key in cfg if key in RUN_SETTINGS), *available_evals(cfg)]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)


def evaluate_sae_on(
    sae_dir: str | Path, data_cfg: DictConfig, out_dir: str | Path | None, settings: dict[str, Any]
) -> dict:
    """Evaluate the exported SAE in ``sae_dir`` on the shards of ``data_cfg.source`` (created if missing), with
    ``settings`` as in conf/evaluation/default.yaml (sections missing there or in part take its defaults)."""
    from c2r.evaluation import RESULTS_FILE, RUN_SETTINGS, run_evaluation
    from c2r.export import load_sae

    sae = load_sae(sae_dir)
    from c2r.data.modes import shard_source

    source = shard_source(data_cfg)  # data.mode=stream: the held-out set
    shard_dir = source.ensure()
    run = {key: settings[key] for key in RUN_SETTINGS if key in settings}
    sections = {name: section for name, section in settings.items() if name not in RUN_SETTINGS}
    result = run_evaluation(sae, shard_dir, out_dir, settings=sections, sae_path=sae_dir, source=source, **run)
    for note in result["notes"]:
        log.warning(note)
    if out_dir is not None:
        log.info("evaluation written to %s", Path(out_dir) / RESULTS_FILE)
    return result


def evaluate_run(run_dir: str | Path, cfg: DictConfig | None = None, **overrides: Any) -> dict:
    """End-of-training evaluation: ``<run_dir>/sae`` on the run's data; ``eval.json``, ``eval.md`` and the plots
    go into ``run_dir``.

    ``cfg`` is the training config (default: the one the run saved); ``overrides`` replace the defaults of
    ``conf/evaluation/default.yaml`` (e.g. ``tokens=200_000``, ``evals=["core"]``, ``device="cuda"``,
    ``ground_truth={"min_events": 50}``; an eval's section is merged key by key). Returns what ``eval.json`` holds.
    """
    from c2r.evaluation import RUN_SETTINGS, available_evals, default_settings

    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else load_run_config(run_dir)
    settings = default_settings()
    valid = (*RUN_SETTINGS, *available_evals(settings), *available_evals(overrides))  # sections of one's own too
    for key in overrides:
        if key not in valid:
            raise ValueError(f"unknown evaluation setting {key!r}; valid: {', '.join(valid)}")
    return evaluate_sae_on(run_dir / "sae", cfg.data, run_dir, {**settings, **overrides})


def log_evaluation(logger: Logger, result: dict, directory: str | Path, step: int) -> None:
    """The end-of-training evaluation (what ``eval.json`` in ``directory`` holds) as ``eval/<eval>.<metric>``
    metrics for the training's logger; W&B also gets them as run summary (sortable in the runs table), one
    ``eval/table`` and the plots."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from c2r.evaluation import scalar_metrics

    scalars = {f"eval/{name}": value for name, value in scalar_metrics(result).items()}
    logger.log_metrics(scalars, step=step)
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(scalars)
        table = wandb.Table(columns=["metric", "value"], data=[[name, value] for name, value in scalars.items()])
        plots = [path for name in result.get("evals", []) for path in result.get(name, {}).get("plots", [])]
        logger.experiment.log({"eval/table": table, **{f"eval/{Path(p).stem}": wandb.Image(str(Path(directory) / p)) for p in plots}})


def evaluate(cfg: DictConfig) -> dict:
    """The body of ``python -m c2r.evaluate`` on its composed config."""
    settings = settings_of(cfg)
    if cfg.run is not None and cfg.sae is not None:
        raise ValueError("set either run=<run folder> or sae=<exported SAE folder>, not both")
    if cfg.run is not None:
        run_dir = Path(cfg.run)
        out = Path(cfg.out) if cfg.out is not None else run_dir
        return evaluate_sae_on(run_dir / "sae", load_run_config(run_dir).data, out, settings)
    if cfg.sae is not None:
        out = cfg.out if cfg.out is not None else HydraConfig.get().runtime.output_dir
        return evaluate_sae_on(Path(cfg.sae), cfg.data, Path(out), settings)
    raise ValueError(
        "nothing to evaluate: set run=<training run folder> or sae=<exported SAE folder> (with data=<option>)"
    )


@hydra.main(version_base="1.3", config_path="pkg://c2r.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    """Hydra entrypoint; returns the FVU (when the core eval ran) so sweepers can read it. A failure leaves
    ``FAILED`` in this job's folder and its traceback in the job's log."""
    logging.captureWarnings(True)
    with failures_recorded(Path(HydraConfig.get().runtime.output_dir)):
        result = evaluate(cfg)
    return result.get("core", {}).get("fvu")


if __name__ == "__main__":
    main()
