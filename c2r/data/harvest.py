"""Harvesting: a language model's activations at one hook, over packed text, written as activation shards.

:class:`HarvestedShards` is a shard source (``shard_dir`` + ``ensure()``), so ``python -m c2r.train`` harvests
on first use and ``python -m c2r.harvest`` can do it ahead of time. The directory is
``cache_dir/activations/<model>_<hook>_<key>``, ``key`` being a hash of every setting that changes the shards'
content (:meth:`HarvestedShards.params`), so two settings never share a cache and one setting never harvests
twice. Settings that only change speed (``device``, ``batch_size``, ``progress``) are not part of it.

The pipeline, all deterministic: documents → tokens → contexts of ``context_length`` (a start token, then
documents joined by a separator) → a seeded shuffle buffer over contexts → batches of ``batch_size`` contexts
→ the bridge's forward pass, stopped after the hooked block → per context, the rows of special tokens
(``drop_special``) and of outlier norm (``‖x‖ > outlier_norm × the context's median norm``) are dropped →
``ShardWriter`` (rows permuted within each shard, token ids alongside, the last ``val_shards`` shards held out,
every file renamed into place once complete, the manifest last).

Resuming: each shard is renamed into place whole; right after, a small ``harvest_progress.json`` records the
batch the next unwritten row comes from and how many of that batch's rows are already stored. A restarted
harvest re-creates the context stream (cheap), skips the batches before that one without running the model,
and drops the rows already stored, so it writes exactly the bytes an uninterrupted harvest would have. If the
progress file is older than the shards (a crash between the two renames) or missing, the rows the shards
hold beyond it are recomputed and dropped: slower, same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from c2r.data.lm import LanguageModel, check_hook, hook_activations, load_model, model_identity
from c2r.data.shards import MANIFEST_NAME, Manifest, ShardWriter, check_shard_split
from c2r.data.sources import CachedShards
from c2r.data.text import TextSource, pack_contexts, shuffle_buffer, token_id, tokenize_documents
from c2r.errors import UserError
from c2r.storage import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the same settings would produce different shards (tokenising, packing, dropping, writing).
HARVEST_VERSION = 1
PROGRESS_NAME = "harvest_progress.json"
LOCK_NAME = ".harvest.lock"


class HarvestError(UserError, ValueError):
    """Bad harvest settings or a harvest that cannot go on, with what is wrong and how to fix it."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


class HarvestedShards(CachedShards):
    """Shard source: activations of ``model`` at ``hook`` over ``text``, harvested once and cached.

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

    folder = "activations"

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
        self._needed_bytes = 0  # known once the model is loaded (the hook's width)
        self._params: dict[str, Any] | None = None
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

    # ---- identity ----------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Every setting that changes the shards' content: the cache key (also stored in the manifest).
        Computed once per source (it stats the text files), so the directory cannot move under a running job."""
        if self._params is None:
            self._params = self._content_settings()
        return self._params

    def _content_settings(self) -> dict[str, Any]:
        return {
            "kind": "lm",
            "harvest_version": HARVEST_VERSION,
            "model": model_identity(self.model, self.model_revision),
            "model_dtype": self.model_dtype,
            "hook": self.hook,
            "text": self.text.identity(),
            "context_length": self.context_length,
            "context_start": self.context_start,
            "doc_separator": self.doc_separator,
            "tokens": self.tokens,
            "dtype": self.dtype,
            "rows_per_shard": self.rows_per_shard,
            "val_shards": self.val_shards,
            "drop_special": self.drop_special,
            "outlier_norm": self.outlier_norm,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
        }

    def directory_name(self) -> str:
        return f"{_slug(self.model)}_{_slug(self.hook)}_{self.key}"

    # ---- shard source protocol ---------------------------------------------------------------------
    def ensure(self) -> Path:
        """Harvest unless a complete copy is cached (resuming an interrupted one); return the directory."""
        target = self.shard_dir
        if not (target / MANIFEST_NAME).is_file():
            self.harvest()
        return self._load(target).directory

    def _load(self, target: Path) -> Manifest:
        try:
            return Manifest.load(target)
        except (OSError, ValueError) as err:
            raise HarvestError(f"the cached shards in {target} are damaged: {err}") from err

    # ---- harvesting --------------------------------------------------------------------------------
    def harvest(self, model: LanguageModel | None = None) -> Manifest:
        """Write (or finish writing) the shard directory; returns its manifest.

        ``model``: an already loaded :class:`~c2r.data.lm.LanguageModel` of the same name (saves loading it
        again, e.g. in a notebook or a benchmark); by default the model is loaded here.
        """
        target = self.shard_dir
        target.mkdir(parents=True, exist_ok=True)
        with _exclusive(target / LOCK_NAME):
            if (target / MANIFEST_NAME).is_file():  # another process finished it while we waited
                return self._load(target)
            try:
                return self._harvest(target, model)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise HarvestError(
                        f"disk full while writing shards to {target} ({_free_gb(target):.2f} GB free; the "
                        f"harvest needs about {self._needed_bytes / 1e9:.2f} GB in all). The complete shards are "
                        "kept and no partial file is left: free some space (or set cache_dir= to a larger "
                        "disk) and rerun the same command to resume"
                    ) from err
                raise

    def load_model(self) -> LanguageModel:
        """The configured model (see :func:`c2r.data.lm.load_model`)."""
        return load_model(
            self.model, device=self.device, dtype=self.model_dtype, revision=self.model_revision,
            cache_dir=self.cache_dir,
        )

    def _harvest(self, target: Path, lm: LanguageModel | None) -> Manifest:
        started = time.time()
        lm = self.load_model() if lm is None else lm
        self.check_model(lm)
        special = self.dropped_tokens(lm.tokenizer)
        special_ids = self.dropped_token_ids(lm.tokenizer)
        d = hook_activations(lm, torch.zeros(1, 2, dtype=torch.long), self.hook).shape[-1]
        need = self._needed_bytes = self.tokens * (d * np.dtype(self.dtype).itemsize + 4)
        writer = ShardWriter(
            target, d=d, rows_per_shard=self.rows_per_shard, dtype=self.dtype, seed=self.seed, resume=True,
            shuffle=self.shuffle,
        )
        free = shutil.disk_usage(target).free
        if need - writer.rows_written * d * np.dtype(self.dtype).itemsize > free:
            raise HarvestError(
                f"not enough disk space in {target.parent}: the shards need about {need / 1e9:.2f} GB and "
                f"{free / 1e9:.2f} GB are free. Free some space, set cache_dir= to a larger disk or lower tokens"
                + (", or use dtype=float16 (half the size)" if self.dtype != "float16" else "")
            )
        progress = self._read_progress(target, writer.rows_written)
        start_batch = progress["batch"]
        skip = progress["offset"] + writer.rows_written - progress["rows"]
        counts = dict(progress["counts"])
        kept_before = progress["kept_before"]  # rows (written or skipped) before the current batch
        if writer.rows_written:
            log.info(f"resuming {target}: {writer.shards_written} shard(s), {writer.rows_written} rows on disk")

        bar = self._progress_bar(initial=writer.rows_written)
        batches = batched(self.contexts(lm), self.batch_size)
        try:
            for index, batch in enumerate(batches):
                if index < start_batch:
                    continue
                counts_before = dict(counts)
                rows, ids = self.activation_rows(lm, batch, special_ids, counts)
                rows, ids = rows.cpu().numpy(), ids.cpu().numpy()
                rows, ids = rows[: self.tokens - kept_before], ids[: self.tokens - kept_before]
                dropped_now = min(skip, len(rows))
                skip -= dropped_now
                shards_before = writer.shards_written
                writer.add(rows[dropped_now:], ids[dropped_now:])
                bar.update(len(rows) - dropped_now)
                if writer.shards_written > shards_before:
                    self._write_progress(target, writer.rows_written, index, kept_before, counts_before)
                kept_before += len(rows)
                if kept_before >= self.tokens:
                    break
            else:
                if kept_before < self.tokens:
                    log.warning(
                        f"the text ran out after {kept_before} of tokens={self.tokens} rows; the shards hold "
                        "what there was (use more text or lower tokens to silence this)"
                    )
        finally:
            bar.close()

        writer.source = self._describe(lm, d, special, counts, kept_before, time.time() - started)
        try:
            manifest = writer.finalize(val_shards=self.val_shards)
        except ValueError as err:
            raise HarvestError(
                f"cannot finish {target}: {err}. The text gave {kept_before} rows: use more text "
                "(data.text.*) or lower data.source.tokens / rows_per_shard / val_shards"
            ) from err
        (target / PROGRESS_NAME).unlink(missing_ok=True)
        log.info(f"harvested {kept_before} rows into {target} in {time.time() - started:.1f} s")
        return manifest

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
        if counts is not None:
            counts["contexts"] += len(contexts)
            counts["tokens_forwarded"] += tokens.numel()
        return acts[keep], tokens[keep]

    def dropped_tokens(self, tokenizer: Any) -> dict[str, int]:
        """The tokens whose rows are dropped, ``{token: id}``: every special token with ``drop_special``."""
        return _special_tokens(tokenizer) if self.drop_special else {}

    def dropped_token_ids(self, tokenizer: Any) -> torch.Tensor:
        """The ids of :meth:`dropped_tokens` (int64, sorted; empty when none are dropped)."""
        return torch.tensor(sorted(set(self.dropped_tokens(tokenizer).values())), dtype=torch.long)

    def keep_mask(
        self,
        tokens: torch.Tensor,
        acts: torch.Tensor,
        special_ids: torch.Tensor,
        counts: dict[str, int] | None = None,
    ) -> torch.Tensor:
        """``[batch, pos]`` bool: the positions whose rows the harvest writes (neither a dropped token nor an
        outlier). ``acts``: the hook's ``[batch, pos, d]`` activations; ``special_ids``: :meth:`dropped_token_ids`.
        The LM evaluations splice the SAE in at exactly these positions. Counts what it drops into ``counts``."""
        special_ids = special_ids.to(tokens.device)
        keep = ~torch.isin(tokens, special_ids) if len(special_ids) else torch.ones_like(tokens, dtype=torch.bool)
        outlier = torch.zeros_like(keep)
        if self.outlier_norm is not None:
            norms = acts.float().norm(dim=-1)
            masked = torch.where(keep, norms, torch.full_like(norms, float("nan")))
            median = masked.nanmedian(dim=1, keepdim=True).values
            outlier = keep & (norms > self.outlier_norm * median)
        if counts is not None:
            counts["dropped_special"] += int((~keep).sum())
            counts["dropped_outlier"] += int(outlier.sum())
        return keep & ~outlier

    # ---- progress file -----------------------------------------------------------------------------
    def _write_progress(self, target: Path, rows: int, batch: int, kept_before: int, counts: dict) -> None:
        record = {
            "key": self.key, "rows": rows, "batch": batch, "offset": rows - kept_before,
            "kept_before": kept_before, "counts": counts,
        }
        atomic_write_text(target / PROGRESS_NAME, json.dumps(record, indent=2))

    def _read_progress(self, target: Path, rows_on_disk: int) -> dict[str, Any]:
        """Where to restart: the progress file if it belongs to these shards, else the very beginning."""
        fresh = {
            "rows": 0, "batch": 0, "offset": 0, "kept_before": 0,
            "counts": {"contexts": 0, "tokens_forwarded": 0, "dropped_special": 0, "dropped_outlier": 0},
        }
        path = target / PROGRESS_NAME
        if not rows_on_disk or not path.is_file():
            return fresh
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            usable = record["key"] == self.key and 0 <= record["rows"] <= rows_on_disk
        except (ValueError, KeyError, TypeError):
            usable = False
        return record if usable else fresh

    # ---- reporting ---------------------------------------------------------------------------------
    def _progress_bar(self, initial: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.tokens, initial=initial, unit="tok", unit_scale=True, smoothing=0.1,
            desc=f"harvest {self.model} {self.hook}", disable=not self.show_progress,
        )

    def _describe(
        self, lm: LanguageModel, d: int, special: dict[str, int], counts: dict[str, int], rows: int, seconds: float
    ) -> dict[str, Any]:
        """The manifest's ``source``: provenance in readable form, plus the full key."""
        text = self.text.describe()
        return {
            "kind": "lm",
            "model": self.model,
            "hook": self.hook,
            "d": d,
            "dataset": text.get("dataset"),
            "split": text.get("split"),
            "text": text,
            "context_length": self.context_length,
            "context_start": self.context_start,
            "doc_separator": self.doc_separator,
            "rows": rows,
            "tokens_budget": self.tokens,
            "contexts": counts["contexts"],
            "tokens_forwarded": counts["tokens_forwarded"],
            "dropped": {
                "special_tokens": special,
                "special_rows": counts["dropped_special"],
                "outlier_norm": self.outlier_norm,
                "outlier_rows": counts["dropped_outlier"],
            },
            "model_dtype": self.model_dtype,
            "seed": self.seed,
            "seconds": round(seconds, 1),
            "key": self.key,
            "settings": self.params(),
        }

    def repr_settings(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "text": self.text, "key": self.key}


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """Every special token of the tokenizer, ``{token: id}``."""
    ids = getattr(tokenizer, "all_special_ids", [])
    tokens = getattr(tokenizer, "all_special_tokens", [])
    return {str(t): int(i) for t, i in zip(tokens, ids) if i is not None}


def batched(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of `n` items (the last one shorter): the batches of contexts of one forward pass."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def _free_gb(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free / 1e9
    except OSError:
        return float("nan")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX ``flock``), so concurrent harvests of one directory (DDP
    ranks, two jobs) take turns; the second then finds the finished shards. A no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info(f"another process is harvesting into {lock_path.parent}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
