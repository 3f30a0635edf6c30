"""``python -m c2r.train``: train one SAE (or, with ``-m``, a sweep of them) from activation shards.

Order of work: cheap config checks first (so bad input fails before any compute), then the shards (created if
missing), then training, a final validation, and the run folder's ``metrics.json`` and exported SAE.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from c2r.data import ActivationDataModule
from c2r.export import export_sae
from c2r.loggers import finish_logging
from c2r.module import SAEModule
from c2r.regularizers import Regularizer

DECODER_BIAS_SAMPLE_ROWS = 8192


class FinalAndPeriodicCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and once more when training ends, so the last
    checkpoint always holds the final weights whatever the step count."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")


def build_regularizers(cfg: DictConfig) -> dict[str, Regularizer]:
    """The selected ``regularizer`` option as ``{option name: module}``; an empty option (``none``) is none."""
    if not cfg:
        return {}
    name = HydraConfig.get().runtime.choices["regularizer"]
    return {name: instantiate(cfg)}


def resolve_d_in(configured: int | None, from_shards: int, shard_dir: Path) -> int:
    """The SAE width: the shards' width, which a configured ``model.d_in`` must match."""
    if configured is not None and configured != from_shards:
        raise ValueError(
            f"the shards in {shard_dir} have d={from_shards}, but the SAE expects model.d_in={configured}: "
            f"point data at shards of the right layer/model, or set data.d_in={from_shards}"
        )
    return from_shards


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job as configured; returns the final validation metrics."""
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    max_steps = cfg.train_tokens // cfg.batch_size
    if max_steps < 1:
        raise ValueError(
            f"train_tokens={cfg.train_tokens} is less than one batch (batch_size={cfg.batch_size}): "
            "raise train_tokens or lower batch_size"
        )
    L.seed_everything(cfg.seed, workers=True)
    regularizers = build_regularizers(cfg.regularizer)
    # Constructors validate their arguments, so building the SAE before the data work makes bad input fail
    # before any compute; only when the width is left to the shards (data=shards) do they come first.
    sae = instantiate(cfg.model) if cfg.model.d_in is not None else None

    source = instantiate(cfg.data.source)
    datamodule = ActivationDataModule(
        source, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers
    )
    shard_dir = source.ensure()
    d_in = resolve_d_in(cfg.model.d_in, datamodule.d_in, shard_dir)
    sae = sae or instantiate(cfg.model, d_in=d_in)
    sae.init_decoder_bias(datamodule.sample_rows(min(DECODER_BIAS_SAMPLE_ROWS, datamodule.manifest.train_rows)))

    module = SAEModule(sae, regularizers, **cfg.optim, total_steps=max_steps)
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    checkpoint = FinalAndPeriodicCheckpoint(
        dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every
    )
    trainer = L.Trainer(
        **cfg.hardware,
        **cfg.trainer,
        max_steps=max_steps,
        check_val_every_n_epoch=None,
        logger=logger,
        callbacks=[checkpoint],
        use_distributed_sampler=False,  # the DataModule splits blocks across ranks itself (DESIGN.md §3)
        default_root_dir=run_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)

    metrics = {
        **{name.removeprefix("val/"): float(value) for name, value in final.items()},
        "dead_fraction": float(module.sae.dead_mask().float().mean()),
        "steps": int(module.tokens_seen) // cfg.batch_size,
        "tokens": int(module.tokens_seen),
        "wall_time_s": round(time.time() - started, 2),
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
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if logger:
        finish_logging(logger, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://c2r.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint; returns the final FVU so sweepers can optimise it."""
    return train(cfg)["fvu"]


if __name__ == "__main__":
    main()
