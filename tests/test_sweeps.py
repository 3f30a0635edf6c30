"""The grids in sweeps/ compose with the real configs and hold the settings their comments promise."""

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

SWEEPS = Path(__file__).parents[1] / "sweeps"


def compose_sweep(name: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(SWEEPS), version_base="1.3"):
            return compose(name, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def grid(cfg) -> dict[str, list[str]]:
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


def test_every_sweep_file_is_tested():
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == ["ground_truth_grid", "lm_absorption", "paper_gemma2", "smollm2_grid"]


@pytest.mark.parametrize(
    "arm, coef, search", [("baseline", 0, "candidates"), ("c2r_paper", 5, "chunked"), ("c2r_exact", 5, "candidates")]
)
def test_paper_grid_arms(arm, coef, search):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(SWEEPS), version_base="1.3"):
            cfg = compose("paper_gemma2", overrides=[f"arm={arm}"])
    finally:
        GlobalHydra.instance().clear()
    assert (cfg.regularizer.coef, cfg.regularizer.neighbor_search) == (coef, search)
    assert cfg.regularizer.chunk_size == 8192


def test_paper_grid_is_the_papers_setting_on_slurm():
    cfg = compose_sweep("paper_gemma2")
    assert cfg.data.source.model == "google/gemma-2-2b" and cfg.data.source.hook == "blocks.12.hook_resid_post"
    assert cfg.dict_size == 65536 and cfg.train_tokens == 500_000_000 and cfg.batch_size == 2048
    assert (cfg.regularizer.alpha, cfg.regularizer.interval) == (1.0, 5)
    params = grid(cfg)
    assert params["model"] == ["topk", "batchtopk", "matryoshka"]
    assert all(60 <= int(k) <= 120 for k in params["model.k"])
    assert params["arm"] == ["baseline", "c2r_paper", "c2r_exact"]  # one baseline, the paper's C²R, exact C²R
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hardware.devices == 1
    assert cfg.hardware.precision == "bf16-mixed"


@pytest.mark.parametrize("name, jobs", [("smollm2_grid", 8), ("ground_truth_grid", 24), ("lm_absorption", 9)])
def test_cpu_grids_run_locally(name, jobs):
    cfg = compose_sweep(name)
    assert cfg.hardware.accelerator == "cpu" and cfg.hydra.launcher._target_.endswith("BasicLauncher")
    assert math.prod(len(values) for values in grid(cfg).values()) == jobs
    assert "0" in grid(cfg)["regularizer.coef"]  # every grid carries its own baseline


def test_ground_truth_grid_brackets_the_datas_true_l0_over_seeds():
    cfg = compose_sweep("ground_truth_grid")
    ks = [int(k) for k in grid(cfg)["model.k"]]
    assert cfg.data.source._target_.endswith("HierarchicalShards") and min(ks) < cfg.data.source.l0 < max(ks)
    assert len(grid(cfg)["seed"]) >= 3 and "ground_truth" in cfg.evaluation.evals


def test_lm_absorption_grid_has_seeds_and_the_first_letter_eval_at_a_matched_l0():
    cfg = compose_sweep("lm_absorption")
    params = grid(cfg)
    assert cfg.model._target_.endswith("TopKSAE") and cfg.model.k == 32 and cfg.dict_size == 4096  # L0 fixed by k
    assert len(params["seed"]) >= 3 and len([c for c in params["regularizer.coef"] if float(c) > 0]) >= 2
    assert cfg.data.source.model == "smollm2-135m" and "first_letter" in cfg.evaluation.evals
    assert cfg.evaluation.first_letter._target_.endswith("first_letter_eval")  # the evaluation group, composed
