"""The settings of the first-letter evaluation, one small object per part of it (what ``conf/evaluation/default.yaml``
groups under ``first_letter.prompts``, ``.probe``, ``.sparse_probe`` and ``.absorption``): each part's checks live
with its values, and the probe cache's key is the first two, as written."""

from __future__ import annotations

from dataclasses import dataclass

from c2r.evaluation.first_letter_prompts import FirstLetterError


@dataclass(frozen=True)
class PromptSettings:
    """Which words are asked about and how: the seeded word sample, its train/test split and the ICL prompt."""

    words: int = 2000
    seed: int = 0
    test_fraction: float = 0.2
    icl_examples: int = 2
    template: str = "{word} has the first letter:"

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise FirstLetterError(f"first_letter.prompts.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.words < 3 or self.icl_examples < 0:
            raise FirstLetterError(
                f"first_letter.prompts needs words >= 3 and icl_examples >= 0; got {self.words} and {self.icl_examples}"
            )


@dataclass(frozen=True)
class ProbeSettings:
    """The ground-truth probe's training: Adam, lr decayed exponentially to 1e-5, L2 weight decay."""

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class SparseProbeSettings:
    """k-sparse probing: the L1 probe on SAE codes that ranks the latents, then k = 1 ... ``max_k`` while the
    k-sparse probe's F1 rises by more than ``f1_jump``."""

    l1: float = 0.01
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-6
    max_k: int = 10
    f1_jump: float = 0.03

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise FirstLetterError(f"first_letter.sparse_probe.max_k must be >= 1, got {self.max_k}")

    def ranking_probe(self) -> dict[str, float | int]:
        """The keyword arguments of the ranking probe (``train_linear_probe``)."""
        return {"l1": self.l1, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class AbsorptionSettings:
    """SAEBench's absorption thresholds (``word_absorption``'s keyword arguments)."""

    full_absorption_cos: float = 0.025
    absorber_cos: float = 0.1
    projection_share: float = 0.4
    max_absorbers: int = 3
