"""Shared fixtures: tiny training configs and an isolated shard cache and W&B."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

# A job small enough for 2 CPU cores: 32-d synthetic data from 64 features, 4 active per row.
TINY_DATA = [
    "data=synthetic",
    "data.d_in=32",
    "data.source.n_features=64",
    "data.source.l0=4",
    "data.source.rows=4096",
    "data.source.rows_per_shard=1024",
]
TINY_JOB = [
    "model.k=4",
    "dict_size=128",
    "batch_size=128",
    "train_tokens=2560",
    "optim.warmup_steps=5",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5",
    "checkpoint_every=10",
    "trainer.enable_progress_bar=false",
    "logger=none",
]
TINY = TINY_DATA + TINY_JOB


def _share_the_cores() -> None:
    """Under pytest-xdist (``-n``), give each worker its share of the cores, in-process and in the commands it
    runs: n workers each running torch on every core would oversubscribe them and run slower than one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()


def _isolate(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "c2r-cache"  # shared by the session: synthetic shards are reused
    monkeypatch.setenv("C2R_CACHE_DIR", str(cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return cache


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    return _isolate(tmp_path_factory, monkeypatch)


@pytest.fixture
def compose_train(tmp_path):
    """Compose the real ``train`` config with overrides, as ``python -m c2r.train`` would, and make it the
    current Hydra config (run folder = a fresh tmp dir)."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module("c2r.conf", version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        run_dir = tmp_path / "run"
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.override_dirname = "test"
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def cli_env() -> dict[str, str]:
    """The environment of a command run as a user would: this test's (cache, W&B) with unbuffered output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


CLI_RUN = [*TINY, "regularizer=c2r", "logger=csv"]
"""The arguments of :func:`cli_run`'s job (without its run folder)."""


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One ``python -m c2r.train`` job as a user launches it, shared by the tests that read its folder, its
    console or relaunch it: ``(run folder, finished process)``. Tests must not change the folder."""
    cwd = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as monkeypatch:  # a session fixture is set up before the autouse one
        _isolate(tmp_path_factory, monkeypatch)
        result = run_cli("c2r.train", *CLI_RUN, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run", result


def kill_at_first_checkpoint(train_args: list[str], run_dir: Path, cwd: Path) -> dict:
    """Start ``python -m c2r.train <train_args> hydra.run.dir=<run_dir>``, kill -9 it as soon as its first checkpoint
    exists, and return that checkpoint."""
    command = [sys.executable, "-m", "c2r.train", *train_args, f"hydra.run.dir={run_dir}"]
    job = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not checkpoint.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    import torch

    return torch.load(checkpoint, weights_only=False)


def write_tiny_sweep_config(directory: Path, name: str = "tiny_grid") -> Path:
    """A sweep config holding the TINY settings (as grids in sweeps/ do), so job folders are named by the swept
    keys only; use it with ``--config-dir <directory> --config-name <name>``."""
    settings = OmegaConf.from_dotlist([o for o in TINY if not o.startswith(("logger=", "data="))])
    header = {"defaults": ["train", {"override data": "synthetic"}, {"override logger": "none"},
                           {"override regularizer": "c2r"}, "_self_"]}
    path = directory / f"{name}.yaml"
    OmegaConf.save(OmegaConf.merge(header, settings), path)
    return path
