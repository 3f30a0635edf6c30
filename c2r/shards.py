"""``python -m c2r.shards import <input> <out_dir>``: bring activations made elsewhere into a shard directory.

The input is an ``[N, d]`` matrix of activations, one row per token:

- a ``.npy`` file (memory-mapped, so N may exceed RAM);
- a ``.safetensors`` file (memory-mapped too; ``--tensor`` names the tensor when the file holds several);
- a Hugging Face ``datasets`` column of ``d``-vectors (``--column``): a ``save_to_disk`` folder (``--split`` for a
  DatasetDict), a ``.parquet`` or an ``.arrow`` file.

Rows are shuffled across the whole input with ``--seed`` and written one shard at a time by
:class:`~c2r.data.shards.ShardWriter` (memory: one shard plus the permutation), the last ``--val-shards`` shards
held out, the normalisation factor and the per-shard statistics in the manifest. The directory appears complete
or not at all. Train on it with ``python -m c2r.train data=shards data.path=<out_dir>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from c2r.data.sources import generate_once
from c2r.data.shards import SUPPORTED_DTYPES, Manifest, ShardWriter, check_shard_split

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class ShardImportError(ValueError):
    """An input that cannot become shards, with what is wrong and how to fix it."""


@dataclass
class Rows:
    """An ``[n, d]`` input read by row numbers: ``take(sorted indices)`` gives those rows as a float array."""

    n: int
    d: int
    take: Callable[[np.ndarray], np.ndarray]
    describe: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest's source


def _check_matrix(path: Path, shape: tuple[int, ...], dtype: Any, what: str = "the array") -> None:
    if len(shape) != 2:
        raise ShardImportError(
            f"{what} in {path} has shape {list(shape)}, but activations must be [N, d] (one row per token): "
            "flatten the leading dimensions first, e.g. acts.reshape(-1, d)"
        )
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ShardImportError(f"{what} in {path} holds {np.dtype(dtype)} values; activations must be floating point")
    if shape[0] == 0 or shape[1] == 0:
        raise ShardImportError(f"{what} in {path} is empty (shape {list(shape)})")


def npy_rows(path: Path) -> Rows:
    """A ``.npy`` file, memory-mapped."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ShardImportError(f"{path} is not a readable .npy file ({err})") from err
    _check_matrix(path, array.shape, array.dtype)
    return Rows(array.shape[0], array.shape[1], lambda idx: array[idx], {"format": "npy"})


def safetensors_rows(path: Path, tensor: str | None) -> Rows:
    """One tensor of a ``.safetensors`` file, memory-mapped (the format: an 8-byte header length, a JSON header
    giving each tensor's dtype, shape and byte range, then the data)."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as err:
        raise ShardImportError(f"{path} is not a readable safetensors file ({err})") from err
    names = sorted(k for k in header if k != "__metadata__")
    if tensor is None:
        if len(names) != 1:
            raise ShardImportError(f"{path} holds {len(names)} tensors; choose one with --tensor (one of {names})")
        tensor = names[0]
    if tensor not in header or tensor == "__metadata__":
        raise ShardImportError(f"{path} has no tensor {tensor!r}; its tensors: {names}")
    info = header[tensor]
    shape = tuple(info["shape"])
    what = f"tensor {tensor!r}"
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ShardImportError(f"{what} in {path} holds {info['dtype']} values; activations must be floating point")
    _check_matrix(path, shape, np.float32, what)
    begin = 8 + header_len + info["data_offsets"][0]
    array = np.memmap(path, dtype=_SAFETENSORS_DTYPES[info["dtype"]], mode="r", offset=begin, shape=shape)
    if info["dtype"] == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32's
        def take(idx: np.ndarray) -> np.ndarray:
            return (array[idx].astype(np.uint32) << 16).view(np.float32)
    else:
        def take(idx: np.ndarray) -> np.ndarray:
            return array[idx]
    return Rows(shape[0], shape[1], take, {"format": "safetensors", "tensor": tensor})


def dataset_rows(path: Path, column: str | None, split: str | None, cache_dir: Path) -> Rows:
    """A column of a Hugging Face dataset: a ``save_to_disk`` folder, a ``.parquet`` or an ``.arrow`` file."""
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ShardImportError(f"{path} holds the splits {sorted(loaded)}; choose one with --split")
            loaded = loaded[split]
    elif path.suffix == ".parquet":
        loaded = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
    else:
        loaded = datasets.Dataset.from_file(str(path))
    if column is None or column not in loaded.column_names:
        given = "needs --column" if column is None else f"has no column {column!r}"
        raise ShardImportError(f"the dataset {path} {given}; its columns: {loaded.column_names}")
    table = loaded.select_columns([column]).with_format("numpy")
    first = np.asarray(table[0][column])
    _check_matrix(path, (len(table), *first.shape), first.dtype, f"column {column!r}")
    d = first.shape[0]

    def take(idx: np.ndarray) -> np.ndarray:
        rows = table[idx.tolist()][column]
        if not isinstance(rows, np.ndarray) or rows.shape != (len(idx), d):
            raise ShardImportError(f"column {column!r} of {path} holds vectors of different lengths; each must be {d}")
        return rows

    return Rows(len(table), d, take, {"format": "dataset", "column": column, "split": split})


def import_activations(
    source: str | Path,
    out_dir: str | Path,
    *,
    tensor: str | None = None,
    column: str | None = None,
    split: str | None = None,
    rows_per_shard: int = 16_384,
    val_shards: int = 1,
    dtype: str = "float32",
    seed: int = 0,
    model: str | None = None,
    hook: str | None = None,
) -> Manifest:
    """Write the rows of ``source`` (see the module docstring) as a new shard directory ``out_dir``.

    ``model`` and ``hook`` are only recorded (the exported SAE's metadata names them).
    """
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    if not source.exists():
        raise ShardImportError(f"input {source} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ShardImportError(f"{out_dir} already exists and is not empty: choose a new directory or delete it")
    with tempfile.TemporaryDirectory(prefix="c2r-import-") as scratch:
        rows = _open(source, tensor, column, split, Path(scratch))
        check_shard_split(rows.n, rows_per_shard, val_shards, rows_key="input rows", error=ShardImportError)
        provenance = {"kind": "import", "input": str(source.resolve()), **rows.describe, "rows": rows.n, "seed": seed}
        provenance.update({k: v for k, v in (("model", model), ("hook", hook)) if v is not None})

        def write(directory: Path) -> None:
            writer = ShardWriter(directory, d=rows.d, rows_per_shard=rows_per_shard, dtype=dtype, seed=seed,
                                 source=provenance)
            order = np.random.default_rng(seed).permutation(rows.n)
            for start in range(0, rows.n, rows_per_shard):
                chunk = _checked(rows, np.sort(order[start : start + rows_per_shard]), source)
                writer.add(chunk)
            writer.finalize(val_shards=val_shards)

        generate_once(out_dir, write)
    return Manifest.load(out_dir)


def _open(source: Path, tensor: str | None, column: str | None, split: str | None, scratch: Path) -> Rows:
    if source.suffix == ".npy":
        return npy_rows(source)
    if source.suffix == ".safetensors":
        return safetensors_rows(source, tensor)
    if source.is_dir() or source.suffix in (".parquet", ".arrow"):
        return dataset_rows(source, column, split, scratch)
    raise ShardImportError(
        f"cannot tell what {source} holds: expected a .npy, .safetensors, .parquet or .arrow file, or a folder "
        "written by datasets' save_to_disk"
    )


def _checked(rows: Rows, idx: np.ndarray, source: Path) -> np.ndarray:
    """The rows ``idx`` of the input; a NaN/inf among them stops the import, naming the input's first bad rows."""
    chunk = rows.take(idx)
    if np.isfinite(chunk).all():
        return chunk
    bad, count = [], 0
    for start in range(0, rows.n, 4096):
        finite = np.isfinite(rows.take(np.arange(start, min(start + 4096, rows.n)))).all(axis=1)
        bad += (np.flatnonzero(~finite)[: 5 - len(bad)] + start).tolist()
        count += int((~finite).sum())
    raise ShardImportError(
        f"{source} has NaN or inf in {count} row(s), the first at row(s) {bad}; drop or fix those rows and import again"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m c2r.shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("import", help="turn an [N, d] array or dataset column into a shard directory")
    cmd.add_argument("input", type=Path, help=".npy, .safetensors, .parquet, .arrow, or a save_to_disk folder")
    cmd.add_argument("out_dir", type=Path, help="the shard directory to create (must not exist, or be empty)")
    cmd.add_argument("--tensor", help="the safetensors tensor to read (needed when the file holds several)")
    cmd.add_argument("--column", help="the dataset column holding one d-vector per row")
    cmd.add_argument("--split", help="the split of a saved DatasetDict")
    cmd.add_argument("--rows-per-shard", type=int, default=16_384, help="rows per shard (default 16384)")
    cmd.add_argument("--val-shards", type=int, default=1, help="last shards held out for validation (default 1)")
    cmd.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES, help="storage dtype (default float32)")
    cmd.add_argument("--seed", type=int, default=0, help="seeds the row shuffle (default 0)")
    cmd.add_argument("--model", help="record the model the activations come from (export metadata)")
    cmd.add_argument("--hook", help="record the hook they were read at (export metadata)")
    args = parser.parse_args(argv)
    try:
        manifest = import_activations(
            args.input, args.out_dir, tensor=args.tensor, column=args.column, split=args.split,
            rows_per_shard=args.rows_per_shard, val_shards=args.val_shards, dtype=args.dtype, seed=args.seed,
            model=args.model, hook=args.hook,
        )
    except ValueError as err:  # ShardImportError, and ShardWriter's refusals (e.g. values overflowing float16)
        sys.exit(f"error: {err}")
    print(
        f"{manifest.directory}: {manifest.train_rows} training + {manifest.val_rows} validation rows of d={manifest.d} "
        f"({manifest.dtype}) in {len(manifest.shards)} shards. Train with: "
        f"python -m c2r.train data=shards data.path={manifest.directory}"
    )


if __name__ == "__main__":
    main()
