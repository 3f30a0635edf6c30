"""``python -m c2r.evaluate`` and ``evaluate_run`` (the end-of-training hook) on a run folder."""

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from c2r.data.shards import Manifest
from c2r.evaluate import evaluate, evaluate_run, settings_of
from c2r.export import export_sae
from conftest import TINY_JOB, run_cli

HIERARCHY_DATA = [
    "data=synthetic_hierarchy",
    "data.d_in=16",
    "data.source.n_parents=2",
    "data.source.n_independent=8",
    "data.source.l0=3",
    "data.source.rows=8192",
    "data.source.rows_per_shard=2048",
    "data.source.val_shards=1",
]


@pytest.fixture
def run_dir(compose_train, tmp_path):
    """A run folder as ``python -m c2r.train`` leaves it: the saved config and an exported (untrained) SAE."""
    cfg = compose_train(*HIERARCHY_DATA, *TINY_JOB, "dict_size=32")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(saved):
        del saved["hydra"]
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    manifest = Manifest.load(instantiate(cfg.data.source).ensure())
    export_sae(instantiate(cfg.model)(d_in=cfg.data.d_in), run / "sae", normalization_factor=manifest.normalization_factor)
    return run


def test_evaluate_run_writes_results_report_and_plots(run_dir):
    result = evaluate_run(run_dir, tokens=1500, ground_truth={"min_events": 5})
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk["core"]["fvu"] == pytest.approx(result["core"]["fvu"])
    assert on_disk["data"]["rows"] == 1500 and on_disk["data"]["split"] == "val"
    assert on_disk["evals"] == ["core", "ground_truth"]
    assert on_disk["ground_truth"]["settings"]["min_events"] == 5
    assert on_disk["ground_truth"]["settings"]["split_thresholds"] == [0.5, 0.7, 0.9]  # the yaml's defaults
    assert on_disk["sae"]["architecture"] == "topk" and on_disk["sae"]["d_sae"] == 32
    report = (run_dir / "eval.md").read_text()
    assert "| FVU |" in report and "full absorption" in report
    # synthetic data: no advice to add the LM evaluation, which could not run on it
    assert "(not applicable to this data: ce_loss)" in report and "CE-loss score" not in report
    for png in ("eval_core.png", "eval_ground_truth.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown evaluation setting 'tokenz'"):
        evaluate_run(run_dir, tokenz=5)


def test_cli_on_a_run_folder(run_dir, tmp_path):
    saved_config = (run_dir / ".hydra" / "config.yaml").read_text()
    proc = run_cli("c2r.evaluate", f"run={run_dir}", "tokens=5000", "evals=[core]", "device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["evals"] == ["core"] and result["data"]["rows"] == 2048
    assert "asked for 5,000 tokens" in result["notes"][0] and "asked for 5,000 tokens" in proc.stderr + proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").read_text() == saved_config  # the run's Hydra record is untouched
    assert list((tmp_path / "outputs" / "evals").iterdir())  # the eval job's own Hydra folder


def compose_evaluate(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module("c2r.conf", version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_exported_sae_with_a_data_option(run_dir, tmp_path):
    cfg = compose_evaluate(f"sae={run_dir / 'sae'}", *HIERARCHY_DATA, f"out={tmp_path / 'eval'}", "split=train",
                           "plots=false")
    GlobalHydra.instance().clear()
    result = evaluate(cfg)
    assert result["data"]["split"] == "train" and result["data"]["rows"] == 6144
    assert (tmp_path / "eval" / "eval.json").is_file() and not list((tmp_path / "eval").glob("*.png"))
    assert result["ground_truth"]["summary"]["parents"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [((), "nothing to evaluate"), (("run=a", "sae=b"), "not both"), (("run=/nonexistent",), "not a training run")],
)
def test_bad_arguments_fail_clearly(overrides, message):
    cfg = compose_evaluate(*overrides)
    GlobalHydra.instance().clear()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate(cfg)


class RowsSeen:
    """An evaluation of a user's own: plugged in by a config section with its ``_target_``, no code registry."""

    name = "rows_seen"

    def __init__(self, ctx, *, scale: int) -> None:
        self.rows, self.scale = 0, scale

    def update(self, batch, acts, recon) -> None:
        self.rows += len(acts)

    def finalize(self) -> dict:
        return {"rows_times_scale": self.rows * self.scale}


def test_an_evaluation_of_ones_own_is_one_more_config_section(run_dir):
    cfg = compose_evaluate(f"run={run_dir}", "tokens=1500", "evals=[core,rows_seen]", "plots=false",
                           f"+rows_seen._target_={__name__}.RowsSeen", "+rows_seen.scale=3")
    GlobalHydra.instance().clear()
    result = evaluate(cfg)
    assert result["evals"] == ["core", "rows_seen"] and result["rows_seen"] == {"rows_times_scale": 4500}
    # the same from Python, where the defaults of conf/evaluation/default.yaml fill the rest
    result = evaluate_run(run_dir, tokens=1000, evals=["rows_seen"], rows_seen={"_target_": f"{__name__}.RowsSeen",
                                                                                "scale": 2})
    assert result["evals"] == ["rows_seen"] and result["rows_seen"] == {"rows_times_scale": 2000}
    with pytest.raises(ValueError, match="unknown eval 'rows_seen'; available: core, ground_truth, first_letter"):
        evaluate_run(run_dir, evals=["rows_seen"])


def test_training_composes_the_same_evaluation_group(compose_train):
    cfg = compose_train("evaluation.evals=[core,first_letter]", "evaluation.first_letter.prompts.words=600")
    evaluate_cfg = compose_evaluate()
    GlobalHydra.instance().clear()
    assert set(cfg.evaluation) == set(settings_of(evaluate_cfg))  # one group, at two places
    assert cfg.evaluation.first_letter.prompts.words == 600 and cfg.evaluation.core._target_.endswith("CoreEval")
    assert not compose_train("evaluation=none").get("evaluation")  # skipped at the end of training
