"""On-disk activation shards: the format, its manifest, writer, reader and verifier.

A shard directory holds ``shard_00000.npy``, ``shard_00001.npy``, ... (each ``[rows, d]``, read with
``np.load(mmap_mode="r")``), optionally ``tokens_00000.npy``, ... (``[rows]`` int32 token id of each
row) and ``manifest.json``. The manifest is written last and atomically, so its presence marks the
directory as complete; every shard file is also written to a temporary name and renamed, so an
interrupted harvest never leaves half a shard behind and can be resumed (``ShardWriter(resume=True)``).

The modules, one job each: :mod:`~c2r.data.shards.files` (file names, hashing writes, checksums, leftovers of an
interrupted write), :mod:`~c2r.data.shards.manifest` (``manifest.json`` and how to get damaged shards back),
:mod:`~c2r.data.shards.writer` (:class:`ShardWriter`), :mod:`~c2r.data.shards.read` (:class:`ShardReader`, the
checked reads every consumer uses) and :mod:`~c2r.data.shards.verify` (:func:`verify`, a full check returning
:class:`Problem` records).
"""

from c2r.data.shards.files import (
    Problem,
    list_complete_shards,
    remove_temp_files,
    sha256_file,
    shard_name,
    tokens_name,
)
from c2r.data.shards.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    SUPPORTED_DTYPES,
    Manifest,
    ShardEntry,
    normalization_factor,
    recreate_hint,
)
from c2r.data.shards.read import ShardIntegrityError, ShardReader, check_rows, open_shard
from c2r.data.shards.verify import verify
from c2r.data.shards.writer import ShardWriter, build_manifest, check_shard_split, stored_arrays, write_shard

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPLITS",
    "SUPPORTED_DTYPES",
    "Manifest",
    "Problem",
    "ShardEntry",
    "ShardIntegrityError",
    "ShardReader",
    "ShardWriter",
    "build_manifest",
    "check_rows",
    "check_shard_split",
    "list_complete_shards",
    "normalization_factor",
    "open_shard",
    "recreate_hint",
    "remove_temp_files",
    "sha256_file",
    "shard_name",
    "tokens_name",
    "stored_arrays",
    "verify",
    "write_shard",
]
