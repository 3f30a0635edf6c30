"""The weight of a loss term over training steps, one rule for the SAE's sparsity penalties and the regularizers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Schedule:
    """``coef`` on the steps ``t >= start_step`` with ``(t - start_step) % interval == 0`` (0 elsewhere), ramped up
    linearly over the first ``warmup_steps`` steps from ``start_step``, and multiplied by ``interval``.

    The ``interval`` factor keeps the average weight over many steps at ``coef`` while the term's cost is paid on one
    step in ``interval`` (C²R's schedule). The warm-up follows the LR warm-up's convention: ``(t - start_step + 1) /
    warmup_steps``, so the last warm-up step has the full weight. ``key_prefix`` is the prefix of the config keys
    (``l1_`` for ``l1_coef``, ``l1_warmup_steps``), so that a refused value names the key to fix.
    """

    coef: float
    warmup_steps: int = 0
    start_step: int = 0
    interval: int = 1
    key_prefix: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self.key_prefix
        if self.coef < 0:
            raise ValueError(f"{p}coef must be >= 0 (0 switches the term off), got {self.coef}")
        if self.warmup_steps < 0:
            raise ValueError(f"{p}warmup_steps must be >= 0 (0 = no warm-up), got {self.warmup_steps}")
        if self.start_step < 0:
            raise ValueError(f"{p}start_step must be >= 0, got {self.start_step}")
        if self.interval < 1:
            raise ValueError(f"{p}interval must be >= 1 (1 = every step), got {self.interval}")

    def weight(self, step: int) -> float:
        """The multiplier of the raw term at training ``step``; 0.0 means: skip computing it."""
        since_start = step - self.start_step
        if self.coef == 0 or since_start < 0 or since_start % self.interval:
            return 0.0
        ramp = min(1.0, (since_start + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return float(self.coef) * self.interval * ramp
