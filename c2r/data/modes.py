"""``data.mode``: where a run's training rows come from. ``shards`` (the default) harvests ``data.source`` once and
trains epochs over the shards; ``stream`` runs the LM inside the training job (:mod:`c2r.data.stream`) and keeps
only a small held-out harvest on disk. Training and evaluation both ask this module for their data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig

from c2r.data.stream import StreamError, heldout_set

if TYPE_CHECKING:
    from c2r.data.datamodule import ActivationDataModule
    from c2r.data.sources import ShardSource

MODES = ("shards", "stream")


def data_mode(data_cfg: DictConfig) -> str:
    """The configured mode, checked (configs without the key are ``shards``)."""
    mode = data_cfg.get("mode", "shards")
    if mode not in MODES:
        raise StreamError(f"data.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "stream" and data_cfg.source.get("_target_") != "c2r.data.HarvestedShards":
        raise StreamError(
            f"data.mode=stream needs a language-model data option (data=smollm2, gpt2, ...); "
            f"{data_cfg.source.get('_target_')} has no model to stream from: use data.mode=shards"
        )
    return mode


def shard_source(data_cfg: DictConfig) -> ShardSource:
    """The shards a run trains on (``shards``), or validates and evaluates on (``stream``: the held-out set)."""
    source = instantiate(data_cfg.source)
    if data_mode(data_cfg) == "stream":
        return heldout_set(source, data_cfg.stream.heldout_rows)
    return source


def build_datamodule(
    data_cfg: DictConfig, *, batch_size: int, seed: int, run_dir: str | Path | None = None
) -> ActivationDataModule:
    """The DataModule of the configured mode; a streamed run records its normalisation in ``run_dir``."""
    from c2r.data.datamodule import ActivationDataModule
    from c2r.data.stream_datamodule import StreamingDataModule

    if data_mode(data_cfg) == "shards":
        return ActivationDataModule(
            instantiate(data_cfg.source), batch_size=batch_size, seed=seed, num_workers=data_cfg.num_workers
        )
    if data_cfg.num_workers:
        raise StreamError(
            f"data.num_workers={data_cfg.num_workers}: a streamed run fills its buffer in a thread of the training "
            "process (the stream position is checkpointed from there); set data.num_workers=0"
        )
    return StreamingDataModule(instantiate(data_cfg.source), batch_size=batch_size, seed=seed, record_dir=run_dir, **data_cfg.stream)
