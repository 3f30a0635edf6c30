"""Every check of a training config that needs neither data nor compute, run before anything else, so bad input
fails in a second with the key and its fix instead of after minutes of harvesting or deep inside Lightning.

Constructors still validate their own values (they are the library API); this module adds what only the
composed config knows: the step count, the hardware, and keys the targets do not take ("did you mean ...?").
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from c2r.data.modes import data_mode
from c2r.errors import UserError
from c2r.module import SAEModule

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names the key and how to fix it."""


def check_train_config(cfg: DictConfig) -> None:
    """Refuse a training config that cannot work: raises :class:`ConfigError` with a one-line message."""
    check_step_count(cfg.batch_size, cfg.train_tokens)
    check_hardware(cfg.hardware)
    if data_mode(cfg.data) == "stream":
        check_ce_contexts_are_reserved(cfg)
    if "d_in" in cfg.model:
        raise ConfigError(
            f"model.d_in={cfg.model.d_in}: the SAE's width is the data's; set data.d_in instead (or leave it null "
            "with data=shards to take the shards' width)"
        )
    groups = {"model": cfg.model, "regularizer": cfg.regularizer, "data.source": cfg.data.source}
    groups.update({f"extra_regularizers.{name}": node for name, node in (cfg.get("extra_regularizers") or {}).items()})
    for where, node in groups.items():
        if node:
            check_keys(node, where, accepted_keys(get_object(node._target_)))
    check_keys(cfg.optim, "optim", accepted_keys(SAEModule) - {"sae", "regularizers", "total_steps"})
    try:
        SAEModule.check_optim(**cfg.optim)
    except ValueError as error:
        raise ConfigError(f"optim: {error}") from None


def check_ce_contexts_are_reserved(cfg: DictConfig) -> None:
    """A streamed run trains on the contexts after its held-out set and ``data.stream.reserve_contexts`` more; the
    CE-loss evaluation reads the contexts right after the held-out set, so it may ask for at most the reserve."""
    from c2r.evaluation import selected_evals

    evaluation = cfg.get("evaluation")
    if not evaluation or "ce_loss" not in selected_evals(evaluation.evals, OmegaConf.to_container(evaluation)):
        return
    contexts = evaluation.ce_loss.contexts
    reserve = cfg.data.stream.reserve_contexts
    if contexts > reserve:
        raise ConfigError(
            f"the CE-loss evaluation reads {contexts} held-out contexts, but a streamed run trains on all but the "
            f"data.stream.reserve_contexts={reserve} after its held-out set: raise data.stream.reserve_contexts to "
            f"{contexts} or set evaluation.ce_loss.contexts={reserve}"
        )


def check_step_count(batch_size: int, train_tokens: int) -> None:
    """At least one optimiser step of a positive batch size."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive number of rows per step, got {batch_size}: e.g. batch_size=2048")
    if train_tokens < batch_size:
        raise ConfigError(
            f"train_tokens={train_tokens} is less than one batch (batch_size={batch_size}): "
            "raise train_tokens or lower batch_size"
        )


def check_hardware(hardware: DictConfig) -> None:
    """The accelerator exists here: a GPU option on a machine without one fails now, not after the data step."""
    if hardware.accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count()
    if available == 0:
        raise ConfigError(
            "hardware asks for a GPU (accelerator=gpu) but torch sees none on this machine: "
            "use hardware=cpu (or hardware=ddp_cpu to try the DDP path on CPU processes)"
        )
    if isinstance(hardware.devices, int) and hardware.devices > available:
        raise ConfigError(
            f"hardware.devices={hardware.devices} but only {available} GPU(s) are visible: "
            f"set hardware.devices={available} or fewer"
        )


def accepted_keys(target: type) -> set[str] | None:
    """The keyword arguments a class takes, following ``**kwargs`` up its bases; ``None`` if it takes any."""
    keys: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        keys |= {p.name for p in parameters if p.kind in _NAMED} - {"self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return keys
    return None


def check_keys(node: DictConfig, where: str, valid: Iterable[str] | None) -> None:
    """Every key of ``node`` (the config at ``where``) is one its target takes, else the closest valid key."""
    if valid is None:
        return
    valid = sorted(valid)
    for key in node:
        if not str(key).startswith("_") and key not in valid:
            raise ConfigError(unknown_key_message(f"{where}.{key}", where, valid))


def unknown_key_message(full_key: str, where: str, valid: list[str]) -> str:
    """``unknown key a.b: did you mean a.c?`` (or the valid keys when nothing is close)."""
    key = full_key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {where}.{close[0]}?" if close else f"the keys of {where} are {', '.join(valid)}"
    return f"unknown key {full_key}: {hint} (fix or remove it)"
