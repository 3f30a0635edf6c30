"""A harvest split over processes (c2r/data/harvest_parts.py, python -m c2r.harvest parts=N part=i): the parts'
union is byte for byte the single-process harvest, in the same cache folder.

The tiny random Llama on the sentences of test_harvest.py; ``tokens=1000`` in shards of 128 rows, so the last
shard is short and most shards start inside a batch of 4 contexts (~120 rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from c2r.data import Manifest
from c2r.data.activations import HarvestError
from c2r.data.harvest_parts import PartsIncomplete, check_split, finalize_parts, harvest_part, part_name
from c2r.data.synthetic import SyntheticShards

from conftest import run_cli
from test_harvest import SENTENCES, shard_bytes, tiny


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": " ".join(SENTENCES[i % 8 :] + SENTENCES[: i % 8])}) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(docs, tmp_path_factory) -> Manifest:
    """The single-process harvest."""
    return Manifest.load(tiny(docs, tmp_path_factory.mktemp("reference"), tokens=1000).ensure())


def manifest_without_timing(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["source"].pop("seconds")
    return manifest


def assert_same_harvest(directory: Path, reference: Manifest) -> None:
    assert shard_bytes(directory) == shard_bytes(reference.directory)  # shard and token files
    assert manifest_without_timing(directory) == manifest_without_timing(reference.directory)
    assert not list(directory.glob("harvest_part_*.json")) and not list(directory.glob(".*.tmp"))


def test_two_parts_write_the_single_process_harvest_byte_for_byte(docs, tmp_path, reference):
    source = tiny(docs, tmp_path, tokens=1000)
    assert source.shard_dir.name == reference.directory.name  # the same cache key: training finds the shards
    assert harvest_part(source, 0, 2) is None  # part 1 has not run: no manifest yet
    written = sorted(p.name for p in source.shard_dir.glob("shard_*.npy"))
    assert written == [f"shard_{k:05d}.npy" for k in (0, 2, 4, 6)]
    assert not (source.shard_dir / "manifest.json").exists()

    manifest = harvest_part(tiny(docs, tmp_path, tokens=1000), 1, 2)  # the last part writes the manifest
    assert manifest is not None and manifest.directory == source.shard_dir
    assert [s.rows for s in manifest.shards] == [128] * 7 + [104]
    assert_same_harvest(source.shard_dir, reference)
    assert tiny(docs, tmp_path, tokens=1000).ensure() == source.shard_dir  # found as a complete cache


def test_finalize_names_the_missing_parts_and_the_command(docs, tmp_path, reference):
    source = tiny(docs, tmp_path, tokens=1000)
    harvest_part(source, 1, 3)
    with pytest.raises(PartsIncomplete, match=r"part\(s\) 0, 2 of 3 have not finished.*python -m c2r.harvest "
                                              r"parts=3 part=0; python -m c2r.harvest parts=3 part=2"):
        finalize_parts(source, 3)
    assert not (source.shard_dir / "manifest.json").exists()
    harvest_part(source, 0, 3)
    harvest_part(source, 2, 3)
    assert_same_harvest(source.shard_dir, reference)
    assert finalize_parts(source, 3).directory == source.shard_dir  # finalizing again finds the manifest


class Killed(Exception):
    pass


def test_a_killed_part_resumes_to_the_same_bytes(docs, tmp_path, monkeypatch, reference):
    from c2r.data import harvest_parts

    original, written = harvest_parts.write_shard, []

    def write_shard(directory, index, *args, **kwargs):
        if written:  # killed while writing its second shard: the first is recorded, a temporary is left
            (directory / f".shard_{index:05d}.npy.deadbeef.tmp").write_bytes(b"half")
            raise Killed()
        written.append(index)
        return original(directory, index, *args, **kwargs)

    source = tiny(docs, tmp_path, tokens=1000)
    harvest_part(source, 0, 2)
    monkeypatch.setattr(harvest_parts, "write_shard", write_shard)
    with pytest.raises(Killed):
        harvest_part(source, 1, 2)
    monkeypatch.undo()
    record = json.loads((source.shard_dir / part_name(1, 2)).read_text())
    assert sorted(record["entries"]) == ["1"] and not record["complete"]

    assert harvest_part(tiny(docs, tmp_path, tokens=1000), 1, 2) is not None
    assert_same_harvest(source.shard_dir, reference)


def test_bad_split_settings_are_refused_with_the_fix(docs, tmp_path):
    source = tiny(docs, tmp_path)
    for parts, part, finalize, message in [
        (0, None, False, r"parts=0: the number of processes .* >= 1"),
        ("2", 0, False, r"parts='2'"),
        (True, 0, False, r"parts=True"),
        (1, 0, False, r"part=0 needs parts=N > 1 .* drop it to harvest in one process"),
        (1, None, True, r"finalize=true needs parts=N > 1"),
        (4, None, False, r"part=None: with parts=4, part is this process's share, one of 0\.\.3"),
        (4, 4, False, r"part=4: .* one of 0\.\.3 \(e\.g\. parts=4 part=0\), or finalize=true"),
        (4, -1, False, r"part=-1"),
        (4, 1, True, r"finalize=true writes the manifest of all 4 parts: drop part=1"),
    ]:
        with pytest.raises(HarvestError, match=message):
            check_split(source, parts, part, finalize)
    check_split(source, 1, None, False)
    check_split(source, 4, 3, False)
    check_split(source, 4, None, True)
    with pytest.raises(HarvestError, match=r"outlier_norm=3\.0: which rows .* depends on the model's activations.*"
                                           r"outlier_norm=null"):
        check_split(tiny(docs, tmp_path, outlier_norm=3.0), 2, 0, False)
    with pytest.raises(HarvestError, match="only a language-model harvest is split.*SyntheticShards"):
        check_split(SyntheticShards(cache_dir=tmp_path), 2, 0, False)
    with pytest.raises(HarvestError, match=r"cannot split .* the text gives \d+ rows, 1 shard\(s\) .* use more text"):
        harvest_part(tiny(docs, tmp_path, tokens=100_000, rows_per_shard=8192), 0, 2)  # ~6,500 rows


def test_the_command_refuses_a_part_out_of_range_in_one_line(tmp_path):
    result = run_cli("c2r.harvest", "parts=2", "part=2", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "HarvestError: part=2: with parts=2, part is this process's share, one of 0..1" in result.stderr
    assert "Traceback" not in result.stderr


def test_parts_run_at_once_as_processes_write_the_same_shard_set(docs, tmp_path, reference):
    """Two `python -m c2r.harvest` parts at the same time into one folder; the later one writes the manifest."""
    import subprocess
    import sys

    from conftest import cli_env

    overrides = [
        "data=smollm2", "data/text=files", "data.text.dataset=jsonl", f"data.text.data_files={docs}",
        "data.source.model=tiny-random-llama", "data.source.hook=blocks.0.hook_resid_post",
        "data.source.context_start=bos", "data.source.doc_separator=eos", "data.source.context_length=32",
        "data.source.tokens=1000", "data.source.rows_per_shard=128", "data.source.batch_size=4",
        "data.source.dtype=float32", "data.source.outlier_norm=null", "data.source.shuffle_buffer=16",
        "data.source.progress=false", "data.source.device=cpu", f"cache_dir={tmp_path / 'cache'}", "parts=2",
    ]
    jobs = [
        subprocess.Popen([sys.executable, "-m", "c2r.harvest", *overrides, f"part={part}"], cwd=tmp_path,
                         env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for part in (0, 1)
    ]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err for _, err in outputs]
    (directory,) = (tmp_path / "cache" / "activations").iterdir()
    assert directory.name == reference.directory.name
    assert_same_harvest(directory, reference)
