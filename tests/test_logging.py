"""What reaches W&B: one group per sweep, the evaluation as summary + table, histograms and throughput."""

import copy
import json

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from c2r.evaluate import log_evaluation
from c2r.loggers import sweep_group, wandb_logger
from c2r.train import train
from conftest import TINY


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_jobs_of_a_multirun_share_the_sweep_folder_as_group(compose_train, tmp_path):
    cfg = copy.deepcopy(compose_train(*TINY))
    assert sweep_group() is None  # a single run has no group
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "sweeps" / "grid")
    HydraConfig.instance().set_config(cfg)
    assert sweep_group() == str(tmp_path / "sweeps" / "grid")


def test_evaluation_numbers_become_summary_metrics_and_a_table(tmp_path, wandb_offline):
    logger = wandb_logger(project="c2r-test", save_dir=str(tmp_path), name="job")
    result = {"evals": ["core", "ground_truth"], "core": {"fvu": 0.25, "l0": 4.0, "settings": {"rows": 9}},
              "ground_truth": {"summary": {"absorption_fraction": 0.125}, "per_parent": [{"parent": 0}]}}
    try:
        log_evaluation(logger, result, tmp_path, step=3)
        summary = logger.experiment.summary
        assert summary["eval/core.fvu"] == 0.25 and summary["eval/core.l0"] == 4.0
        assert summary["eval/ground_truth.absorption_fraction"] == 0.125
        assert "eval/core.settings.rows" not in summary.keys()
        assert summary["eval/table"]["_type"] == "table-file" and summary["eval/table"]["nrows"] == 3
    finally:
        logger.experiment.finish()


def test_a_training_run_logs_histograms_throughput_and_its_evaluation(
    compose_train, tmp_path, wandb_offline, monkeypatch
):
    """What the W&B run receives, recorded in-process (an offline run keeps it in a binary log only)."""
    from wandb.sdk.wandb_run import Run
    from wandb.sdk.wandb_summary import Summary

    logged, summary = {}, {}
    original_log, original_update = Run.log, Summary.update
    monkeypatch.setattr(Run, "log", lambda run, data, *a, **k: (logged.update(data), original_log(run, data, *a, **k))[1])
    monkeypatch.setattr(Summary, "update", lambda s, d=None: (summary.update(d or {}), original_update(s, d))[1])
    cfg = compose_train(*[o for o in TINY if not o.startswith("logger=")], "logger=wandb")
    with open_dict(cfg):
        cfg.logger.save_dir = str(tmp_path / "run")
    train(cfg)

    for histogram in ("histograms/latent_density_log10", "histograms/decoder_nn_cosine"):
        assert sum(logged[histogram].histogram) == 128  # one entry per latent
    assert logged["details/tokens_per_second"] > 0
    assert {"losses/mse", "metrics/l0", "sparsity/dead_features", "val/fvu"} <= set(logged)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["final/fvu"] == pytest.approx(metrics["fvu"])
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["eval/core.fvu"] == pytest.approx(evaluation["core"]["fvu"])
    assert logged["eval/table"].data[0][0].startswith("eval/") and "eval/eval_core" in logged


def test_tokens_per_second_is_tokens_over_wall_time_between_logging_steps(monkeypatch):
    from types import SimpleNamespace

    import torch

    from c2r import callbacks

    clock = iter([100.0, 102.0, 106.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    logged = []
    module = SimpleNamespace(tokens_seen=torch.tensor(1000), device=torch.device("cpu"),
                             log=lambda name, value: logged.append((name, value)))
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=10)
    callback = callbacks.TokensPerSecond()
    callback.on_train_start(trainer, module)  # t=100 s, 1000 tokens (e.g. a resumed run)
    for step, tokens in [(5, 3000), (10, 5000), (20, 9000)]:
        trainer.global_step, module.tokens_seen = step, torch.tensor(tokens)
        callback.on_train_batch_end(trainer, module, None, None, 0)
    # step 5 is not a logging step; step 10: 4000 tokens in 2 s; step 20: 4000 tokens in 4 s
    assert logged == [("details/tokens_per_second", 2000.0), ("details/tokens_per_second", 1000.0)]
