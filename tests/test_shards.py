"""On-disk shard format: writer, manifest, verifier."""

from __future__ import annotations

import json

import numpy as np
import pytest

import c2r
from c2r.data import Manifest, ShardWriter, list_complete_shards, verify

D = 6


def _rows(n: int, seed: int = 0, start_token: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose first column equals their token id, so alignment survives any permutation."""
    rng = np.random.default_rng(seed)
    tokens = np.arange(start_token, start_token + n, dtype=np.int64)
    acts = rng.normal(size=(n, D)).astype(np.float32)
    acts[:, 0] = tokens
    return acts, tokens


def _write(directory, n=250, rows_per_shard=64, val_shards=1, chunk=37, **kwargs) -> Manifest:
    writer = ShardWriter(directory, d=D, rows_per_shard=rows_per_shard, source={"model": "toy"}, **kwargs)
    acts, tokens = _rows(n)
    for start in range(0, n, chunk):  # uneven chunks exercise the buffering
        writer.add(acts[start : start + chunk], tokens[start : start + chunk])
    return writer.finalize(val_shards=val_shards)


def test_round_trip_shapes_and_splits(tmp_path):
    written = _write(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == written
    assert loaded.format_version == 1
    assert loaded.c2r_version == c2r.__version__
    assert loaded.d == D and loaded.dtype == "float32" and loaded.rows_per_shard == 64
    assert loaded.source == {"model": "toy"}
    assert [s.rows for s in loaded.shards] == [64, 64, 64, 58]
    assert [s.split for s in loaded.shards] == ["train", "train", "train", "val"]
    assert loaded.train_rows == 192 and loaded.val_rows == 58
    for entry in loaded.shards:
        acts = np.load(tmp_path / entry.file, mmap_mode="r")
        assert acts.shape == (entry.rows, D) and acts.dtype == np.float32
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert set(raw) >= {"format_version", "c2r_version", "d", "dtype", "rows_per_shard", "shards",
                        "normalization_factor", "source"}
    assert set(raw["shards"][0]) >= {"file", "rows", "sha256", "split", "mean_sq_norm", "tokens_file"}


def test_shuffle_keeps_tokens_aligned_and_mixes_rows(tmp_path):
    manifest = _write(tmp_path)
    seen = []
    for entry in manifest.shards:
        acts = np.load(tmp_path / entry.file)
        tokens = np.load(tmp_path / entry.tokens_file)
        assert tokens.dtype == np.int32 and tokens.shape == (entry.rows,)
        np.testing.assert_array_equal(acts[:, 0], tokens)
        seen.append(tokens)
    first = seen[0]
    assert sorted(first.tolist()) == list(range(64))  # shard 0 holds the first 64 rows ...
    assert first.tolist() != list(range(64))  # ... shuffled
    assert sorted(np.concatenate(seen).tolist()) == list(range(250))


def test_shuffle_is_deterministic(tmp_path):
    _write(tmp_path / "a", seed=3)
    _write(tmp_path / "b", seed=3)
    _write(tmp_path / "c", seed=4)
    a, b, c = (np.load(tmp_path / x / "tokens_00000.npy") for x in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    _write(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [f"{kind}_{i:05d}.npy" for kind in ("shard", "tokens") for i in range(4)]
    assert names == sorted(["manifest.json", *shards])


def test_verify_detects_a_corrupted_byte(tmp_path):
    _write(tmp_path)
    assert verify(tmp_path) == []
    path = tmp_path / "shard_00002.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify(tmp_path)
    assert [(p.kind, p.file) for p in problems] == [("sha256", path)]
    assert "shard_00002.npy" in problems[0].message and "sha256" in problems[0].message


def test_normalization_factor_uses_train_rows_only(tmp_path):
    writer = ShardWriter(tmp_path, d=D, rows_per_shard=50, source={})
    rng = np.random.default_rng(1)
    writer.add(rng.normal(size=(100, D)) * 3.0)
    writer.add(rng.normal(size=(50, D)) * 100.0)  # the val shard: far larger, must not matter
    manifest = writer.finalize(val_shards=1)
    train = np.concatenate([np.load(tmp_path / s.file) for s in manifest.train_shards]).astype(np.float64)
    scaled = train * manifest.normalization_factor
    assert abs(np.mean(np.sum(scaled**2, axis=1)) - 1.0) < 1e-5
    val = np.load(tmp_path / manifest.val_shards[0].file).astype(np.float64) * manifest.normalization_factor
    assert np.mean(np.sum(val**2, axis=1)) > 100


def test_float16_storage_and_overflow(tmp_path):
    manifest = _write(tmp_path / "ok", dtype="float16")
    assert manifest.dtype == "float16"
    assert np.load(tmp_path / "ok" / "shard_00000.npy", mmap_mode="r").dtype == np.float16
    writer = ShardWriter(tmp_path / "big", d=D, rows_per_shard=8, dtype="float16", source={})
    with pytest.raises(ValueError, match="overflow float16.*float32"):
        writer.add(np.full((4, D), 1e5, dtype=np.float32))


def test_nonfinite_input_refused(tmp_path):
    writer = ShardWriter(tmp_path, d=D, rows_per_shard=8, source={})
    acts = np.zeros((4, D), dtype=np.float32)
    acts[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(rows \[2\]"):
        writer.add(acts)


def test_too_few_shards_for_validation(tmp_path):
    writer = ShardWriter(tmp_path, d=D, rows_per_shard=64, source={})
    writer.add(np.ones((64, D), dtype=np.float32))
    with pytest.raises(ValueError, match="no training shard"):
        writer.finalize(val_shards=1)
    assert not (tmp_path / "manifest.json").exists()


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*python -m c2r.harvest.*data=synthetic"):
        Manifest.load(tmp_path / "nope")


def test_load_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json.*python -m c2r.harvest"):
        Manifest.load(tmp_path)
    writer = ShardWriter(tmp_path, d=D, rows_per_shard=8, source={})
    writer.add(np.ones((20, D), dtype=np.float32))  # two shards, never finalized
    with pytest.raises(FileNotFoundError, match="interrupted.*resume"):
        Manifest.load(tmp_path)


def test_load_missing_or_wrong_shard(tmp_path):
    _write(tmp_path)
    np.save(tmp_path / "shard_00001.npy", np.zeros((3, D), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shard_00001.npy has shape \(3, 6\).*\(64, 6\).*verify"):
        Manifest.load(tmp_path)
    (tmp_path / "shard_00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.npy.*missing.*verify=.*fix: restore"):
        Manifest.load(tmp_path)
    assert [(p.kind, p.file.name) for p in verify(tmp_path)] == [("missing", "shard_00001.npy")]


def test_load_unknown_format_version(tmp_path):
    _write(tmp_path)
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    raw["format_version"], raw["c2r_version"] = 7, "9.9.9"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version 7, written by c2r 9.9.9.*Install c2r 9.9.9"):
        Manifest.load(tmp_path)


def test_writer_refuses_existing_and_resumes(tmp_path):
    acts, tokens = _rows(200)
    writer = ShardWriter(tmp_path, d=D, rows_per_shard=64, seed=5, source={})
    writer.add(acts[:150], tokens[:150])  # two shards on disk, 22 rows lost with the "crash"
    (tmp_path / ".shard_00002.npy.deadbeef.tmp").write_bytes(b"half a shard")
    assert [p.name for p in list_complete_shards(tmp_path)] == ["shard_00000.npy", "shard_00001.npy"]

    with pytest.raises(FileExistsError, match="resume=True"):
        ShardWriter(tmp_path, d=D, rows_per_shard=64, seed=5, source={})
    resumed = ShardWriter(tmp_path, d=D, rows_per_shard=64, seed=5, source={}, resume=True)
    assert resumed.rows_written == 128
    assert not (tmp_path / ".shard_00002.npy.deadbeef.tmp").exists()
    resumed.add(acts[128:], tokens[128:])
    manifest = resumed.finalize(val_shards=1)

    _write(tmp_path / "ref", n=200, chunk=200, seed=5)
    reference = Manifest.load(tmp_path / "ref")
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in reference.shards]
    assert manifest.normalization_factor == pytest.approx(reference.normalization_factor, rel=1e-12)
    with pytest.raises(FileExistsError, match="already holds a complete shard set"):
        ShardWriter(tmp_path, d=D, rows_per_shard=64, source={})
