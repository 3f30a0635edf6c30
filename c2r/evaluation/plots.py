"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_core(directory: Path, max_cos: Tensor, frequencies: Tensor, result: dict) -> list[Path]:
    """``eval_core.png``: each latent's largest decoder cosine to another latent, and the latents' firing frequencies."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    values = max_cos[~max_cos.isnan()].numpy()
    left.hist(values, bins=40, range=(-1, 1), color="tab:blue")
    left.set_xlabel("max cosine to another latent's decoder row")
    left.set_ylabel("latents")
    mean = result["decoder_max_cos_mean"]
    left.set_title(f"decoder geometry (mean {mean:.3f})" if mean is not None else "decoder geometry")
    log_freq = np.log10(np.clip(frequencies.numpy(), 1e-9, None))
    right.hist(log_freq, bins=40, range=(-9, 0), color="tab:orange")
    right.axvline(np.log10(result["settings"]["dense_threshold"]), color="k", ls="--", lw=1, label="dense")
    right.set_xlabel("log10 firing frequency (−9 = never fired)")
    right.set_ylabel("latents")
    right.set_title(f"latent usage: dead {result['dead_fraction']:.1%}, dense {result['dense_fraction']:.1%}")
    right.legend(loc="upper left")
    return [save_figure(fig, directory / "eval_core.png")]


def plot_ground_truth(directory: Path, result: dict, per_feature: dict[str, Tensor]) -> list[Path]:
    """``eval_ground_truth.png``: absorption per parent (when the data has a hierarchy), splitting by threshold and each
    feature's best decoder cosine."""
    per_parent = result.get("per_parent")
    panels = 3 if per_parent else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    summary = result["summary"]
    if per_parent:
        ax = axes[0]
        names = ("full_absorption", "partial_absorption", "absorption_fraction")
        x = np.arange(len(per_parent))
        width = 0.27
        for offset, name in enumerate(names):
            values = [np.nan if p[name] is None else p[name] for p in per_parent]
            ax.bar(x + (offset - 1) * width, values, width, label=name.replace("_", " "))
        ax.set_xticks(x, [str(p["parent"]) for p in per_parent], fontsize=7)
        ax.set_xlabel("parent feature")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title("absorption per parent")
        ax.legend(fontsize=7)
    ax = axes[-2]
    thresholds = list(result["settings"]["split_thresholds"])
    positions = np.arange(len(thresholds))
    ax.bar(positions, [summary[f"splitting@{t}"] for t in thresholds], color="tab:green")
    ax.set_xticks(positions, [f"{t:g}" for t in thresholds])
    ax.set_xlabel("cosine threshold τ")
    ax.set_ylabel("mean extra latents per feature")
    ax.set_title("splitting")
    ax = axes[-1]
    best = per_feature["best_cos"].numpy()
    ax.hist(np.nan_to_num(best, nan=-1.0), bins=40, range=(-1, 1), color="tab:purple")
    ax.axvline(result["settings"]["coverage_threshold"], color="k", ls="--", lw=1)
    ax.set_xlabel("best decoder cosine of each ground-truth feature")
    ax.set_ylabel("features")
    ax.set_title(f"coverage {summary['coverage']:.1%}, MMCS {summary['mmcs'] or 0:.3f}")
    return [save_figure(fig, directory / "eval_ground_truth.png")]


def plot_first_letter(directory: Path, result: dict) -> list[Path]:
    """``eval_first_letter.png``: per kept letter, the absorption fraction and full-absorption rate, and the number
    of split features."""
    kept = {letter: row for letter, row in result["letters"].items() if row["kept"]}
    letters = list(kept)
    x = np.arange(len(letters))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.4
    for offset, (name, label) in enumerate(
        (("absorption_fraction", "absorption fraction"), ("full_absorption_rate", "full-absorption rate"))
    ):
        values = [np.nan if kept[letter][name] is None else kept[letter][name] for letter in letters]
        left.bar(x + (offset - 0.5) * width, values, width, label=label)
    left.set_xticks(x, letters)
    left.set_ylim(0, 1)
    left.set_title(f"absorption per letter ({len(letters)} of 26 with probe F1 > {result['settings']['min_probe_f1']})")
    left.legend(fontsize=7)
    right.bar(x, [kept[letter]["split_features"] for letter in letters], color="tab:green")
    right.set_xticks(x, letters)
    right.set_ylabel("latents")
    right.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_title("split features (k-sparse probing, F1-jump rule)")
    return [save_figure(fig, directory / "eval_first_letter.png")]
