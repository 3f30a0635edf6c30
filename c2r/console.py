"""What a run prints: Lightning's notices that a c2r user cannot act on are dropped, each at its own source, so
the console keeps what matters (progress, warnings about the data or the config, errors). docs/design.md §11."""

from __future__ import annotations

import logging
import warnings


def _not_a_product_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")


def ignore_library_warnings() -> None:
    """Warnings about library internals that nothing in c2r calls: torch's deprecation of ``LeafSpec``, which
    Lightning's pytree helper still constructs, and Lightning's advice to sync epoch-level logs across ranks
    (validation sums are all-reduced by hand: exact FVU over all ranks). Applied where :mod:`c2r.module` is
    imported, so also in the processes a ``ddp_spawn`` job starts (which never run :func:`hide_lightning_noise`)."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def hide_lightning_noise() -> None:
    """Filters for Lightning 2.6's "💡 Tip:" adverts for its cloud products (c2r configures its own loggers and
    checkpoints), printed on every run, and :func:`ignore_library_warnings`.

    Also one line per message: imported after Hydra set up logging (as the entry points do, for a fast --help),
    Lightning's loggers pass their records on to Hydra's handlers (console and the job's log file), yet its
    package logger keeps a console handler of its own, which would print every line a second time."""
    if logging.getLogger("lightning.pytorch").propagate:
        package = logging.getLogger("lightning")
        for handler in list(package.handlers):
            package.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_product_tip)
    ignore_library_warnings()
