"""First-letter absorption and feature splitting on the language model, after SAEBench's absorption eval
(Chanin et al., "A is for Absorption"), sized for CPUs.

Data (needs the LM the shards came from; skipped with a note on synthetic data):

- words: the tokens that decode to ASCII letters, optionally after one leading space (SAEBench's vocabulary:
  `` cat``, ``ing``, ``A`` all count), a seeded subsample of ``words`` of them, split by word into train and test
  (``test_fraction``);
- prompts: ``"\\n"`` + ``icl_examples`` lines ``"{example} has the first letter: {E}"`` (examples drawn, seeded, from
  the same split, never the word itself) + ``"\\n{word} has the first letter:"``, after the harvest's start token;
  the activation at the hook is read at the word's token (SAEBench's position −6). A word whose token does not
  come back intact when the prompt is tokenised is dropped (counted in ``words_dropped``);
- ground-truth probe: one-vs-rest logistic regression over the 26 first letters on the train activations
  (:func:`~c2r.evaluation.first_letter_metrics.train_linear_probe`, SAEBench's settings); a letter's **probe F1**
  is its test-split F1 (logit > 0), and only letters with probe F1 > ``min_probe_f1`` are evaluated.

The activations and the probe are cached per (model identity and dtype, hook, start token and every setting
above) in ``<cache_dir>/probes/first_letter_<key>.safetensors`` (written atomically), so the LM runs once and
each further SAE costs seconds.

Metrics, for each kept letter ℓ (the SAE's codes ``f`` of the same activations):

- **split features** (k-sparse probing): an L1-penalised one-vs-rest probe on the train codes ranks the latents by
  their (signed) weight for ℓ; for k = 1 … ``max_k`` a class-balanced logistic regression on the k top latents
  gives a test F1; the number of split features is the k where the F1-jump rule stops (k grows while F1 rises by
  more than ``f1_jump``, :func:`~c2r.evaluation.first_letter_metrics.split_count`); those k latents are ℓ's *main
  latents*;
- on the test words of ℓ that the probe gets right (logit > 0), **absorption fraction** and **full absorption**
  (:func:`~c2r.evaluation.first_letter_metrics.word_absorption`, SAEBench's thresholds): per letter the mean
  absorption fraction and the full-absorption rate (share of those words fully absorbed).

Summary: the means over kept letters of the absorption fraction, full-absorption rate and split features; null (with
a note) when fewer than ``min_letters`` letters are kept. The README lists every setting that differs from SAEBench.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from c2r.data.lm import LanguageModel, model_identity
from c2r.data.text import token_id
from c2r.evaluation.base import EvalContext, NotApplicable
from c2r.evaluation.data import RowBatch
from c2r.evaluation.first_letter_metrics import sparse_probe_f1s, split_count, train_linear_probe, word_absorption
from c2r.evaluation.first_letter_probe import (
    PROBE_CACHE_VERSION,
    LetterProbe,
    build_letter_probe,
    load_letter_probe,
    save_letter_probe,
)
from c2r.evaluation.first_letter_prompts import LETTERS, FirstLetterError
from c2r.evaluation.first_letter_settings import (
    AbsorptionSettings,
    ProbeSettings,
    PromptSettings,
    SparseProbeSettings,
)
from c2r.storage import content_key


class FirstLetterEval:
    """SAEBench-style first-letter absorption and splitting (see the module docstring). Ignores the streamed rows:
    all the work happens in :meth:`finalize`. ``lm`` is only used when the probe is not cached yet."""

    name = "first_letter"

    def __init__(
        self,
        ctx: EvalContext,
        lm: LanguageModel | None,
        *,
        prompts: PromptSettings = PromptSettings(),
        probe: ProbeSettings = ProbeSettings(),
        sparse_probe: SparseProbeSettings = SparseProbeSettings(),
        absorption: AbsorptionSettings = AbsorptionSettings(),
        min_probe_f1: float = 0.6,
        min_letters: int = 1,
        batch_size: int = 64,
    ) -> None:
        self.ctx, self.lm, self.source = ctx, lm, ctx.source
        self.prompts, self.probe, self.sparse_probe, self.absorption = prompts, probe, sparse_probe, absorption
        self.min_probe_f1, self.min_letters = float(min_probe_f1), int(min_letters)
        self.batch_size = int(batch_size)

    def update(self, batch: RowBatch, acts: Tensor, recon: Tensor) -> None:
        """Nothing to do per batch: this evaluation runs its own prompts through the LM."""

    # ---- the probe ---------------------------------------------------------------------------------
    def cache_key(self) -> dict[str, Any]:
        """Everything that changes the cached activations or probe (not ``batch_size``: speed only)."""
        return {
            "version": PROBE_CACHE_VERSION,
            "model": model_identity(self.source.model, self.source.model_revision),
            "model_dtype": self.source.model_dtype,
            "hook": self.source.hook,
            "context_start": self.source.context_start,
            **asdict(self.prompts),
            "probe": asdict(self.probe),
        }

    def probe_path(self) -> Path:
        return Path(self.source.cache_dir) / "probes" / f"first_letter_{content_key(self.cache_key())}.safetensors"

    def letter_probe(self) -> tuple[LetterProbe, bool]:
        """The cached probe and data, or new ones (then cached); also whether it came from the cache."""
        path = self.probe_path()
        if path.is_file():
            return load_letter_probe(path), True
        if self.lm is None:
            raise FirstLetterError(f"no cached probe at {path} and no language model to build one: pass the LM")
        made = build_letter_probe(
            self.lm,
            self.source.hook,
            start_id=token_id(self.lm.tokenizer, self.source.context_start),
            batch_size=self.batch_size,
            probe=asdict(self.probe),
            **asdict(self.prompts),
        )
        save_letter_probe(path, made, self.cache_key())
        return made, False

    # ---- the SAE -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor, chunk: int = 4096) -> Tensor:
        device = self.ctx.device
        return torch.cat([self.ctx.sae.encode(part.to(device)).float().cpu() for part in x.split(chunk)])

    def finalize(self) -> dict:
        letter_probe, cached = self.letter_probe()
        probe_f1 = letter_probe.f1s()
        kept = [c for c, f1 in enumerate(probe_f1) if f1 > self.min_probe_f1]
        train_codes, test_codes = self.encode(letter_probe.x_train), self.encode(letter_probe.x_test)
        ranking, _ = train_linear_probe(
            train_codes, letter_probe.y_train, len(LETTERS), seed=self.prompts.seed, **self.sparse_probe.ranking_probe()
        )
        test_logits = letter_probe.test_logits()
        max_k = min(self.sparse_probe.max_k, train_codes.shape[1])
        letters: dict[str, dict] = {}
        for c, letter in enumerate(LETTERS):
            row: dict[str, Any] = {"probe_f1": probe_f1[c], "kept": c in kept}
            if c in kept:
                row.update(self.letter_metrics(c, letter_probe, train_codes, test_codes, test_logits, ranking, max_k))
            letters[letter] = row
        result = self.summary(letters, kept)
        result.update(
            letters=letters,
            probe={
                "cached": cached,
                "path": str(self.probe_path()),
                "train_words": len(letter_probe.train_words),
                "test_words": len(letter_probe.test_words),
                "words_dropped": letter_probe.words_dropped,
            },
            settings={
                "prompts": asdict(self.prompts),
                "probe": asdict(self.probe),
                "min_probe_f1": self.min_probe_f1,
                "min_letters": self.min_letters,
                "sparse_probe": asdict(self.sparse_probe),
                "absorption": asdict(self.absorption),
            },
        )
        if self.ctx.plot_dir is not None and kept:
            from c2r.evaluation.plots import plot_first_letter

            result["plots"] = [p.name for p in plot_first_letter(self.ctx.plot_dir, result)]
        return result

    def letter_metrics(
        self,
        c: int,
        letter_probe: LetterProbe,
        train_codes: Tensor,
        test_codes: Tensor,
        test_logits: Tensor,
        ranking: Tensor,
        max_k: int,
    ) -> dict[str, Any]:
        """Split features, main latents and absorption of letter ``c``."""
        ranked = ranking[c].topk(max_k).indices
        f1s = sparse_probe_f1s(
            train_codes, letter_probe.y_train == c, test_codes, letter_probe.y_test == c, ranked
        )
        splits = split_count(f1s, self.sparse_probe.f1_jump)
        main = ranked[:splits]
        found = (letter_probe.y_test == c) & (test_logits[:, c] > 0)
        fraction, full = word_absorption(
            letter_probe.x_test[found].to(self.ctx.device),
            test_codes[found].to(self.ctx.device),
            self.ctx.sae.W_dec,
            letter_probe.weight[c],
            main,
            **asdict(self.absorption),
        )
        return {
            "split_features": splits,
            "main_latents": main.tolist(),
            "sparse_probe_f1": f1s,
            "probe_true_positives": int(found.sum()),
            "absorption_fraction": float(fraction.mean()) if len(fraction) else None,
            "full_absorption_rate": float(full.double().mean()) if len(full) else None,
            "full_absorptions": int(full.sum()),
        }

    def summary(self, letters: dict[str, dict], kept: list[int]) -> dict[str, Any]:
        """Means over the kept letters (null, with a note, when fewer than ``min_letters`` are kept)."""
        dropped = [letter for c, letter in enumerate(LETTERS) if c not in kept]
        summary: dict[str, Any] = {"letters_kept": len(kept), "dropped_letters": dropped}
        enough = len(kept) >= max(self.min_letters, 1)
        if dropped:
            self.ctx.notes.append(
                f"first_letter: {len(dropped)} letters dropped, their probe F1 is <= {self.min_probe_f1}: "
                f"{''.join(dropped)}"
            )
        if not enough:
            self.ctx.notes.append(
                f"first_letter: only {len(kept)} of 26 letters have a probe F1 > {self.min_probe_f1} "
                f"(min_letters={self.min_letters}), so no means are reported; the model does not represent first "
                "letters well at this hook (SAEBench recommends models of >= 2B parameters)"
            )
        for key in ("absorption_fraction", "full_absorption_rate", "split_features"):
            values = [letters[LETTERS[c]][key] for c in kept if letters[LETTERS[c]][key] is not None]
            summary[key] = sum(values) / len(values) if enough and values else None
        kept_f1 = [letters[LETTERS[c]]["probe_f1"] for c in kept]
        summary["probe_f1_mean_kept"] = sum(kept_f1) / len(kept_f1) if kept_f1 else None
        return summary


def first_letter_eval(
    ctx: EvalContext,
    *,
    prompts: Mapping[str, Any] | None = None,
    probe: Mapping[str, Any] | None = None,
    sparse_probe: Mapping[str, Any] | None = None,
    absorption: Mapping[str, Any] | None = None,
    **settings: Any,
) -> FirstLetterEval:
    """Factory of the ``first_letter`` evaluation, from its config section (each part a mapping of its settings
    object's fields); :class:`NotApplicable` when the rows do not come from an LM."""
    parts = {
        "prompts": PromptSettings(**(prompts or {})),
        "probe": ProbeSettings(**(probe or {})),
        "sparse_probe": SparseProbeSettings(**(sparse_probe or {})),
        "absorption": AbsorptionSettings(**(absorption or {})),
    }
    lm = ctx.language_model()
    if lm is None:
        raise NotApplicable(
            "the rows do not come from a language model (it needs the LM and hook that produced them); use an LM "
            "data config such as data=smollm2"
        )
    return FirstLetterEval(ctx, lm, **parts, **settings)
