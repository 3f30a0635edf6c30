"""The training entrypoint end to end: the real configs, tiny sizes."""

import json

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException

from c2r import load_sae
from c2r.data import ShardWriter, SyntheticShards
from c2r.data.shards import sha256_file
from c2r.train import train
from conftest import TINY, TINY_JOB, run_cli, write_tiny_sweep_config


def test_cli_run_writes_checkpoint_metrics_and_export(cli_run):
    run_dir, _ = cli_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["tokens"] == 2560
    assert 0 <= metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(4.0)
    assert (run_dir / "csv" / "metrics.csv").read_text().count("losses/c2r") >= 1
    sae = load_sae(run_dir / "sae")
    assert sae.W_dec.shape == (128, 32)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 20


def test_training_reaches_low_fvu_at_the_true_l0(compose_train):
    cfg = compose_train(
        *TINY, "regularizer=none", "data.source.rows=16384", "train_tokens=153600", "batch_size=256",
        "optim.lr=3e-3", "trainer.val_check_interval=1000", "evaluation=none",
    )
    metrics = train(cfg)
    assert metrics["l0"] == pytest.approx(4.0)
    assert metrics["fvu"] < 0.1, metrics


def test_training_with_c2r_reaches_low_fvu_too(compose_train):
    cfg = compose_train(
        *TINY, "regularizer=c2r", "regularizer.coef=0.01", "data.source.rows=16384",
        "train_tokens=153600", "batch_size=256", "optim.lr=3e-3", "trainer.val_check_interval=1000", "evaluation=none",
    )
    metrics = train(cfg)
    assert metrics["fvu"] < 0.1, metrics


def test_ddp_spawn_sweep_job_on_two_cpu_processes(tmp_path):
    write_tiny_sweep_config(tmp_path)
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "c2r.train", "--config-dir", str(tmp_path), "--config-name", "tiny_grid", "-m", "hardware=ddp_cpu",
        "train_tokens=1920", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [path.parent for path in sweep_dir.glob("*/metrics.json")]  # one job, one folder for both ranks
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 15  # each process takes 64-row halves of the 128-row global batch
    # The last checkpoint holds the final step even though 15 is not a multiple of checkpoint_every=10.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 15
    assert (run_dir / "sae" / "sae_weights.safetensors").is_file()


def test_multirun_grid_gives_one_folder_per_job(tmp_path):
    write_tiny_sweep_config(tmp_path)
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "c2r.train", "--config-dir", str(tmp_path), "--config-name", "tiny_grid", "-m",
        "dict_size=32,64", "regularizer.coef=0,0.5", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep_dir.glob("*/metrics.json"))
    assert jobs == [
        "dict_size=32,regularizer.coef=0",
        "dict_size=32,regularizer.coef=0.5",
        "dict_size=64,regularizer.coef=0",
        "dict_size=64,regularizer.coef=0.5",
    ]
    report = run_cli("c2r.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0 and "4 of 4 jobs finished" in report.stdout, report.stderr[-3000:]
    table = (sweep_dir / "report.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("job,status,model,regularizer,coef,dict_size")
    for plot in ("report_pareto.png", "report_coef.png"):  # synthetic data: ground-truth splitting vs coef
        assert (sweep_dir / plot).is_file()


# --- bad input: a clear error before any compute ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("dict_size=0", "dict_size must be positive"),
        ("model.k=129", "k must be in [1, dict_size=128]"),
        ("regularizer.coef=-1", "coef must be >= 0"),
        ("regularizer.interval=0", "interval must be >= 1"),
        ("train_tokens=10", "less than one batch"),
    ],
)
def test_bad_settings_are_refused_before_any_data_work(compose_train, tmp_path, monkeypatch, override, message):
    fresh_cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("C2R_CACHE_DIR", str(fresh_cache))
    cfg = compose_train(*TINY, "regularizer=c2r", override)
    with pytest.raises((ValueError, InstantiationException)) as error:
        train(cfg)
    assert message in str(error.value)
    assert not fresh_cache.exists()  # no shards were generated


def test_unknown_group_option_lists_the_choices(tmp_path):
    result = run_cli("c2r.train", "model=nope", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/nope'" in result.stderr
    assert "batchtopk" in result.stderr and "topk" in result.stderr


def test_missing_shard_directory_says_how_to_create_it(compose_train, tmp_path):
    cfg = compose_train(*TINY_JOB, "data=shards", f"data.path={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError) as error:
        train(cfg)
    assert "nowhere" in str(error.value) and "data=synthetic" in str(error.value)


def write_shards(directory, rows):
    writer = ShardWriter(directory, d=rows.shape[1], rows_per_shard=256, source={"model": "test"})
    writer.add(rows)
    writer.finalize(val_shards=1)


def test_shard_width_must_match_the_sae(compose_train, tmp_path):
    write_shards(tmp_path / "shards", np.random.default_rng(0).normal(size=(1024, 32)).astype(np.float32))
    cfg = compose_train(*TINY_JOB, "data=shards", f"data.path={tmp_path / 'shards'}", "data.d_in=64")
    with pytest.raises(ValueError, match=r"have d=32, but data.d_in=64"):
        train(cfg)


def test_the_sae_width_is_the_datas_and_model_d_in_is_refused(compose_train, tmp_path):
    write_shards(tmp_path / "shards", np.random.default_rng(0).normal(size=(1024, 32)).astype(np.float32))
    cfg = compose_train(*TINY_JOB, "data=shards", f"data.path={tmp_path / 'shards'}", "+model.d_in=32")
    with pytest.raises(ValueError, match=r"model.d_in=32: the SAE's width is the data's; set data.d_in instead"):
        train(cfg)


def test_non_finite_activations_stop_training_and_name_the_rows(compose_train, tmp_path):
    write_shards(tmp_path / "shards", np.random.default_rng(0).normal(size=(1024, 32)).astype(np.float32))
    for shard in (tmp_path / "shards").glob("shard_*.npy"):  # corrupt the data after it was written
        rows = np.load(shard, mmap_mode="r+")
        rows[:, 3] = np.nan
        rows.flush()
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    for entry in manifest["shards"]:  # a manifest that vouches for the damage, else the sha256 check stops it first
        entry["sha256"] = sha256_file(tmp_path / "shards" / entry["file"])
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    cfg = compose_train(*TINY_JOB, "data=shards", f"data.path={tmp_path / 'shards'}")
    with pytest.raises(ValueError) as error:
        train(cfg)
    assert "shard_0000" in str(error.value) and "row(s) [0, 1, 2, 3, 4] and more hold NaN/inf" in str(error.value)


def test_shards_from_data_shards_train_like_synthetic(compose_train, tmp_path):
    source = SyntheticShards(d=32, n_features=64, l0=4, rows=4096, rows_per_shard=1024, cache_dir=str(tmp_path))
    cfg = compose_train(*TINY_JOB, "data=shards", f"data.path={source.ensure()}")
    metrics = train(cfg)
    assert metrics["steps"] == 20
