"""A run folder belongs to one run: its settings, one training process at a time, and a visible failure.

- ``run_config.yaml`` is the config the run was started with (Hydra rewrites ``.hydra/config.yaml`` on every
  launch, so it cannot be the reference). A relaunch whose content-relevant settings differ stops before any
  work, with the differences, unless ``allow_config_change=true``.
- ``.lock`` (an ``fcntl`` lock, holding the owner's PID) stops a second process training into the folder.
- ``FAILED`` holds the error of a launch that failed (removed by the next launch), so a sweep report can tell a
  failed job from one still running or never started.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from c2r.errors import UserError
from c2r.storage import atomic_write_text, exclusive_lock

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"
RUN_HYDRA = "run_hydra.yaml"
FAILED = "FAILED"
LOCK = ".lock"
METRICS = "metrics.json"
NOT_CONTENT = (
    "hydra",
    "logger",
    "evaluation",
    "cache_dir",
    "data.source.cache_dir",
    "data.num_workers",
    "hardware.accelerator",
    "hardware.devices",
    "hardware.num_nodes",
    "hardware.strategy",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "progress_every",
    "checkpoint_every",
    "allow_config_change",
)
"""Keys that do not change what is trained (where it runs, what is logged, where shards are cached), so a
relaunch may change them freely. Everything else (model, data, regularizers, optim, seed, sizes, budget,
hardware.precision, validation settings) is content: it must match the run's ``run_config.yaml``."""


class RunFolderRefused(UserError, RuntimeError):
    """The run folder cannot be trained into by this launch; the folder itself is fine (not marked failed)."""


class RunFolderBusy(RunFolderRefused):
    """Another process holds the folder's lock."""


class RunConfigChanged(RunFolderRefused):
    """The relaunch's settings differ from the ones the run was started with."""


def _rank_zero() -> bool:
    """Whether this is the job's first process. Lightning is imported here, not at the top: the report and the
    CLIs' --help read run folders without it."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


@contextmanager
def claimed(run_dir: Path, cfg: DictConfig) -> Iterator[None]:
    """Hold ``run_dir`` for this launch: take the lock, check (or, at the first launch, save) the run's config
    and clear an earlier failure mark. Only rank 0 does this: DDP ranks started as processes of their own
    (Slurm tasks, Lightning's ddp launcher) share rank 0's folder and claim."""
    if not _rank_zero():
        yield
        return
    with locked(run_dir):
        check_config_unchanged(run_dir, cfg)
        (run_dir / FAILED).unlink(missing_ok=True)
        yield


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``run_dir`` (released when the process ends, however it ends)."""
    run_dir.mkdir(parents=True, exist_ok=True)

    def refuse(owner: str) -> None:
        raise RunFolderBusy(
            f"{run_dir} is in use by another training process (PID {owner}): wait for it to end, "
            "or train into another folder (hydra.run.dir=...)"
        ) from None

    with exclusive_lock(run_dir / LOCK, on_busy=refuse):
        yield


def check_config_unchanged(run_dir: Path, cfg: DictConfig) -> None:
    """Save the config at the first launch; afterwards refuse content-relevant changes (see :data:`NOT_CONTENT`)
    unless ``allow_config_change`` is set, and then record the new settings as the run's."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        save_run_config(cfg, path)
        return
    changes = config_changes(OmegaConf.load(path), cfg)
    if not changes:
        return
    listed = "; ".join(changes)
    if (run_dir / METRICS).is_file():
        raise RunConfigChanged(
            f"{run_dir} has finished with other settings ({listed}): its results are for its {RUN_CONFIG}; "
            "train the new settings into a new run folder (hydra.run.dir=...)"
        )
    if not cfg.get("allow_config_change", False):
        raise RunConfigChanged(
            f"{run_dir} was started with other settings ({listed}): relaunch into a new run folder "
            "(hydra.run.dir=...), or continue this run with the changes: allow_config_change=true"
        )
    log.warning(f"{run_dir}: continuing with changed settings ({listed}); {RUN_CONFIG} now holds them")
    save_run_config(cfg, path)


def config_changes(old: DictConfig, new: DictConfig) -> list[str]:
    """``key: old → new`` for every content-relevant key that differs."""
    before, after = content_settings(old), content_settings(new)
    unset = "(unset)"
    return [
        f"{key}: {before.get(key, unset)} → {after.get(key, unset)}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, unset) != after.get(key, unset)
    ]


def content_settings(cfg: DictConfig) -> dict[str, Any]:
    """The content-relevant settings of a training config as ``{dotted key: value}``, interpolations unresolved
    (``model.seed: ${seed}``), so a change shows once, at the key that was set."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=False))
    return {
        key: value for key, value in flat.items()
        if not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_CONTENT)
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {key: item for name, child in value.items() for key, item in _flatten(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


def save_run_config(cfg: DictConfig, path: Path) -> None:
    """The composed config as Hydra saves it (interpolations kept), without Hydra's own settings; those (the
    group choices and overrides the report reads) go beside it as ``run_hydra.yaml``."""
    _save(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), path)
    if HydraConfig.initialized():
        _save(OmegaConf.create({"hydra": HydraConfig.get()}), path.with_name(RUN_HYDRA))


def _save(cfg: DictConfig, path: Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(cfg))


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The training config a run folder holds: its ``run_config.yaml`` (older runs: ``.hydra/config.yaml``)."""
    run_dir = Path(run_dir)
    for path in (run_dir / RUN_CONFIG, run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path)
    raise FileNotFoundError(
        f"{run_dir} is not a training run folder: it has no {RUN_CONFIG} or .hydra/config.yaml (a "
        "`python -m c2r.train` run writes them). To evaluate an exported SAE without its run, use sae=<folder> "
        "data=<option>"
    )


def load_run_hydra(run_dir: Path) -> DictConfig:
    """Hydra's settings of the run's launch (``run_hydra.yaml``; older runs: ``.hydra/hydra.yaml``)."""
    path = run_dir / RUN_HYDRA
    return OmegaConf.load(path if path.is_file() else run_dir / ".hydra" / "hydra.yaml").hydra


def is_training_config(cfg: DictConfig) -> bool:
    """A ``python -m c2r.train`` config (not, e.g., a ``c2r.evaluate`` job's)."""
    return "model" in cfg and "train_tokens" in cfg


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Leave ``FAILED`` with the error and its traceback in ``run_dir`` (rank 0 only)."""
    if not _rank_zero() or not run_dir.is_dir():
        return
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    (run_dir / FAILED).write_text(f"{type(error).__name__}: {error}\n\n{''.join(lines)}")


def failure_of(run_dir: Path) -> str | None:
    """The first line of a failed launch's error, or ``None``."""
    path = run_dir / FAILED
    return path.read_text().splitlines()[0] if path.is_file() else None


@contextmanager
def failures_recorded(job_dir: Path) -> Iterator[None]:
    """For an entrypoint: an exception goes into ``FAILED`` with its traceback, unless the folder was refused (it
    belongs to another run or process), and into the job's log file (Hydra's ``<job>.log``; otherwise only stderr
    would have it). A :class:`~c2r.errors.UserError` in a single run ends it as one line with exit status 1; any
    other error, and every error in a sweep, propagates (with its traceback in the log)."""
    try:
        yield
    except Exception as error:
        if not isinstance(error, RunFolderRefused):
            mark_failed(job_dir, error)
        if isinstance(error, UserError) and HydraConfig.get().mode == RunMode.RUN:
            # A diagnosis, not a bug: one line on the console and in the log; the traceback is in FAILED. In a
            # sweep it propagates, so that Hydra fails this job alone and runs the others.
            log.error(f"{type(error).__name__}: {error}")
            raise SystemExit(1) from None
        log.exception(f"{type(error).__name__}: {error}")
        raise
