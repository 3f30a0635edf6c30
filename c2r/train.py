"""``python -m c2r.train``: train one SAE (or, with ``-m``, a sweep of them) from activation shards.

Order of work: cheap config checks first (so bad input fails before any compute), then the run folder's claim
(lock, settings unchanged), then the shards (created if missing), training, a final validation, and the run
folder's exported SAE and ``metrics.json``. Relaunching a job in the same run folder is idempotent: a finished
job is skipped, an interrupted one resumes (see :mod:`c2r.run_folder` for what a relaunch may change).

torch and Lightning are imported inside :func:`train`, so ``--help`` and Hydra's config errors come at once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from c2r.run_folder import METRICS, claimed, failures_recorded

if TYPE_CHECKING:
    from c2r.regularizers import Regularizer

DECODER_BIAS_SAMPLE_ROWS = 8192
log = logging.getLogger(__name__)


def build_regularizers(cfg: DictConfig) -> dict[str, Regularizer]:
    """Every penalty of the run as ``{loss-term name: module}``: the ``regularizer`` option under its option name
    (``none`` is empty and adds nothing) plus each entry of ``extra_regularizers`` under its key, e.g.
    ``+regularizer@extra_regularizers.ortho=ortho`` adds ``ortho``. Names must be distinct."""
    regularizers = {}
    if cfg.regularizer:
        regularizers[HydraConfig.get().runtime.choices["regularizer"]] = instantiate(cfg.regularizer)
    for name, extra in (cfg.get("extra_regularizers") or {}).items():
        if not extra:
            continue
        if name in regularizers:
            raise ValueError(
                f"two regularizers are named {name!r} (loss terms are logged as losses/<name>): give the extra one "
                f"another key, e.g. +regularizer@extra_regularizers.{name}_2={name}"
            )
        regularizers[name] = instantiate(extra)
    return regularizers


def resolve_d_in(configured: int | None, from_shards: int, shard_dir: Path) -> int:
    """The SAE width: the shards' width, which a configured ``data.d_in`` must match."""
    if configured is not None and configured != from_shards:
        raise ValueError(
            f"the shards in {shard_dir} have d={from_shards}, but data.d_in={configured}: "
            f"point data at shards of the right layer/model, or set data.d_in={from_shards}"
        )
    return from_shards


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job as configured; returns the final validation metrics."""
    from c2r.config_checks import check_train_config

    started = time.time()
    check_train_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with claimed(run_dir, cfg):
        metrics_path = run_dir / METRICS  # written last: its presence marks a finished job
        if metrics_path.exists():
            log.info(f"{run_dir} has finished already ({metrics_path.name} exists): skipping it")
            return json.loads(metrics_path.read_text())
        return fit_and_export(cfg, run_dir, started)


def fit_and_export(cfg: DictConfig, run_dir: Path, started: float) -> dict[str, float]:
    """Data, SAE, training (or its resumption), final validation, export, evaluation, then ``metrics.json``."""
    import lightning as L

    from c2r.callbacks import DataWaitFraction, LatentHistograms, ProgressLog, StepProgressBar, TokensPerSecond
    from c2r.checkpointing import FinalAndPeriodicCheckpoint, training_plugins
    from c2r.console import hide_lightning_noise
    from c2r.data.modes import build_datamodule
    from c2r.evaluate import evaluate_sae_on, log_evaluation
    from c2r.export import export_sae
    from c2r.jsonfile import write_json
    from c2r.loggers import finish_logging
    from c2r.module import SAEModule
    from c2r.nonfinite import NonFiniteLossGuard, check_finite_metrics

    hide_lightning_noise()
    max_steps = cfg.train_tokens // cfg.batch_size
    L.seed_everything(cfg.seed, workers=True)
    regularizers = build_regularizers(cfg)
    # The model config is partial: its width is the data's. Constructors validate their arguments, so building
    # the SAE before the data work makes bad input fail before any compute; only when the width is left to the
    # shards (data=shards) do the shards come first.
    make_sae = instantiate(cfg.model)
    sae = make_sae(d_in=cfg.data.d_in) if cfg.data.d_in is not None else None

    datamodule = build_datamodule(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, run_dir=run_dir)
    shard_dir = datamodule.source.ensure()  # data.mode=stream: the held-out set only
    d_in = resolve_d_in(cfg.data.d_in, datamodule.d_in, shard_dir)
    sae = sae or make_sae(d_in=d_in)
    sae.init_decoder_bias(datamodule.sample_rows(min(DECODER_BIAS_SAMPLE_ROWS, datamodule.manifest.train_rows)))

    module = SAEModule(sae, regularizers, **cfg.optim, total_steps=max_steps)
    module.launch_time = started
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    checkpoint = FinalAndPeriodicCheckpoint(
        dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every
    )
    # A progress bar only where a terminal shows it; elsewhere (nohup, Slurm) plain lines in the log.
    progress_bar = bool(cfg.trainer.enable_progress_bar) and sys.stderr.isatty()
    callbacks = [checkpoint, NonFiniteLossGuard(cfg.trainer.log_every_n_steps), TokensPerSecond(), DataWaitFraction(),
                 LatentHistograms()]
    callbacks.append(  # the bar reads values back from the device, so only on the steps that log them
        StepProgressBar(refresh_rate=cfg.trainer.log_every_n_steps) if progress_bar
        else ProgressLog(cfg.progress_every, max_steps)
    )
    trainer = L.Trainer(
        **cfg.hardware,
        **{**cfg.trainer, "enable_progress_bar": progress_bar},
        max_steps=max_steps,
        check_val_every_n_epoch=None,
        logger=logger,
        callbacks=callbacks,
        plugins=training_plugins(),
        use_distributed_sampler=False,  # the DataModule splits blocks across ranks itself
        default_root_dir=run_dir,
    )
    # A relaunched job (same run folder) continues from its last checkpoint: weights, optimiser, schedule,
    # C²R state and the data stream's position (the DataModule restarts it at the restored global step).
    resume_from = checkpoint.resume_path()
    if resume_from:
        log.info(f"resuming from {resume_from}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    fit_ended = time.time()
    (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    check_finite_metrics(final, "the final validation")

    metrics = {
        **{name.removeprefix("val/"): float(value) for name, value in final.items()},
        "dead_fraction": float(module.sae.dead_mask().float().mean()),
        # The trainer's step, read back from the checkpointed token count: a ddp_spawn parent's trainer keeps 0.
        "steps": int(module.tokens_seen) // cfg.batch_size,
        "tokens": int(module.tokens_seen),
        "wall_time_s": round(float(module.wall_time_s) + time.time() - fit_ended, 2),  # over all launches
    }
    if trainer.is_global_zero:
        provenance = datamodule.manifest.source
        export_sae(
            module.sae,
            run_dir / "sae",
            normalization_factor=datamodule.normalization_factor,
            hook_name=provenance.get("hook", ""),
            model_name=provenance.get("model", ""),
        )
        if cfg.get("evaluation"):  # before metrics.json, which marks the job finished
            settings = OmegaConf.to_container(cfg.evaluation, resolve=True)
            evaluation = evaluate_sae_on(run_dir / "sae", cfg.data, run_dir, settings)
            if logger:
                log_evaluation(logger, evaluation, run_dir, step=trainer.global_step)
        write_json(run_dir / METRICS, metrics)
    if logger:
        finish_logging(logger, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://c2r.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint; returns the final FVU so sweepers can optimise it. Warnings and errors also go to the
    job's ``train.log``."""
    logging.captureWarnings(True)
    with failures_recorded(Path(HydraConfig.get().runtime.output_dir)):
        return train(cfg)["fvu"]


if __name__ == "__main__":
    main()
