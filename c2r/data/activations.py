"""From text to activation rows: the harvest's settings and its pipeline, shared by the harvest
(:mod:`c2r.data.harvest`), the training stream (:mod:`c2r.data.stream`) and the LM evaluations.

All deterministic: documents → tokens → contexts of ``context_length`` (a start token, then documents joined by a
separator) → a seeded shuffle buffer over contexts → batches of ``batch_size`` contexts → the bridge's forward pass,
stopped after the hooked block → per context, the rows of special tokens (``drop_special``) and of outlier norm
(``‖x‖ > outlier_norm × the context's median norm``) are dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from c2r.data.lm import LanguageModel, check_hook, hook_activations, load_model
from c2r.data.shards import check_shard_split
from c2r.data.text import TextSource, pack_contexts, shuffle_buffer, token_id, tokenize_documents
from c2r.errors import UserError


class HarvestError(UserError, ValueError):
    """Bad harvest settings or a harvest that cannot go on, with what is wrong and how to fix it."""


class ActivationRecipe:
    """The settings of a harvest and the rows they give: ``model`` at ``hook`` over ``text``.

    Args:
        model: ``smollm2-135m``, ``tiny-random-llama`` or a Hugging Face hub name (see :mod:`c2r.data.lm`).
        hook: a TransformerLens hook name, e.g. ``blocks.5.hook_resid_post``.
        text: :class:`~c2r.data.text.TextSource` arguments (``dataset``, ``name``, ``split``, ``data_files``,
            ``text_column``, ...) or a ``TextSource``; default: python-docs.
        context_length: tokens per context, the start token included.
        tokens: rows (token activations) to write; fewer if the text runs out. A multiple of
            ``rows_per_shard`` keeps every shard, the validation shard included, full.
        batch_size: contexts per forward pass (speed only).
        dtype: storage dtype of the shards, ``float32`` or ``float16``.
        model_dtype: the model's weights and compute dtype (``float32``, ``bfloat16``, ``float16``).
        model_revision: a hub model's revision (part of the cache key; ``None`` = the default branch).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``, ... (speed only).
        rows_per_shard, val_shards: shard size, and how many of the last shards are held out.
        context_start, doc_separator: ``bos``, ``eos``, a literal token (e.g. ``<|endoftext|>``) or ``None``.
        drop_special: drop the rows of every special token of the tokenizer (BOS, EOS, pad, ...).
        outlier_norm: drop rows whose norm exceeds this multiple of their context's median norm
            ("massive activations", attention sinks); ``None`` keeps all.
        shuffle: ``False`` keeps text order: no context shuffle buffer, rows in order within shards.
        shuffle_buffer: contexts in the seeded shuffle buffer.
        seed: seeds the context shuffle and the row permutation of each shard.
        cache_dir: the cache root (shards under ``activations/``, SmolLM2's float32 copy under ``models/``).
        progress: show a progress bar (tqdm) with tokens/s and ETA.
    """

    def __init__(
        self,
        *,
        model: str,
        hook: str,
        text: Mapping[str, Any] | TextSource | None = None,
        context_length: int = 128,
        tokens: int = 262_144,
        batch_size: int = 8,
        dtype: str = "float16",
        model_dtype: str = "float32",
        model_revision: str | None = None,
        device: str = "auto",
        rows_per_shard: int = 16_384,
        val_shards: int = 1,
        context_start: str | None = "bos",
        doc_separator: str | None = "eos",
        drop_special: bool = True,
        outlier_norm: float | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 4096,
        seed: int = 0,
        cache_dir: str | Path,
        progress: bool = True,
    ):
        self.model = str(model)
        self.hook = str(hook)
        self.cache_dir = Path(cache_dir).expanduser()
        if isinstance(text, TextSource):
            self.text = text
        else:
            self.text = TextSource(**dict(text or {}), cache_dir=self.cache_dir)
        self.context_length = int(context_length)
        self.tokens = int(tokens)
        self.batch_size = int(batch_size)
        self.dtype = str(dtype)
        self.model_dtype = str(model_dtype)
        self.model_revision = model_revision
        self.device = device
        self.rows_per_shard = int(rows_per_shard)
        self.val_shards = int(val_shards)
        self.context_start = context_start
        self.doc_separator = doc_separator
        self.drop_special = bool(drop_special)
        self.outlier_norm = None if outlier_norm in (None, 0) else float(outlier_norm)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.show_progress = bool(progress)
        self._validate()

    def _validate(self) -> None:
        if self.context_length < 2:
            raise HarvestError(f"context_length must be >= 2, got {self.context_length}")
        if self.batch_size < 1:
            raise HarvestError(f"batch_size (contexts per forward pass) must be >= 1, got {self.batch_size}")
        if self.dtype not in ("float32", "float16"):
            raise HarvestError(f"dtype (shard storage) must be float32 or float16, got {self.dtype!r}")
        check_shard_split(
            self.tokens, self.rows_per_shard, self.val_shards, rows_key="tokens", error=HarvestError
        )
        if self.outlier_norm is not None and self.outlier_norm <= 1:
            raise HarvestError(
                f"outlier_norm={self.outlier_norm} would drop ordinary rows (it is a multiple of the median "
                "norm): use a value > 1, e.g. 10, or null to keep all rows"
            )

    def load_model(self) -> LanguageModel:
        """The configured model (see :func:`c2r.data.lm.load_model`)."""
        return load_model(
            self.model, device=self.device, dtype=self.model_dtype, revision=self.model_revision,
            cache_dir=self.cache_dir,
        )

    def check_model(self, lm: LanguageModel) -> None:
        """Refuse a model these settings cannot run on (hook, context length, start and separator tokens)
        before any forward pass."""
        if lm.name != self.model:
            raise HarvestError(f"got the model {lm.name!r}, but this source reads {self.model!r}")
        check_hook(lm, self.hook)
        if lm.n_ctx is not None and self.context_length > lm.n_ctx:
            raise HarvestError(
                f"context_length={self.context_length} exceeds {self.model}'s maximum of {lm.n_ctx} positions"
            )
        token_id(lm.tokenizer, self.context_start), token_id(lm.tokenizer, self.doc_separator)

    def contexts(self, lm: LanguageModel) -> Iterator[np.ndarray]:
        """The contexts the harvest feeds to the model, in order: int64 token ids ``[context_length]``."""
        start_id = token_id(lm.tokenizer, self.context_start)
        separator_id = token_id(lm.tokenizer, self.doc_separator)
        docs = tokenize_documents(lm.tokenizer, self.text.documents())
        contexts = pack_contexts(docs, self.context_length, start_id=start_id, separator_id=separator_id)
        return shuffle_buffer(contexts, self.shuffle_buffer if self.shuffle else 0, self.seed)

    def activation_rows(
        self,
        lm: LanguageModel,
        contexts: list[np.ndarray],
        special_ids: torch.Tensor,
        counts: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows one batch of contexts gives, ``(float32 [n, d], token ids [n])`` on the model's device, in
        ``[context, position]`` order: the hook's activations at the positions of :meth:`keep_mask`. The one
        step from contexts to rows, shared by the harvest and the training stream (:mod:`c2r.data.stream`)."""
        tokens = torch.from_numpy(np.stack(contexts))
        acts = hook_activations(lm, tokens, self.hook).float()
        tokens = tokens.to(acts.device)
        keep = self.keep_mask(tokens, acts, special_ids, counts)
        return acts[keep], tokens[keep]

    def dropped_tokens(self, tokenizer: Any) -> dict[str, int]:
        """The tokens whose rows are dropped, ``{token: id}``: every special token with ``drop_special``."""
        return special_tokens(tokenizer) if self.drop_special else {}

    def dropped_token_ids(self, tokenizer: Any) -> torch.Tensor:
        """The ids of :meth:`dropped_tokens` (int64, sorted; empty when none are dropped)."""
        return torch.tensor(sorted(set(self.dropped_tokens(tokenizer).values())), dtype=torch.long)

    def keep_mask(
        self,
        tokens: torch.Tensor,
        acts: torch.Tensor | None,
        special_ids: torch.Tensor,
        counts: dict[str, int] | None = None,
    ) -> torch.Tensor:
        """``[batch, pos]`` bool: the positions whose rows the harvest writes (neither a dropped token nor an
        outlier). ``acts``: the hook's ``[batch, pos, d]`` activations (``None`` will do without ``outlier_norm``:
        the mask then depends on the tokens alone); ``special_ids``: :meth:`dropped_token_ids`. The LM evaluations
        splice the SAE in at exactly these positions. Counts the contexts and tokens it sees and what it drops
        into ``counts``."""
        special_ids = special_ids.to(tokens.device)
        keep = ~torch.isin(tokens, special_ids) if len(special_ids) else torch.ones_like(tokens, dtype=torch.bool)
        outlier = torch.zeros_like(keep)
        if self.outlier_norm is not None:
            norms = acts.float().norm(dim=-1)
            masked = torch.where(keep, norms, torch.full_like(norms, float("nan")))
            median = masked.nanmedian(dim=1, keepdim=True).values
            outlier = keep & (norms > self.outlier_norm * median)
        if counts is not None:
            counts["contexts"] += tokens.shape[0]
            counts["tokens_forwarded"] += tokens.numel()
            counts["dropped_special"] += int((~keep).sum())
            counts["dropped_outlier"] += int(outlier.sum())
        return keep & ~outlier


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """Every special token of the tokenizer, ``{token: id}``."""
    ids = getattr(tokenizer, "all_special_ids", [])
    tokens = getattr(tokenizer, "all_special_tokens", [])
    return {str(t): int(i) for t, i in zip(tokens, ids) if i is not None}


def batched(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of `n` items (the last one shorter): the batches of contexts of one forward pass."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch
