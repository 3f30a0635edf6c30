"""What a run prints and how fast the CLIs start (docs/design.md §11)."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from c2r.callbacks import StepProgressBar

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("litlogger", "💡 Tip", "LeafSpec", "weights_only", "limit_val_batches", "Epoch 0/-2", "anonymous setting",
         "requested", "has only")


def test_training_console_has_no_library_noise(cli_run):
    run_dir, result = cli_run
    console = result.stdout + result.stderr
    assert not [line for line in console.splitlines() if any(noise in line for noise in NOISE)], console
    # Lightning's own lines come once (through Hydra's handlers, so also into train.log), not twice.
    assert sum("GPU available" in line for line in console.splitlines()) == 1, console
    assert "GPU available" in (run_dir / "train.log").read_text()


def test_progress_bar_counts_steps_not_epochs(capsys):
    trainer = L.Trainer(max_steps=3, callbacks=[StepProgressBar()], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(BoringModel())
    bar = capsys.readouterr()
    assert "steps: 100%" in bar.out + bar.err and "3/3" in bar.out + bar.err


def test_progress_bar_reads_metrics_back_only_on_logging_steps(monkeypatch):
    """Each refresh converts the logged tensors to Python numbers, a host sync on a GPU: at refresh_rate =
    log_every_n_steps it happens on the steps that log (5, 10, ..., 20) and at the epoch's end, not on every step."""
    reads = []
    original = StepProgressBar.get_metrics
    monkeypatch.setattr(StepProgressBar, "get_metrics",
                        lambda self, trainer, module: reads.append(trainer.global_step) or original(self, trainer, module))
    trainer = L.Trainer(max_steps=20, callbacks=[StepProgressBar(refresh_rate=5)], logger=False, log_every_n_steps=5,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert sorted(set(reads)) == [5, 10, 15, 20]


@pytest.mark.parametrize(
    "module, heavy",
    [
        ("c2r", ["torch"]),
        ("c2r.data.shards", ["torch", "lightning"]),
        ("c2r.shards", ["torch", "lightning"]),
        ("c2r.harvest", ["torch", "lightning"]),
        ("c2r.report", ["torch", "lightning", "matplotlib"]),
        ("c2r.train", ["torch", "lightning"]),
        ("c2r.evaluate", ["torch", "lightning"]),
    ],
)
def test_entry_points_import_without_the_heavy_stack(module, heavy):
    """So that ``python -m <module> --help`` answers at once: torch, Lightning and matplotlib load when used."""
    code = f"import sys, {module}; print([name for name in {heavy!r} if name in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_infrastructure_does_not_import_the_evaluation_package():
    """Dependencies go one way: the evaluation builds on the training's metrics, never the other way round."""
    code = "import sys, c2r.callbacks, c2r.loggers, c2r.module; print('c2r.evaluation' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_conf_folder_is_a_listed_package():
    """setuptools warns about (and a wheel may drop) yaml folders under conf/ missing from ``packages``."""
    tomllib = pytest.importorskip("tomllib")
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {path.parent for path in (ROOT / "conf").rglob("*.yaml")}
    expected = {".".join(("c2r.conf", *folder.relative_to(ROOT / "conf").parts)) for folder in folders}
    assert expected <= packages, sorted(expected - packages)
