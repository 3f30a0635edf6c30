"""The manifest of a shard directory (``manifest.json``): what each shard holds, which are held out, the
normalisation factor and the source's settings; loading it validates the directory, and the source it names
says how to get damaged shards back (:func:`recreate_hint`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from c2r import __version__
from c2r.data.shards.files import list_complete_shards, npy_problem
from c2r.storage import atomic_write_text

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUPPORTED_DTYPES = ("float32", "float16")
SPLITS = ("train", "val")
_CREATE_HINT = (
    "Create it with `python -m c2r.harvest` (activations of a language model) "
    "or use `data=synthetic` (generated sparse features)."
)


@dataclass
class ShardEntry:
    """One shard as recorded in the manifest."""

    file: str
    rows: int
    sha256: str
    split: str
    mean_sq_norm: float
    tokens_file: str | None = None
    tokens_sha256: str | None = None
    max_abs: float | None = None  # the largest |value| written; None in manifests from before c2r recorded it


@dataclass
class Manifest:
    """The content of ``manifest.json``; ``directory`` is where it was loaded from (not serialised)."""

    d: int
    dtype: str
    rows_per_shard: int
    shards: list[ShardEntry]
    normalization_factor: float
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    c2r_version: str = __version__
    directory: Path | None = field(default=None, compare=False, repr=False)

    # ---- views -----------------------------------------------------------------------------------
    @property
    def train_shards(self) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == "train"]

    @property
    def val_shards(self) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == "val"]

    @property
    def train_rows(self) -> int:
        return sum(s.rows for s in self.train_shards)

    @property
    def val_rows(self) -> int:
        return sum(s.rows for s in self.val_shards)

    @property
    def has_tokens(self) -> bool:
        return bool(self.shards) and all(s.tokens_file is not None for s in self.shards)

    def files(self) -> list[tuple[str, tuple[int, ...], str, str | None]]:
        """Every file the manifest lists as ``(name, shape, dtype, sha256)``: each shard, then its token file."""
        out = []
        for entry in self.shards:
            out.append((entry.file, (entry.rows, self.d), self.dtype, entry.sha256))
            if entry.tokens_file is not None:
                out.append((entry.tokens_file, (entry.rows,), "int32", entry.tokens_sha256))
        return out

    def path(self, file: str) -> Path:
        """Absolute path of a file named in this manifest."""
        if self.directory is None:
            raise ValueError("this Manifest has no directory; load it with Manifest.load(directory)")
        return self.directory / file

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("directory")
        return out

    def save(self, directory: str | Path | None = None) -> Path:
        """Write ``manifest.json`` atomically (it marks the directory as complete) and return its path."""
        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise ValueError("Manifest.save needs a directory (none given and none loaded from)")
        path = atomic_write_text(target / MANIFEST_NAME, json.dumps(self.to_dict(), indent=2) + "\n")
        self.directory = target
        return path

    @classmethod
    def load(cls, directory: str | Path, *, check_files: bool = True) -> Manifest:
        """Read and validate a shard directory's manifest.

        With ``check_files`` every listed file must exist with the recorded shape (read from the
        ``.npy`` header only, so this is cheap); contents are checked by :func:`verify`.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"missing shard directory: {directory} does not exist (or is not a directory). {_CREATE_HINT}"
            )
        path = directory / MANIFEST_NAME
        if not path.is_file():
            leftovers = list_complete_shards(directory)
            why = (
                f"it holds {len(leftovers)} shard file(s) but no {MANIFEST_NAME}, so a harvest was "
                "interrupted; rerun `python -m c2r.harvest` with the same settings to resume it"
                if leftovers
                else f"it has no {MANIFEST_NAME} (the file written last, marking it complete)"
            )
            raise FileNotFoundError(
                f"incomplete or not a shard directory: {directory}: {why}. {_CREATE_HINT}"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); the shard directory is damaged: delete it and "
                "re-create it"
            ) from err
        manifest = cls._from_dict(raw, path)
        manifest.directory = directory
        if check_files:
            manifest._check_files()
        return manifest

    @classmethod
    def _from_dict(cls, raw: Any, path: Path) -> Manifest:
        if not isinstance(raw, dict):
            raise ValueError(f"{path} does not hold a JSON object; it is not a c2r shard manifest")
        version = raw.get("format_version")
        writer = raw.get("c2r_version", "an unknown version")
        if not isinstance(version, int):
            raise ValueError(
                f"{path} has no integer format_version (got {version!r}); it was not written by "
                "c2r's ShardWriter. Re-create the shards with `python -m c2r.harvest`."
            )
        if version != FORMAT_VERSION:
            newer = "newer than" if version > FORMAT_VERSION else "different from"
            raise ValueError(
                f"{path} uses shard format_version {version}, written by c2r {writer}; this is c2r "
                f"{__version__}, which reads format_version {FORMAT_VERSION} only ({newer} what it "
                f"supports). Install c2r {writer} or re-create the shards with this version."
            )
        required = ("d", "dtype", "rows_per_shard", "shards", "normalization_factor")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{path} lacks the field(s) {missing}; re-create the shard directory")
        if raw["dtype"] not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{path} has dtype {raw['dtype']!r}; supported dtypes are {SUPPORTED_DTYPES}"
            )
        try:
            shards = [ShardEntry(**entry) for entry in raw["shards"]]
        except TypeError as err:
            raise ValueError(f"{path} has a malformed shard entry ({err})") from err
        for entry in shards:
            if entry.split not in SPLITS:
                raise ValueError(f"{path}: shard {entry.file} has split {entry.split!r}, not in {SPLITS}")
        return cls(
            d=int(raw["d"]),
            dtype=raw["dtype"],
            rows_per_shard=int(raw["rows_per_shard"]),
            shards=shards,
            normalization_factor=float(raw["normalization_factor"]),
            source=dict(raw.get("source") or {}),
            format_version=version,
            c2r_version=str(writer),
        )

    def _check_files(self) -> None:
        for file, shape, dtype, _ in self.files():
            problem = npy_problem(self.path(file), shape, dtype)
            if problem is not None:
                error = FileNotFoundError if problem.kind == "missing" else ValueError
                raise error(
                    f"{problem.message}; `python -m c2r.harvest verify={self.directory}` lists every damaged "
                    f"file; fix: {recreate_hint(self.directory)}"
                )


def normalization_factor(entries: list[ShardEntry]) -> float:
    """``1 / sqrt(E‖x‖²)`` over the rows of ``entries`` (the mean weighted by shard rows)."""
    rows = sum(e.rows for e in entries)
    if rows == 0:
        raise ValueError("cannot compute a normalization factor from zero rows")
    mean_sq = sum(e.rows * e.mean_sq_norm for e in entries) / rows
    if not mean_sq > 0 or not math.isfinite(mean_sq):
        raise ValueError(
            f"the mean squared norm of the training rows is {mean_sq}; the activations are all zero "
            "or not finite, so they cannot be normalised. Check the hook/model that produced them."
        )
    return 1.0 / math.sqrt(mean_sq)


def recreate_hint(directory: str | Path) -> str:
    """How to get intact shards back into ``directory``, for the source its manifest names (``source.kind``)."""
    directory = Path(directory)
    try:
        source = Manifest.load(directory, check_files=False).source
    except (OSError, ValueError):
        source = {}
    kind = source.get("kind")
    if kind == "lm":
        return (
            f"delete {directory} and harvest it again (python -m c2r.harvest, or the training run, with the same "
            "data settings)"
        )
    if kind in ("synthetic", "synthetic_hierarchy"):
        return f"delete {directory}: the next run with the same data settings generates it again"
    if kind == "import":
        return f"delete {directory} and import again: python -m c2r.shards import {source.get('input')} {directory}"
    return f"restore {directory} from an intact copy, or write it again with the code that created it"
