"""Text for harvesting: documents from ``datasets``, tokenised and packed into fixed-length contexts.

A :class:`TextSource` names its documents the way ``datasets.load_dataset`` does (``dataset``, ``name``,
``split``, ``data_files``) and always streams them, so a hub corpus is never downloaded whole. Three kinds:

- ``python-docs`` (the default, offline): CPython's own documentation prose, present on every Python install:
  the help topics of ``pydoc_data.topics`` plus the docstrings of the standard-library modules (read with
  ``ast``, never imported). Built once per Python installation into ``cache_dir/text/`` as JSON lines.
- local files: ``dataset`` = ``text`` | ``json`` (``jsonl``) | ``parquet`` | ``csv`` with ``data_files``.
- a hub dataset by name (``Skylion007/openwebtext``, ``HuggingFaceFW/fineweb`` + ``name=sample-10BT``, ...).

:func:`pack_contexts` turns documents into contexts of ``context_length`` token ids: each context starts with
a start token (e.g. BOS), documents follow each other separated by a separator token (e.g. EOS), and a context
may begin in the middle of a document (standard packing; no padding anywhere). :func:`shuffle_buffer` then
mixes contexts with a seeded buffer, so neighbouring rows of a shard come from unrelated text.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from c2r.errors import UserError
from c2r.storage import atomic_write, digest

PYTHON_DOCS = "python-docs"
# Bump when the python-docs builder changes its output for the same Python installation.
PYTHON_DOCS_VERSION = 1
# `dataset` values that read local files through datasets' packaged builders (alias -> builder).
LOCAL_BUILDERS = {"text": "text", "txt": "text", "json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
# Standard-library folders that hold tests, demos or vendored code rather than documented modules.
_SKIP_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


class TextError(UserError, ValueError):
    """Bad text settings or unusable text, with what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------
# python-docs
# --------------------------------------------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, in a fixed (sorted) order, test and vendored folders excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_STDLIB_DIRS)
        files.extend(Path(folder) / n for n in sorted(names) if n.endswith(".py"))
    return files


def python_docs_fingerprint() -> str:
    """Identifies this installation's python-docs text without building it: the Python version and the
    names and sizes of the standard-library files (distributions patch or strip the stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    header = f"{platform.python_version()}|{PYTHON_DOCS_VERSION}".encode()
    files = (f"{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode() for path in _stdlib_files())
    return digest([header, *files])


def _module_docstrings(path: Path) -> str:
    """All docstrings of one module (module, classes, functions, in source order), blank-line separated."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""  # a file this Python cannot parse (e.g. a template); it has no prose for us
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, kinds) and (doc := ast.get_docstring(node, clean=True)):
            docs.append(doc.strip())
    return "\n\n".join(d for d in docs if d)


def python_docs_documents() -> Iterator[str]:
    """The python-docs corpus: the ``pydoc_data`` help topics (sorted by name), then one document per
    standard-library module with all its docstrings. Deterministic for one Python installation."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if text := topics[name].strip():
            yield text
    for path in _stdlib_files():
        if text := _module_docstrings(path):
            yield text


def build_python_docs(cache_dir: str | Path) -> Path:
    """Write the python-docs corpus as JSON lines (``{"text": ...}``) under ``cache_dir/text`` once per
    installation and return the file (written to a temporary name, then renamed)."""
    target = Path(cache_dir) / "text" / f"{PYTHON_DOCS}-{python_docs_fingerprint()}.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(f: IO[bytes]) -> None:
        for doc in python_docs_documents():
            f.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))

    atomic_write(target, write)
    return target


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


class TextSource:
    """Documents (strings) from ``datasets``, streamed in a fixed order.

    Args:
        dataset: ``python-docs``; ``text``, ``json``/``jsonl``, ``parquet`` or ``csv`` for local files (needs
            ``data_files``); or a hub dataset name (needs network or a local HF cache).
        name: the dataset's configuration (``load_dataset(..., name=)``), e.g. ``sample-10BT`` for FineWeb.
        split: which split to read.
        data_files: a path, glob or list of them (local files).
        text_column: the column that holds the text.
        revision: a hub dataset's git revision (branch, tag or commit); ``None`` = the default branch.
        load_kwargs: further ``load_dataset`` arguments (e.g. ``sample_by: document`` for ``text`` files,
            whose default here is one document per paragraph).
        cache_dir: where the python-docs corpus is built.
    """

    def __init__(
        self,
        dataset: str = PYTHON_DOCS,
        *,
        name: str | None = None,
        split: str = "train",
        data_files: str | Sequence[str] | None = None,
        text_column: str = "text",
        revision: str | None = None,
        load_kwargs: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ):
        if not dataset or not isinstance(dataset, str):
            raise TextError(f"text.dataset must be a non-empty string, got {dataset!r}")
        self.dataset = dataset
        self.name = name
        self.split = split
        self.data_files = [data_files] if isinstance(data_files, (str, os.PathLike)) else data_files
        self.data_files = None if self.data_files is None else [str(p) for p in self.data_files]
        self.text_column = text_column
        self.revision = revision
        self.load_kwargs = dict(load_kwargs or {})
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.is_local and not self.data_files:
            raise TextError(
                f"text.dataset={dataset!r} reads local files, but no text.data_files were given: set "
                "data.text.data_files=/path/to/file (a path, a glob or a list)"
            )
        if dataset == PYTHON_DOCS and self.cache_dir is None:
            raise TextError("the python-docs text needs a cache_dir to build its corpus in")

    @property
    def is_local(self) -> bool:
        return self.dataset in LOCAL_BUILDERS

    def local_files(self) -> list[Path]:
        """The local files ``data_files`` names (globs expanded, sorted); raises if any is missing."""
        files: list[Path] = []
        for pattern in self.data_files or []:
            expanded = Path(pattern).expanduser()
            matches = sorted(glob.glob(str(expanded))) if glob.has_magic(str(expanded)) else [str(expanded)]
            found = [Path(m) for m in matches if Path(m).is_file()]
            if not found:
                raise TextError(
                    f"dataset path missing: {pattern!r} matches no file (resolved to {expanded.resolve()}); "
                    "point data.text.data_files at existing text/jsonl/parquet files"
                )
            files.extend(found)
        return files

    def identity(self) -> dict[str, Any]:
        """Everything that identifies the documents, for the activation cache key."""
        out: dict[str, Any] = {"dataset": self.dataset, "text_column": self.text_column}
        if self.dataset == PYTHON_DOCS:
            out["python_docs"] = python_docs_fingerprint()
            return out
        out["split"] = self.split
        if self.name is not None:
            out["name"] = self.name
        if self.revision is not None:
            out["revision"] = self.revision
        if self.load_kwargs:
            out["load_kwargs"] = self.load_kwargs
        if self.is_local:
            out["files"] = [
                {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                for p in self.local_files()
            ]
        elif self.data_files:
            out["data_files"] = self.data_files
        return out

    def describe(self) -> dict[str, Any]:
        """A readable summary for the manifest's ``source`` (no file stamps)."""
        out = {k: v for k, v in self.identity().items() if k != "files"}
        if self.is_local:
            out["data_files"] = [str(p) for p in self.local_files()]
        return out

    def _load(self):
        import datasets

        kwargs = dict(self.load_kwargs)
        if self.dataset == PYTHON_DOCS:
            path, files, name, split = "json", [str(build_python_docs(self.cache_dir))], None, "train"
        elif self.is_local:
            path, files, name, split = LOCAL_BUILDERS[self.dataset], [str(p) for p in self.local_files()], None, self.split
            if path == "text":
                kwargs.setdefault("sample_by", "paragraph")
        else:
            path, files, name, split = self.dataset, self.data_files, self.name, self.split
        try:
            return datasets.load_dataset(
                path, name, data_files=files, split=split, streaming=True, revision=self.revision, **kwargs
            )
        except Exception as err:  # datasets raises many types; all mean "cannot read this"
            where = (
                "local files" if self.is_local or self.dataset == PYTHON_DOCS
                else "a hub dataset: it needs network access (or a local Hugging Face cache); offline, use "
                "data/text=python_docs or local files"
            )
            raise TextError(
                f"could not open text dataset {self.dataset!r} (name={self.name!r}, split={self.split!r}), "
                f"{where}: {type(err).__name__}: {err}"
            ) from err

    def documents(self) -> Iterator[str]:
        """Non-empty documents in dataset order. Raises :class:`TextError` if there are none."""
        n = 0
        for example in self._load():
            if n == 0 and self.text_column not in example:
                raise TextError(
                    f"text column {self.text_column!r} not found in {self.dataset!r}; its columns are "
                    f"{sorted(example)}: set data.text.text_column to one of them"
                )
            text = example[self.text_column]
            if isinstance(text, str) and text.strip():
                n += 1
                yield text
        if n == 0:
            raise TextError(
                f"empty text: {self.dataset!r} (split={self.split!r}, column {self.text_column!r}) holds no "
                "non-empty document; check data.text.data_files / split / text_column"
            )

    def __repr__(self) -> str:
        return f"TextSource({self.identity()!r})"


# --------------------------------------------------------------------------------------------------
# Tokenising, packing, shuffling
# --------------------------------------------------------------------------------------------------


def token_id(tokenizer: Any, spec: str | None) -> int | None:
    """Resolve a token setting: ``bos``/``eos`` (the tokenizer's), a literal token such as
    ``<|endoftext|>``, or ``None`` (no token)."""
    if spec is None:
        return None
    if spec in ("bos", "eos"):
        tid = getattr(tokenizer, f"{spec}_token_id", None)
        if tid is None:
            raise TextError(f"the tokenizer has no {spec.upper()} token; set it to a token string or null")
        return int(tid)
    tid = tokenizer.convert_tokens_to_ids(spec)
    if tid is None or (tid == tokenizer.unk_token_id and spec != tokenizer.unk_token):
        raise TextError(f"{spec!r} is not a token of this tokenizer; use bos, eos, null or an existing token")
    return int(tid)


def tokenize_documents(tokenizer: Any, documents: Iterable[str], chunk: int = 64) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens added; documents are encoded ``chunk`` at a time
    (the fast tokenizers batch in Rust). Special-token strings inside the text are encoded as plain text."""
    buffer: list[str] = []
    for doc in documents:
        buffer.append(doc)
        if len(buffer) == chunk:
            yield from _encode(tokenizer, buffer)
            buffer = []
    if buffer:
        yield from _encode(tokenizer, buffer)


def _encode(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    return tokenizer(docs, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def pack_contexts(
    token_docs: Iterable[Sequence[int]],
    context_length: int,
    *,
    start_id: int | None,
    separator_id: int | None,
) -> Iterator[np.ndarray]:
    """Contexts of exactly ``context_length`` token ids (int64): ``[start] + next tokens of the stream``,
    the stream being the documents joined by ``separator_id``. A final partial context is dropped."""
    body = context_length - (start_id is not None)
    if body < 1:
        raise TextError(f"context_length={context_length} leaves no room for text after the start token")
    head = [] if start_id is None else [start_id]
    pending: list[int] = []
    first = True
    for ids in token_docs:
        if not first and separator_id is not None:
            pending.append(separator_id)
        first = False
        pending.extend(ids)
        start = 0
        while len(pending) - start >= body:
            yield np.asarray(head + pending[start : start + body], dtype=np.int64)
            start += body
        del pending[:start]


def shuffle_buffer(items: Iterable[Any], size: int, seed: int) -> Iterator[Any]:
    """Seeded buffered shuffle: keep ``size`` items, emit a random one as each new item arrives, then the rest
    in random order. ``size`` ≤ 1 keeps the order. Deterministic in ``(items, size, seed)``."""
    if size <= 1:
        yield from items
        return
    rng = np.random.default_rng([int(seed), 0x5EED])
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]
