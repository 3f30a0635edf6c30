"""The first-letter evaluation's ground truth: a linear probe for the first letter of each word, trained on the
language model's activations, and its cache (one safetensors file per model, hook and settings, written
atomically), so the LM runs once and each further SAE costs seconds."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from c2r.data.lm import LanguageModel
from c2r.evaluation.first_letter_metrics import f1_score, train_linear_probe
from c2r.evaluation.first_letter_prompts import (
    LETTERS,
    FirstLetterError,
    alphabetic_tokens,
    build_prompts,
    first_letter_of,
    word_activations,
)
from c2r.storage import atomic_write

# Bump when the same settings would give different cached activations or probes.
PROBE_CACHE_VERSION = 1


@dataclass
class LetterProbe:
    """Word activations of both splits, their first letters (0-25) and the ground-truth probe."""

    train_words: list[str]
    test_words: list[str]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    weight: Tensor  # [26, d]
    bias: Tensor  # [26]
    words_dropped: int

    def test_logits(self) -> Tensor:
        return self.x_test @ self.weight.T + self.bias

    def f1s(self) -> list[float]:
        """Each letter's probe F1 on the test split (predicting the letter where its logit is > 0)."""
        logits = self.test_logits()
        return [f1_score(logits[:, c] > 0, self.y_test == c) for c in range(len(LETTERS))]

    def tensors(self) -> dict[str, Tensor]:
        names = ("x_train", "y_train", "x_test", "y_test", "weight", "bias")
        return {name: getattr(self, name).contiguous() for name in names}


def letter_labels(words: list[str]) -> Tensor:
    """The first letter of each word as a class index 0-25."""
    return torch.tensor([LETTERS.index(first_letter_of(w)) for w in words], dtype=torch.long)


def build_letter_probe(
    lm: LanguageModel,
    hook: str,
    *,
    start_id: int | None,
    words: int,
    seed: int,
    test_fraction: float,
    icl_examples: int,
    template: str,
    batch_size: int,
    probe: dict[str, Any],
) -> LetterProbe:
    """Sample the words, run the LM on their prompts and train the ground-truth probe (see the module docstring)."""
    vocabulary = alphabetic_tokens(lm.tokenizer)
    rng = random.Random(seed)
    vocabulary = rng.sample(vocabulary, min(words, len(vocabulary)))
    n_test = round(len(vocabulary) * test_fraction)
    if n_test < 1 or len(vocabulary) - n_test < 2:
        raise FirstLetterError(
            f"{len(vocabulary)} alphabetic words with test_fraction={test_fraction} leave no train or test words; "
            "raise words (or pick a model whose tokenizer has whole-word tokens)"
        )
    splits = {"train": vocabulary[n_test:], "test": vocabulary[:n_test]}
    data, dropped = {}, 0
    for name, split in splits.items():
        prompts, lost = build_prompts(
            lm.tokenizer, split, template=template, icl_examples=icl_examples, start_id=start_id, rng=rng
        )
        if not prompts.words:
            raise FirstLetterError(
                f"no {name} word kept its token inside the prompt ({lost} dropped): the template {template!r} "
                f"does not tokenise as expected for {lm.name}; use a template whose text after {{word}} starts "
                "with a space"
            )
        dropped += lost
        data[name] = (prompts.words, word_activations(lm, hook, prompts, batch_size))
    (train_words, x_train), (test_words, x_test) = data["train"], data["test"]
    y_train = letter_labels(train_words)
    weight, bias = train_linear_probe(x_train, y_train, len(LETTERS), seed=seed, **probe)
    return LetterProbe(
        train_words, test_words, x_train, y_train, x_test, letter_labels(test_words), weight, bias, dropped
    )


def save_letter_probe(path: Path, letter_probe: LetterProbe, key: dict[str, Any]) -> None:
    """Write the probe and its data as one safetensors file (words and cache key in its metadata), atomically."""
    metadata = {
        "key": json.dumps(key, sort_keys=True),
        "train_words": json.dumps(letter_probe.train_words),
        "test_words": json.dumps(letter_probe.test_words),
        "words_dropped": str(letter_probe.words_dropped),
    }
    payload = save(letter_probe.tensors(), metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(payload))


def load_letter_probe(path: Path) -> LetterProbe:
    """Read what :func:`save_letter_probe` wrote."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    return LetterProbe(
        json.loads(metadata["train_words"]),
        json.loads(metadata["test_words"]),
        words_dropped=int(metadata["words_dropped"]),
        **load_file(path),
    )
