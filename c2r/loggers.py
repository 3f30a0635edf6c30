"""Logger factories referenced from conf/logger/*.yaml."""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path

import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger


def wandb_credentials_available() -> bool:
    """True when W&B can upload: an API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(
    project: str, save_dir: str, name: str | None = None, group: str | None = None, **kwargs
) -> WandbLogger:
    """A W&B logger that runs offline (into ``save_dir``) when no credentials are set, instead of prompting for
    a key or failing. A ``WANDB_MODE`` set in the environment (e.g. ``disabled``) always wins: Lightning's
    ``offline=True`` would overwrite it. ``group`` defaults to the sweep folder for the jobs of a multirun, so
    a sweep is one W&B group (relaunched jobs land in the same group and, by :func:`run_id`, the same run)."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    offline = "WANDB_MODE" not in os.environ and not wandb_credentials_available()
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or None,
        group=group or sweep_group(),
        offline=offline,
        id=run_id(save_dir),
        resume="allow",
        **kwargs,
    )
    # Lightning 2.6 always passes wandb's retired `anonymous` setting, which makes wandb warn on every run.
    logger._wandb_init.pop("anonymous", None)
    return logger


def sweep_group() -> str | None:
    """The sweep folder of the running multirun job (``hydra.sweep.dir``), ``None`` for a single run."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return str(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None


def run_id(run_dir: str | Path) -> str:
    """A W&B run id derived from the run folder, so a relaunched (resumed) job logs into the same W&B run. Not
    :func:`c2r.storage.content_key` (sha256 of settings): this names a place, and its sha1 form is kept so that
    runs begun by earlier versions keep their W&B run on resumption."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def finish_logging(logger: Logger, final_metrics: dict[str, float]) -> None:
    """Close a job's logger; W&B also gets the final metrics as run summary and its run is finished, so the
    next job of a multirun in this process starts a run of its own."""
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update({f"final/{name}": value for name, value in final_metrics.items()})
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        wandb.finish()
