"""Fault and bad-input probes on the run side, each on a tiny synthetic run: a clear error naming the fix, or
the right recovery."""

import json
import logging
import math
import time

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import c2r.module
from c2r.checkpointing import CheckpointDamaged
from c2r.config_checks import ConfigError
from c2r.data import ActivationDataModule
from c2r.evaluate import evaluate
from c2r.export import export_sae
from c2r.jsonfile import write_json
from c2r.nonfinite import NonFiniteError, check_finite_metrics
from c2r.report import main as report_main
from c2r.run_folder import FAILED, RUN_CONFIG, RunConfigChanged, RunFolderBusy, locked
from c2r.sae import TopKSAE
from c2r.train import train
from conftest import TINY, run_cli

C2R = [*TINY, "regularizer=c2r", "regularizer.coef=0.1", "regularizer.interval=1", "evaluation=none"]


def checkpoint_of(run_dir, name="last.ckpt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=False)


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_a_relaunch_retries(
    compose_train, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    original = c2r.module.loss_terms

    def poisoned(sae, regularizers, x, step):  # an inf term at step 13, after the checkpoint at step 10; slow steps
        terms, out = original(sae, regularizers, x, step)  # 2 (before the checkpoint) and 12 (lost with the failure)
        if step in (2, 12):
            time.sleep(1.0)
        if step == 13:
            terms["mse"] = (terms["mse"][0] * float("inf"), terms["mse"][1])
        return terms, out

    monkeypatch.setattr(c2r.module, "loss_terms", poisoned)
    monkeypatch.setattr(ActivationDataModule, "describe_training_batch",
                        lambda self, step: f"shard_00002.npy rows {step}", raising=False)
    with pytest.raises(NonFiniteError) as error:
        train(compose_train(*TINY, "evaluation=none"))
    message = str(error.value)
    assert "non-finite loss at step 13 on shard_00002.npy rows 13" in message
    assert "overall_loss=inf" in message and "mse=inf" in message and "auxk=" in message
    assert "last good checkpoint is kept" in message
    assert not (run_dir / "metrics.json").exists()
    kept = checkpoint_of(run_dir)
    assert kept["global_step"] == 10  # the check at step 15 ran before any checkpoint of the bad steps
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values() if t.is_floating_point())
    wall_before = float(kept["state_dict"]["wall_time_s"])
    assert wall_before >= 1.0

    monkeypatch.setattr(c2r.module, "loss_terms", original)  # the data is fine again: the relaunch retries
    cfg = compose_train(*TINY, "evaluation=none")
    started = time.time()
    metrics = train(cfg)
    relaunch = time.time() - started
    assert metrics["steps"] == 20 and math.isfinite(metrics["fvu"])
    # wall time is cumulative: the failed segment's time up to its checkpoint plus this launch's training, without
    # the second that segment spent after its checkpoint (a margin of half of it, so a loaded machine cannot fail
    # the test). This launch's own count starts with fit, after set-up, so only "more than before" is asserted.
    assert wall_before < metrics["wall_time_s"] <= wall_before + relaunch + 0.5
    assert json.loads((run_dir / "metrics.json").read_text())["wall_time_s"] == metrics["wall_time_s"]


def test_non_finite_final_metrics_and_json_values():
    with pytest.raises(NonFiniteError, match=r"the final validation is non-finite \(val/fvu=nan\)"):
        check_finite_metrics({"val/fvu": float("nan"), "val/l0": 4.0}, "the final validation")


def test_json_files_hold_null_for_non_finite_numbers(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"fvu": float("nan"), "mse": [1.0, float("inf")], "steps": 3})
    assert json.loads(path.read_text()) == {"fvu": None, "mse": [1.0, None], "steps": 3}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_a_run_folder_owns_its_config(compose_train, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_train(*C2R))
    saved = OmegaConf.load(run_dir / RUN_CONFIG)
    (run_dir / "metrics.json").unlink()  # as if killed after its last checkpoint
    last_written = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime

    with pytest.raises(RunConfigChanged) as error:
        train(compose_train(*C2R, "regularizer.coef=0.2", "logger=csv", "checkpoint_every=5"))
    message = str(error.value)
    assert "was started with other settings (regularizer.coef: 0.1 → 0.2)" in message  # logger etc. may change
    assert "new run folder" in message and "allow_config_change=true" in message
    with pytest.raises(RunConfigChanged, match=r"dict_size: 128 → 64"):  # not a state_dict size mismatch
        train(compose_train(*C2R, "dict_size=64"))
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime == last_written
    assert OmegaConf.load(run_dir / RUN_CONFIG) == saved

    metrics = train(compose_train(*C2R, "regularizer.coef=0.2", "allow_config_change=true"))
    assert metrics["steps"] == 20
    assert OmegaConf.load(run_dir / RUN_CONFIG).regularizer.coef == 0.2

    with pytest.raises(RunConfigChanged, match=r"has finished with other settings \(seed: 0 → 1\)"):
        train(compose_train(*C2R, "regularizer.coef=0.2", "seed=1"))
    assert train(compose_train(*C2R, "regularizer.coef=0.2")) == metrics  # same settings: skipped


def test_a_second_process_cannot_train_into_a_locked_folder(compose_train, tmp_path):
    cfg = compose_train(*TINY)
    with locked(tmp_path / "run"):
        with pytest.raises(RunFolderBusy, match=r"run is in use by another training process \(PID \d+\)"):
            train(cfg)
    assert not (tmp_path / "run" / RUN_CONFIG).exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batch_size=0"], "batch_size must be a positive number of rows per step, got 0"),
        (["batch_size=-5"], "batch_size must be a positive number of rows per step, got -5"),
        (["optim.lr=-1"], "optim: lr must be positive, got -1"),
        (["+regularizer.cof=0.1"], "unknown key regularizer.cof: did you mean regularizer.coef?"),
        (["+optim.learning_rate=0.1"], "unknown key optim.learning_rate: the keys of optim are betas, decay_fraction, lr"),
        (["+model.kk=3"], "unknown key model.kk: did you mean model.k?"),
        (["hardware=gpu"], "torch sees none on this machine: use hardware=cpu"),
    ],
)
def test_bad_config_is_refused_before_any_data_work(compose_train, tmp_path, monkeypatch, overrides, message):
    fresh_cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("C2R_CACHE_DIR", str(fresh_cache))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a machine without a GPU
    with pytest.raises(ConfigError) as error:
        train(compose_train(*TINY, "regularizer=c2r", *overrides))
    assert message in str(error.value)
    assert not fresh_cache.exists() and not (tmp_path / "run").exists()  # no shards, no run folder


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_or_says_how_to_restart(
    compose_train, tmp_path, caplog
):
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    expected = train(compose_train(*TINY, "evaluation=none"))
    assert checkpoint_of(run_dir, "previous.ckpt")["global_step"] == 20  # the one the final save replaced
    (run_dir / "metrics.json").unlink()
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING):
        metrics = train(compose_train(*TINY, "evaluation=none"))
    assert f"{last} is damaged (truncated or empty; moved to last.ckpt.damaged): resuming from" in caplog.text
    assert metrics["fvu"] == pytest.approx(expected["fvu"])

    (run_dir / "metrics.json").unlink()
    (checkpoints / "previous.ckpt").unlink()
    last.write_bytes(b"")  # empty, nothing to fall back to
    with pytest.raises(CheckpointDamaged, match=r"last.ckpt is damaged .* delete it to restart this run"):
        train(compose_train(*TINY, "evaluation=none"))


def compose_evaluate(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module("c2r.conf", version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda cfg: cfg.write_text(cfg.read_text()[:40]), r"cfg.json is not valid JSON"),
        (lambda cfg: cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "k"})),
         r"cfg.json lacks the key\(s\) k"),
    ],
)
def test_evaluate_names_the_damaged_file_before_any_work(tmp_path, monkeypatch, damage, message):
    fresh_cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("C2R_CACHE_DIR", str(fresh_cache))
    sae_dir = export_sae(TopKSAE(8, 16, k=2), tmp_path / "sae", normalization_factor=1.0)
    damage(sae_dir / "cfg.json")
    cfg = compose_evaluate(f"sae={sae_dir}", f"out={tmp_path / 'eval'}")
    GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match=f"{sae_dir}/{message}.*re-export it"):
        evaluate(cfg)
    assert not fresh_cache.exists()


def test_report_reads_training_jobs_only_and_lists_failed_ones(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    config = {"dict_size": 64, "seed": 0, "train_tokens": 1000, "model": {"k": 4}, "regularizer": {"coef": 0.0}}
    hydra = {"hydra": {"runtime": {"choices": {"model": "topk", "regularizer": "c2r", "data": "synthetic"}},
                       "overrides": {"task": []}, "job": {"config": {"override_dirname": {"exclude_keys": []}}}}}
    for name in ("done", "broken"):
        (sweep / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(config, sweep / name / RUN_CONFIG)
        OmegaConf.save(hydra, sweep / name / ".hydra" / "hydra.yaml")
    (sweep / "done" / "metrics.json").write_text(json.dumps({"fvu": 0.5, "l0": 4.0}))
    (sweep / "broken" / FAILED).write_text("NonFiniteError: non-finite loss at step 3\n\nTraceback ...")
    (sweep / "eval_job" / ".hydra").mkdir(parents=True)  # a c2r.evaluate job folder
    OmegaConf.save({"run": None, "sae": "x", "evals": ["core"]}, sweep / "eval_job" / ".hydra" / "config.yaml")

    report_main([str(sweep)])

    printed = capsys.readouterr().out
    assert "1 of 2 jobs finished" in printed
    assert "failed: broken: NonFiniteError: non-finite loss at step 3" in printed
    assert "skipped (not training jobs): eval_job" in printed
    assert "broken,failed" in (sweep / "report.csv").read_text()


def test_a_bug_keeps_its_traceback_while_a_diagnosis_is_one_line(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from c2r.config_checks import ConfigError
    from c2r.run_folder import failures_recorded

    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create({"mode": RunMode.RUN})))
    with pytest.raises(SystemExit) as stopped, failures_recorded(tmp_path):
        raise ConfigError("batch_size must be positive: e.g. batch_size=2048")
    assert stopped.value.code == 1
    with pytest.raises(KeyError), failures_recorded(tmp_path):  # not a UserError: Hydra prints the traceback
        raise KeyError("a bug")
    assert (tmp_path / FAILED).read_text().startswith("KeyError")
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create({"mode": RunMode.MULTIRUN})))
    with pytest.raises(ConfigError), failures_recorded(tmp_path):  # in a sweep: fails this job alone
        raise ConfigError("batch_size must be positive")


def test_cluster_log_gets_progress_lines_and_the_error(tmp_path):
    run_dir = tmp_path / "run"
    # lr=1e30 blows the weights up at once: the loss turns non-finite within the first checks
    result = run_cli("c2r.train", *TINY, "optim.lr=1e30", "progress_every=1", "trainer.enable_progress_bar=true",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode != 0
    log = (run_dir / "train.log").read_text()
    assert "step 1/20 (5%) | tokens 128 | loss" in log and "tok/s | ETA" in log  # no terminal: plain lines
    assert "NonFiniteError: non-finite loss at step" in log and "Traceback" not in log  # one line: a diagnosis
    failed = (run_dir / FAILED).read_text()
    assert failed.startswith("NonFiniteError: non-finite loss at step") and "Traceback" in failed
    console = result.stdout + result.stderr
    assert console.count("NonFiniteError: non-finite loss at step") == 1 and "Traceback" not in console
    assert not (run_dir / "metrics.json").exists()
