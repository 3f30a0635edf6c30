"""Data-side fault probes: damaged shards at read time, the hints of the data errors, and importing activations
(``python -m c2r.shards import``). Everything runs on tiny synthetic data or the tiny random Llama."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from c2r.data import ActivationDataModule, ExistingShards, Manifest, ShardIntegrityError, ShardWriter, verify
from c2r.data.harvest import HarvestedShards, HarvestError
from c2r.data.shards import recreate_hint, sha256_file
from c2r.shards import ShardImportError, import_activations, main
from c2r.train import train

from conftest import TINY, TINY_JOB, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def flip_byte(path: Path, row: int, *, high: bool) -> tuple[int, float, float]:
    """XOR one byte of the largest element of ``row`` with |value| < 1, in place: ``high`` flips the top exponent
    bit (the value times 2^128 in float32, e.g. 0.5 → 1.7e38, or 2^16 in float16: huge but finite), else the
    lowest mantissa byte (a small finite change). Returns ``(column, old value, new value)``."""
    data = np.load(path)
    col = int(np.argmax(np.where(np.abs(data[row]) < 1, np.abs(data[row]), -1)))
    item = data.dtype.itemsize
    offset = path.stat().st_size - data.nbytes + (row * data.shape[1] + col) * item
    raw = bytearray(path.read_bytes())
    if high:
        raw[offset + item - 1] ^= 0x40
    else:
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    new = float(np.load(path)[row, col])
    assert np.isfinite(new)
    return col, float(data[row, col]), new


def vouch_for(directory: Path) -> None:
    """Rewrite the manifest's checksums to match the files: damage the sha256 check can no longer see."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = sha256_file(directory / entry["file"])
    path.write_text(json.dumps(manifest))


def write_shards(directory: Path, *, dtype: str = "float32", rows: int = 512, d: int = 8) -> np.ndarray:
    acts = np.random.default_rng(0).normal(scale=0.5, size=(rows, d)).astype(np.float32)
    writer = ShardWriter(directory, d=d, rows_per_shard=128, dtype=dtype, source={"kind": "test"}, shuffle=False)
    writer.add(acts)
    writer.finalize(val_shards=1)
    return acts


def first_batches(directory: Path, n: int, batch_size: int = 32) -> list[torch.Tensor]:
    dm = ActivationDataModule(ExistingShards(directory), batch_size=batch_size, seed=0)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Damaged shards stop the run at their first read
# --------------------------------------------------------------------------------------------------


def test_huge_finite_byte_flip_in_a_synthetic_shard_stops_training_naming_the_file(compose_train, tmp_path):
    cfg = compose_train(*TINY, f"cache_dir={tmp_path / 'cache'}")
    directory = instantiate(cfg.data.source).ensure()
    shard = directory / "shard_00001.npy"
    _, old, new = flip_byte(shard, 500, high=True)
    assert abs(old) < 1 and 1e30 < abs(new) < float("inf")  # finite: the NaN/inf check alone would not see it
    with pytest.raises(ShardIntegrityError) as err:
        train(cfg)
    message = str(err.value)
    assert f"shard file {shard} does not match the sha256" in message
    assert f"fix: delete {directory}: the next run with the same data settings generates it again" in message
    assert "\n" not in message
    assert not (tmp_path / "run" / "metrics.json").exists()  # a relaunch retries instead of skipping


def test_small_finite_flip_is_caught_at_the_first_read_of_that_shard_only(tmp_path):
    write_shards(tmp_path)
    flip_byte(tmp_path / "shard_00002.npy", 70, high=False)
    dm = ActivationDataModule(ExistingShards(tmp_path), batch_size=32, seed=0)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    blocks = {k: dataset.location(k)[0] for k in range(len(dataset))}
    for k, file in blocks.items():
        if file != "shard_00002.npy":
            assert dataset[k].shape == (32, 8)  # intact shards read normally
    damaged = next(k for k, file in blocks.items() if file == "shard_00002.npy")
    with pytest.raises(ShardIntegrityError, match=r"shard_00002\.npy does not match the sha256.*fix: restore"):
        dataset[damaged]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bound_stops_finite_garbage_the_checksum_vouches_for(tmp_path, dtype):
    acts = write_shards(tmp_path, dtype=dtype)
    recorded = Manifest.load(tmp_path).shards[1].max_abs
    assert recorded == pytest.approx(np.abs(acts[128:256]).max(), rel=1e-3)  # stored exactly, in its dtype
    _, _, new = flip_byte(tmp_path / "shard_00001.npy", 37, high=True)
    vouch_for(tmp_path)
    with pytest.raises(ShardIntegrityError) as err:
        first_batches(tmp_path, 12)  # 12 blocks of 32: every training block
    message = str(err.value)
    assert f"shard_00001.npy row(s) [37] hold |values| up to {abs(new):.3g}" in message
    assert f"records a largest |value| of {recorded:.4g}" in message
    assert "verify" not in message  # verify reports OK here: the checksums match


def test_float16_harvest_cache_with_a_flipped_byte_stops_training(compose_train, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Sentence {i} about sparse autoencoders."}) + "\n"
                            for i in range(40)))
    cfg = compose_train(
        "data=smollm2", "data/text=files", "data.text.dataset=jsonl", f"data.text.data_files={docs}",
        "data.source.model=tiny-random-llama", "data.source.hook=blocks.0.hook_resid_post", "data.d_in=32",
        "data.source.context_start=bos", "data.source.doc_separator=eos", "data.source.context_length=32",
        "data.source.tokens=1024", "data.source.rows_per_shard=256",
        "data.source.dtype=float16", "data.source.progress=false", "data.source.device=cpu",
        f"cache_dir={tmp_path / 'cache'}", *TINY_JOB,
    )
    directory = instantiate(cfg.data.source).ensure()
    assert Manifest.load(directory).dtype == "float16"
    shard = directory / "shard_00002.npy"
    flip_byte(shard, 100, high=True)
    with pytest.raises(ShardIntegrityError, match=rf"{shard} does not match the sha256.*fix: delete {directory} "
                                                  r"and harvest it again \(python -m c2r.harvest"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_manifest_without_stats_still_loads_and_reads(tmp_path):
    acts = write_shards(tmp_path)
    path = tmp_path / "manifest.json"
    old = json.loads(path.read_text())
    for entry in old["shards"]:
        del entry["max_abs"]  # as c2r wrote manifests before recording it
    path.write_text(json.dumps(old))
    manifest = Manifest.load(tmp_path)
    assert all(entry.max_abs is None for entry in manifest.shards)
    batches = first_batches(tmp_path, 12)
    rows = torch.cat(batches) / manifest.normalization_factor
    assert {tuple(r) for r in rows.numpy().round(4).tolist()} == {tuple(r) for r in acts[:384].round(4).tolist()}
    flip_byte(tmp_path / "shard_00000.npy", 3, high=False)  # the checksum still guards old manifests
    with pytest.raises(ShardIntegrityError, match="shard_00000.npy does not match the sha256"):
        first_batches(tmp_path, 12)


# --------------------------------------------------------------------------------------------------
# verify() and its hints
# --------------------------------------------------------------------------------------------------


def test_verify_returns_one_structured_problem_per_damaged_file(tmp_path):
    write_shards(tmp_path)
    assert verify(tmp_path) == []
    flip_byte(tmp_path / "shard_00000.npy", 5, high=False)
    np.save(tmp_path / "shard_00001.npy", np.zeros((3, 8), dtype=np.float32))
    (tmp_path / "shard_00002.npy").write_bytes(b"not an npy file")
    (tmp_path / "shard_00003.npy").unlink()
    problems = verify(tmp_path)
    assert [(p.kind, p.file.name) for p in problems] == [
        ("sha256", "shard_00000.npy"), ("shape", "shard_00001.npy"), ("unreadable", "shard_00002.npy"),
        ("missing", "shard_00003.npy"),
    ]
    assert all(p.file.name in p.message and "\n" not in p.message for p in problems)
    (tmp_path / "manifest.json").write_text("{")
    (problem,) = verify(tmp_path)
    assert problem.kind == "manifest" and problem.file == tmp_path / "manifest.json" and "not valid JSON" in str(problem)


def test_harvest_verify_on_a_synthetic_folder_does_not_say_harvest(tmp_path):
    cache = tmp_path / "cache"
    source = instantiate({"_target_": "c2r.data.SyntheticShards", "d": 8, "n_features": 16, "l0": 2, "rows": 512,
                          "rows_per_shard": 128, "cache_dir": str(cache)})
    directory = source.ensure()
    flip_byte(directory / "shard_00001.npy", 9, high=False)
    result = run_cli("c2r.harvest", f"verify={directory}", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert f"shard file {directory / 'shard_00001.npy'} does not match the sha256" in result.stderr
    assert f"Fix: delete {directory}: the next run with the same data settings generates it again" in result.stderr
    assert "harvest again" not in result.stderr and "harvest it again" not in result.stderr


def test_recreate_hint_fits_each_source(tmp_path):
    imported = tmp_path / "imported"
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32))
    import_activations(tmp_path / "acts.npy", imported, rows_per_shard=64)
    assert recreate_hint(imported) == (
        f"delete {imported} and import again: python -m c2r.shards import {tmp_path / 'acts.npy'} {imported}"
    )
    write_shards(tmp_path / "own")
    assert recreate_hint(tmp_path / "own").startswith(f"restore {tmp_path / 'own'} from an intact copy")
    assert "harvest it again" not in recreate_hint(imported) + recreate_hint(tmp_path / "own")


# --------------------------------------------------------------------------------------------------
# Harvest and model-loading hints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_disk_space_message_offers_float16_only_when_it_is_not(tmp_path, monkeypatch, dtype):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a few words of text " * 20}) + "\n")
    source = HarvestedShards(model="tiny-random-llama", hook="blocks.0.hook_resid_post", dtype=dtype,
                             text={"dataset": "jsonl", "data_files": str(docs)}, context_start="bos",
                             doc_separator="eos", context_length=16, tokens=256,
                             rows_per_shard=64, progress=False, device="cpu", cache_dir=tmp_path / "cache")
    monkeypatch.setattr("c2r.storage.shutil.disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(HarvestError, match="not enough disk space.*lower tokens") as err:
        source.ensure()
    assert ("dtype=float16" in str(err.value)) == (dtype == "float32")


def test_full_disk_while_saving_the_smollm2_copy_is_one_warning_line(tmp_path, monkeypatch, caplog):
    from safetensors import SafetensorError

    from c2r.data import lm

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_model", full)
    model, tokenizer = lm.tiny_random_llama()
    target = tmp_path / "models" / "smollm2-135m-abc"
    with caplog.at_level(logging.WARNING, logger="c2r.data.lm"):
        lm._save_converted(model, tokenizer, target)  # does not raise: the copy only saves time
    (record,) = caplog.records
    needed = sum(p.numel() for p in model.parameters()) * 4 / 1e6
    assert f"could not keep the dequantised smollm2-135m copy in {target}" in record.message
    assert "No space left on device" in record.message and f"about {needed:.0f} MB" in record.message
    assert "set cache_dir= to a larger disk" in record.message and "\n" not in record.message
    assert not target.exists() and list((tmp_path / "models").iterdir()) == []  # no temporary folder left


# --------------------------------------------------------------------------------------------------
# python -m c2r.shards import
# --------------------------------------------------------------------------------------------------


def _acts(n: int = 1000, d: int = 16) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)


def _stored_rows(manifest: Manifest) -> np.ndarray:
    return np.concatenate([np.load(manifest.path(e.file)) for e in manifest.shards]).astype(np.float32)


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    return sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_import_npy_shuffles_holds_out_and_trains(compose_train, tmp_path, capsys):
    acts = _acts(2048)
    np.save(tmp_path / "acts.npy", acts)
    out = tmp_path / "shards"
    main(["import", str(tmp_path / "acts.npy"), str(out), "--rows-per-shard", "512", "--seed", "3",
          "--model", "my-model", "--hook", "layer.4"])
    assert f"python -m c2r.train data=shards data.path={out}" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert [(e.rows, e.split) for e in manifest.shards] == [(512, "train")] * 3 + [(512, "val")]
    stored = _stored_rows(manifest)
    assert _same_rows(stored, acts) and not np.array_equal(stored, acts)  # every row once, shuffled
    assert not np.array_equal(np.sort(np.load(out / "shard_00003.npy")[:, 0]), np.sort(acts[1536:, 0]))  # global
    train_rows = np.concatenate([np.load(manifest.path(e.file)) for e in manifest.train_shards]).astype(np.float64)
    assert manifest.normalization_factor == pytest.approx(1 / np.sqrt((train_rows**2).sum(1).mean()), rel=1e-6)
    assert manifest.source == {"kind": "import", "input": str(tmp_path / "acts.npy"), "format": "npy", "rows": 2048,
                               "seed": 3, "model": "my-model", "hook": "layer.4"}
    assert verify(out) == []

    metrics = train(compose_train(*TINY_JOB, "data=shards", f"data.path={out}"))
    assert metrics["tokens"] == 2560 and np.isfinite(metrics["fvu"]) and metrics["fvu"] < 1
    exported = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert exported["d_in"] == 16 and exported["hook_name"] == "layer.4" and exported["model_name"] == "my-model"


@pytest.mark.parametrize("stored", ["F32", "BF16"])
def test_import_safetensors(tmp_path, stored):
    from safetensors.torch import save_file

    acts = torch.from_numpy(_acts())
    tensor = acts if stored == "F32" else acts.bfloat16()
    save_file({"acts": tensor, "labels": torch.zeros(1000)}, tmp_path / "acts.safetensors")
    with pytest.raises(ShardImportError, match=r"holds 2 tensors; choose one with --tensor \(one of \['acts', 'labels'\]\)"):
        import_activations(tmp_path / "acts.safetensors", tmp_path / "a", rows_per_shard=256)
    with pytest.raises(ShardImportError, match=r"no tensor 'act'; its tensors: \['acts', 'labels'\]"):
        import_activations(tmp_path / "acts.safetensors", tmp_path / "a", tensor="act", rows_per_shard=256)
    with pytest.raises(ShardImportError, match=r"tensor 'labels'.*shape \[1000\].*\[N, d\]"):
        import_activations(tmp_path / "acts.safetensors", tmp_path / "a", tensor="labels", rows_per_shard=256)
    manifest = import_activations(tmp_path / "acts.safetensors", tmp_path / "a", tensor="acts", rows_per_shard=256,
                                  dtype="float16")
    assert manifest.dtype == "float16" and manifest.d == 16 and manifest.train_rows + manifest.val_rows == 1000
    expected = tensor.float().numpy().astype(np.float16).astype(np.float32)
    assert _same_rows(_stored_rows(manifest), expected)


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_import_a_datasets_column(tmp_path, form):
    import datasets

    acts = _acts(600, 8)
    table = datasets.Dataset.from_dict({"text": ["t"] * 600, "resid": acts.tolist()})
    if form == "save_to_disk":
        source = tmp_path / "ds"
        datasets.DatasetDict({"train": table}).save_to_disk(str(source))
        with pytest.raises(ShardImportError, match=r"holds the splits \['train'\]; choose one with --split"):
            import_activations(source, tmp_path / "out", column="resid", rows_per_shard=128)
    else:
        source = tmp_path / "acts.parquet"
        table.to_parquet(str(source))
    with pytest.raises(ShardImportError, match=r"has no column 'acts'; its columns: \['text', 'resid'\]"):
        import_activations(source, tmp_path / "out", column="acts", split="train", rows_per_shard=128)
    with pytest.raises(ShardImportError, match=r"column 'text' in .* has shape \[600\], but activations must be \[N, d\]"):
        import_activations(source, tmp_path / "out", column="text", split="train", rows_per_shard=128)
    manifest = import_activations(source, tmp_path / "out", column="resid", split="train", rows_per_shard=128)
    assert manifest.source["format"] == "dataset" and manifest.source["column"] == "resid"
    assert _same_rows(_stored_rows(manifest), acts)


def test_import_refuses_bad_inputs_with_one_line_each(tmp_path, capsys):
    np.save(tmp_path / "cube.npy", np.zeros((4, 5, 6), dtype=np.float32))
    with pytest.raises(ShardImportError, match=r"shape \[4, 5, 6\], but activations must be \[N, d\].*reshape"):
        import_activations(tmp_path / "cube.npy", tmp_path / "out")

    acts = _acts()
    acts[[17, 803], 3] = np.nan
    acts[640, 0] = np.inf
    np.save(tmp_path / "nan.npy", acts)
    with pytest.raises(ShardImportError, match=r"NaN or inf in 3 row\(s\), the first at row\(s\) \[17, 640, 803\]"):
        import_activations(tmp_path / "nan.npy", tmp_path / "out", rows_per_shard=256)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written left

    np.save(tmp_path / "ok.npy", _acts())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"error: .*full already exists and is not empty: choose a new directory"):
        main(["import", str(tmp_path / "ok.npy"), str(tmp_path / "full")])
    with pytest.raises(ShardImportError, match=r"input rows=1000 rows fill at most 1 shard.*lower rows_per_shard"):
        import_activations(tmp_path / "ok.npy", tmp_path / "out")  # 16,384 rows per shard by default
    with pytest.raises(ShardImportError, match=r"cannot tell what .*notes.txt holds"):
        import_activations(tmp_path / "full" / "notes.txt", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    manifest = import_activations(tmp_path / "ok.npy", tmp_path / "empty", rows_per_shard=256)  # empty dir: fine
    assert manifest.directory == tmp_path / "empty" and len(manifest.shards) == 4
