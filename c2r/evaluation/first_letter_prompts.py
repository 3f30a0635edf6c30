"""The first-letter evaluation's data: the vocabulary words, their in-context prompts and the language model's
activations at the word token (see :mod:`c2r.evaluation.first_letter`)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from c2r.data.lm import LanguageModel, hook_activations

LETTERS = string.ascii_lowercase


class FirstLetterError(ValueError):
    """Settings or a model that the first-letter evaluation cannot use, with what is wrong and how to fix it."""


def alphabetic_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """``(token id, text)`` of every token whose text is ASCII letters, optionally after one leading space
    (SAEBench's rule); special tokens are left out, and of tokens with the same text the first is kept."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    found: dict[str, int] = {}
    for tid, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])):
        core = text[1:] if text.startswith(" ") else text
        if core and core.isascii() and core.isalpha():
            found.setdefault(text, tid)
    return [(tid, text) for text, tid in found.items()]


def first_letter_of(word: str) -> str:
    """The lower-case first letter of a vocabulary word (leading space ignored)."""
    return word.strip()[0].lower()


def icl_prompt(word: str, examples: list[str], template: str) -> str:
    """SAEBench's in-context prompt: one line per example with its answer (`` E``), then the word's line without
    the answer; every line starts with a newline."""
    lines = [f"{template.format(word=e)} {first_letter_of(e).upper()}" for e in examples]
    return "".join(f"\n{line}" for line in [*lines, template.format(word=word)])


@dataclass
class Prompts:
    """Token ids of the prompts of one split; the word token sits at ``word_position`` (negative) in each."""

    words: list[str]
    tokens: list[list[int]]
    word_position: int


def build_prompts(
    tokenizer: Any,
    vocabulary: list[tuple[int, str]],
    *,
    template: str,
    icl_examples: int,
    start_id: int | None,
    rng: random.Random,
) -> tuple[Prompts, int]:
    """Prompts for ``vocabulary`` with examples drawn from it; returns them and how many words were dropped
    because their token did not survive tokenisation of the prompt."""
    after = template.split("{word}")[-1]
    if template.count("{word}") != 1 or not after:
        raise FirstLetterError(
            f"template must contain {{word}} exactly once, followed by text (SAEBench: '{{word}} has the first "
            f"letter:'), got {template!r}"
        )
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    word_position = -len(suffix) - 1
    texts = [text for _, text in vocabulary]
    n_examples = min(icl_examples, len(texts) - 1)
    words, tokens, dropped = [], [], 0
    for tid, text in vocabulary:
        examples = [w for w in rng.sample(texts, n_examples + 1) if w != text][:n_examples]
        ids = tokenizer(icl_prompt(text, examples, template), add_special_tokens=False)["input_ids"]
        ids = ([start_id] if start_id is not None else []) + list(ids)
        if len(ids) < len(suffix) + 1 or ids[word_position] != tid or ids[word_position + 1 :] != suffix:
            dropped += 1
            continue
        words.append(text)
        tokens.append(ids)
    return Prompts(words, tokens, word_position), dropped


def word_activations(lm: LanguageModel, hook: str, prompts: Prompts, batch_size: int) -> Tensor:
    """``[len(prompts.words), d]`` float32 activations at ``hook`` on each prompt's word token. Prompts of equal
    length are batched together (no padding, so no attention mask is needed). Built outside inference mode, so
    the result is an ordinary tensor that probes can train on."""
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts.tokens):
        by_length.setdefault(len(ids), []).append(i)
    rows: dict[int, Tensor] = {}
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            tokens = torch.tensor([prompts.tokens[i] for i in chunk], dtype=torch.long)
            acts = hook_activations(lm, tokens, hook)[:, prompts.word_position].float().cpu()
            rows.update(zip(chunk, acts))
    return torch.stack([rows[i] for i in range(len(prompts.tokens))])
