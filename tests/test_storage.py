"""The storage helpers every writer shares: atomic replacement, content keys, derived seeds."""

from __future__ import annotations

import pytest

from c2r.data import SyntheticShards
from c2r.data.hierarchy import HierarchicalShards
from c2r.storage import TMP_SUFFIX, atomic_path, atomic_write, atomic_write_text, content_key


def test_atomic_write_replaces_the_file_and_returns_what_write_returns(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    assert atomic_write(path, lambda f: f.write(b"new")) == 3
    assert path.read_bytes() == b"new"
    assert atomic_write_text(path, "é") == path and path.read_text(encoding="utf-8") == "é"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert not list(tmp_path.glob(f".*{TMP_SUFFIX}"))


def test_a_folder_renamed_into_place_first_by_another_writer_is_kept(tmp_path):
    target = tmp_path / "cache"
    with atomic_path(target) as ours:
        ours.mkdir()
        (ours / "mine").write_text("ours")
        target.mkdir()  # a concurrent writer wins the race
        (target / "theirs").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_content_keys_of_existing_caches_do_not_change():
    """Cached shards are found again only while their folder names stay the same: these are today's (generator
    version 2, since the synthetic streams are named in c2r.seeds; a change here must come with a version bump)."""
    assert content_key({"b": 1, "a": [1.5, None]}) == content_key({"a": [1.5, None], "b": 1})
    assert content_key({"a": 1}, length=12) == content_key({"a": 1})[:12]
    assert SyntheticShards(cache_dir="/c").shard_dir.as_posix() == "/c/synthetic/63c6ea86515b17d0"
    assert HierarchicalShards(cache_dir="/c").shard_dir.as_posix() == "/c/synthetic/781c3ca6149ef420"
