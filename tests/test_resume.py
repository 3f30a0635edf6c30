"""Jobs are idempotent: a killed job resumes to the same result, a finished one is not redone."""

import json
import os

import torch
from safetensors.torch import load_file

from c2r.train import train
from conftest import CLI_RUN, TINY, kill_at_first_checkpoint, run_cli, write_tiny_sweep_config

# 80 steps with checkpoints every 20; C²R's candidate lists refresh every 7 steps (checkpointed state too). The
# weights are compared, so no evaluation.
LONG_JOB = [*TINY, "train_tokens=10240", "checkpoint_every=20", "regularizer=c2r", "regularizer.coef=0.01",
            "regularizer.interval=2", "regularizer.refresh_every=7", "evaluation=none"]


def test_a_killed_job_resumes_to_the_same_weights_as_an_uninterrupted_one(compose_train, tmp_path):
    train(compose_train(*LONG_JOB))  # the uninterrupted reference, in this process: the kill needs the CLI only
    reference = tmp_path / "run"

    run_dir = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(LONG_JOB, run_dir, tmp_path)["global_step"]
    assert 0 < killed_at < 80
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli("c2r.train", *LONG_JOB, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 80
    final, expected = load_file(run_dir / "sae" / "sae_weights.safetensors"), load_file(reference / "sae" / "sae_weights.safetensors")
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], msg=name)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left


def test_relaunching_a_finished_job_does_no_work(cli_run, tmp_path):
    run_dir, _ = cli_run
    metrics_before = (run_dir / "metrics.json").read_text()
    checkpoint_mtime = os.path.getmtime(run_dir / "checkpoints" / "last.ckpt")

    again = run_cli("c2r.train", *CLI_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0
    assert "has finished already" in again.stderr + again.stdout
    assert (run_dir / "metrics.json").read_text() == metrics_before
    assert os.path.getmtime(run_dir / "checkpoints" / "last.ckpt") == checkpoint_mtime


def test_submitit_local_launcher_runs_a_sweep_and_a_relaunch_skips_it(tmp_path):
    write_tiny_sweep_config(tmp_path)
    sweep_dir = tmp_path / "sweep"
    command = ["--config-dir", str(tmp_path), "--config-name", "tiny_grid", "-m", "hydra/launcher=submitit_local",
               "dict_size=32", f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli("c2r.train", *command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    finished = {p.parent.name: p.stat().st_mtime for p in sweep_dir.glob("*/metrics.json")}
    assert sorted(finished) == ["dict_size=32"]

    again = run_cli("c2r.train", *command, cwd=tmp_path)  # the same sweep again: nothing to do
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.parent.name: p.stat().st_mtime for p in sweep_dir.glob("*/metrics.json")} == finished


def test_a_checkpoint_with_the_former_sae_step_counter_still_loads():
    # Before the trainer's step became the one step counter, the SAE checkpointed its own ``training_steps``.
    from c2r.module import SAEModule
    from c2r.sae import TopKSAE

    module = SAEModule(TopKSAE(4, 8, k=1))
    checkpoint = {"state_dict": {**module.state_dict(), "sae.training_steps": torch.tensor(7)}}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict, as Lightning loads it
