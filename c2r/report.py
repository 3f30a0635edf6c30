"""``python -m c2r.report <sweep folder>``: one table of every job of a sweep, and the plots that compare them.

A job is a training run folder (its ``run_config.yaml``, or for older runs ``.hydra/config.yaml``); it is
finished once its ``metrics.json`` exists, failed while its ``FAILED`` exists, and evaluated once its
``eval.json`` exists. Other folders with Hydra files (``c2r.evaluate`` jobs, ...) are skipped and listed. The
report writes into the sweep folder (or ``--out``):

- ``report.csv`` and ``report.md``: one row per job: its settings (the swept keys plus architecture,
  regularizer, coef, dictionary size, k, seed), the final training metrics (``train.*``) and every scalar
  of its evaluation (``<eval>.<metric>``, e.g. ``core.fvu``, ``ground_truth.absorption_fraction``), and its
  cross-seed consistency (``consistency.*``) where the sweep has jobs that differ from it only in ``seed``;
- ``report_pareto.png``: L0 vs FVU per regularizer setting, each with its Pareto front (lower-left is better);
- ``report_coef.png``: regularizer coefficient vs each absorption / splitting / consistency metric, mean ± sd
  over seeds, one line per remaining setting (architecture, dictionary size, k, ...).

Re-running the report on a sweep in progress is safe: it only reads, and lists unfinished jobs as such."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The evaluation code (torch) and matplotlib are imported where they are used, so that --help comes at once.
from c2r.run_folder import RUN_CONFIG, content_settings, failure_of, is_training_config, load_run_config, load_run_hydra

COEF_METRICS = re.compile(r"^(?!.*_parents).*(absorption|splitting)|^consistency\.")
"""Evaluation columns plotted against the coefficient: every absorption and splitting measure (not the counts
of parents they were averaged over) and the cross-seed consistency."""
SETTING_COLUMNS = ("model", "regularizer", "coef", "dict_size", "k", "seed", "train_tokens", "data")
NOT_A_SERIES = {"coef", "seed"}
"""Settings that vary along a coefficient plot's x axis or are averaged over, never a line of their own."""


@dataclass
class Job:
    """One job folder of a sweep: what it was run with and what it measured."""

    name: str
    finished: bool
    settings: dict[str, Any]
    metrics: dict[str, float]
    error: str | None = None  # the first line of FAILED

    @property
    def status(self) -> str:
        return "finished" if self.finished else "failed" if self.error else "unfinished"

    @property
    def row(self) -> dict[str, Any]:
        return {"job": self.name, "status": self.status, **self.settings, **self.metrics}


def read_job(path: Path, sweep_dir: Path, config: DictConfig) -> Job:
    """A job from its saved config and Hydra settings plus its ``metrics.json`` and ``eval.json`` where they
    exist."""
    from c2r.evaluation import RESULTS_FILE, scalar_metrics

    hydra = load_run_hydra(path)
    choices, overrides = hydra.runtime.choices, hydra.overrides.task
    # Keys Hydra leaves out of job folder names (hardware, logger, ...) do not describe the experiment either.
    unnamed = set(hydra.job.config.override_dirname.exclude_keys)
    regularizer = config.get("regularizer") or {}
    settings: dict[str, Any] = {
        "model": choices.get("model"),
        "regularizer": choices.get("regularizer"),
        "coef": float(regularizer.get("coef", 0.0)) if regularizer else 0.0,
        "dict_size": config.get("dict_size"),
        "k": config.model.get("k"),
        "seed": config.get("seed"),
        "train_tokens": config.get("train_tokens"),
        "data": choices.get("data"),
    }
    for override in overrides:  # the swept (and other command-line) keys, as given
        key, _, value = str(override).lstrip("+~").partition("=")
        if key not in unnamed and key not in settings and key.split(".")[-1] not in settings:
            settings[key] = value
    metrics: dict[str, float] = {}
    finished = (path / "metrics.json").is_file()
    if finished:
        trained = json.loads((path / "metrics.json").read_text())
        metrics.update({f"train.{name}": value for name, value in trained.items() if _is_number(value)})
    if (path / RESULTS_FILE).is_file():
        metrics.update(scalar_metrics(json.loads((path / RESULTS_FILE).read_text())))
    return Job(str(path.relative_to(sweep_dir)), finished, settings, metrics, failure_of(path))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_jobs(sweep_dir: Path) -> tuple[list[Job], list[str]]:
    """Every training job folder under ``sweep_dir`` (any depth), in path order, and the other folders with
    Hydra files that were skipped (relative paths)."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder: pass a sweep folder (e.g. outputs/sweeps/<time>)")
    paths = sorted({p.parent.parent for p in sweep_dir.glob("**/.hydra/config.yaml")}
                   | {p.parent for p in sweep_dir.glob(f"**/{RUN_CONFIG}")})
    jobs, skipped = [], []
    for path in paths:
        config = load_run_config(path)
        if is_training_config(config):
            jobs.append(read_job(path, sweep_dir, config))
        else:
            skipped.append(str(path.relative_to(sweep_dir)))
    if not jobs:
        raise FileNotFoundError(
            f"no training jobs under {sweep_dir}: a job folder holds run_config.yaml and .hydra/, which "
            "`python -m c2r.train -m ...` writes for every job under hydra.sweep.dir"
        )
    return jobs, skipped


def columns_of(jobs: Sequence[Job]) -> list[str]:
    """Table columns: job and status, the settings, then the metrics, each in first-seen order."""
    settings = dict.fromkeys(key for job in jobs for key in job.settings)
    metrics = dict.fromkeys(key for job in jobs for key in job.metrics)
    return ["job", "status", *settings, *metrics]


def write_table(jobs: Sequence[Job], csv_path: Path, markdown_path: Path) -> None:
    """The table twice: CSV with every column (for pandas or a spreadsheet), and markdown to read, where the
    settings shared by every job are stated once above the table instead of repeated in each row."""
    columns, rows = columns_of(jobs), [job.row for job in jobs]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    settings = dict.fromkeys(key for job in jobs for key in job.settings)
    shared = {key: rows[0].get(key) for key in settings if len({str(row.get(key)) for row in rows}) == 1}
    shown = [column for column in columns if column not in shared]
    lines = [f"# Sweep report: {len(jobs)} jobs", ""]
    if shared:
        lines += ["Same for every job: " + ", ".join(f"{key}={_cell(value)}" for key, value in shared.items()), ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in shown) + " |" for row in rows]
    markdown_path.write_text("\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- cross-seed consistency ------------------------------------------------------------------------------------


def seed_groups(jobs: Sequence[Job], sweep_dir: Path) -> list[list[Job]]:
    """The finished jobs with an exported SAE (``<job>/sae``) grouped by every content setting of their config
    but ``seed`` (:func:`c2r.run_folder.content_settings`: where they ran and what they logged do not count)
    and by their data settings resolved, so that jobs whose data follow the seed (the synthetic sources'
    ``seed: ${seed}``) are not compared: they trained on different data. Only groups with at least two seeds."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        path = sweep_dir / job.name
        if job.finished and (path / "sae").is_dir():
            config = load_run_config(path)
            settings = content_settings(config)
            settings.pop("seed", None)
            data = OmegaConf.to_container(config.data, resolve=True) if "data" in config else None
            groups[repr((sorted(settings.items()), data))].append(job)
    return [group for group in groups.values() if len({job.settings["seed"] for job in group}) > 1]


def add_consistency(jobs: Sequence[Job], sweep_dir: Path) -> None:
    """Add ``consistency.matched_share`` and ``consistency.mean_best_cosine`` to each job of a seed group: its
    latents' best-match cosines in each other seed's decoder (:mod:`c2r.evaluation.consistency`), summarised per
    other seed, then averaged over the other seeds. Each pair of seeds is searched once, for both directions."""
    import torch

    from c2r.evaluation.consistency import best_match_cosines, match_summary
    from c2r.export import load_sae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for group in seed_groups(jobs, sweep_dir):
        decoders = [load_sae(sweep_dir / job.name / "sae").W_dec.to(device) for job in group]
        summaries: dict[int, list[dict[str, float]]] = defaultdict(list)
        for i, j in itertools.combinations(range(len(group)), 2):
            if group[i].settings["seed"] != group[j].settings["seed"]:
                best_i, best_j = best_match_cosines(decoders[i], decoders[j])
                summaries[i].append(match_summary(best_i))
                summaries[j].append(match_summary(best_j))
        for i, against_others in summaries.items():
            for name in against_others[0]:
                group[i].metrics[f"consistency.{name}"] = statistics.fmean(s[name] for s in against_others)


# ---- plots ---------------------------------------------------------------------------------------------------


def regularizer_label(settings: dict[str, Any]) -> str:
    """``none``, or the regularizer with its weight, e.g. ``c2r λ=0.03`` (``c2r λ=0`` trains the baseline)."""
    name = settings.get("regularizer") or "none"
    return name if name == "none" else f"{name} λ={settings['coef']:g}"


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower is better on each), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _first(metrics: dict[str, float], *names: str) -> float | None:
    return next((metrics[name] for name in names if metrics.get(name) is not None), None)


def plot_pareto(jobs: Sequence[Job], path: Path) -> Path | None:
    """L0 vs FVU, one panel per dictionary size, one colour per regularizer setting with its Pareto front;
    held-out evaluation values where the job has them, else its final validation."""
    from c2r.evaluation.plots import plt, save_figure

    panels: dict[Any, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        l0 = _first(job.metrics, "core.l0", "train.l0")
        fvu = _first(job.metrics, "core.fvu", "train.fvu")
        if l0 is not None and fvu is not None:
            panels[job.settings.get("dict_size")][regularizer_label(job.settings)].append((l0, fvu))
    if not panels:
        return None
    labels = sorted({label for groups in panels.values() for label in groups})
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for axis, (dict_size, groups) in zip(axes.flat, sorted(panels.items(), key=lambda item: str(item[0]))):
        for label, points in sorted(groups.items()):
            xs, ys = zip(*points)
            axis.plot(xs, ys, "o", alpha=0.6, color=colours[label], label=label)
            front_x, front_y = zip(*pareto_front(points))
            axis.plot(front_x, front_y, "-", color=colours[label])
        axis.set_xlabel("L0 (active latents per token)")
        axis.set_title(f"{dict_size} latents")
    axes.flat[0].set_ylabel("FVU (lower is better)")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle("sparsity vs reconstruction: Pareto fronts per regularizer")
    return save_figure(fig, path)


def coefficient_series(jobs: Sequence[Job], metric: str) -> dict[str, list[tuple[float, float, float, int]]]:
    """For one metric: ``{series label: [(coef, mean, sd, seeds), ...]}``, averaging over seeds; a series is one
    combination of the other settings that vary across the sweep (architecture, dictionary size, ...)."""
    varying = [key for key in dict.fromkeys(k for job in jobs for k in job.settings)
               if key not in NOT_A_SERIES and len({str(job.settings.get(key)) for job in jobs}) > 1]
    if len({job.settings.get("regularizer") for job in jobs} - {"none"}) <= 1 and "regularizer" in varying:
        varying.remove("regularizer")  # one penalty (plus baselines): λ=0 / none are the same point of each line
    values: dict[tuple[str, float], list[float]] = defaultdict(list)
    for job in jobs:
        if job.metrics.get(metric) is None or not math.isfinite(job.metrics[metric]):
            continue
        label = ", ".join(f"{key}={job.settings.get(key)}" for key in varying) or "all"
        values[(label, job.settings["coef"])].append(job.metrics[metric])
    series: dict[str, list[tuple[float, float, float, int]]] = defaultdict(list)
    for (label, coef), samples in sorted(values.items()):
        sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
        series[label].append((coef, statistics.fmean(samples), sd, len(samples)))
    return dict(series)


def plot_coefficients(jobs: Sequence[Job], path: Path, metrics: Sequence[str] | None = None) -> Path | None:
    """Coefficient vs every absorption / splitting metric (or ``metrics``), mean ± sd over seeds."""
    from c2r.evaluation.plots import plt, save_figure

    available = [c for c in columns_of(jobs) if any(c in job.metrics for job in jobs)]
    chosen = list(metrics) if metrics else [c for c in available if COEF_METRICS.search(c)]
    series = {metric: coefficient_series(jobs, metric) for metric in chosen}
    chosen = [metric for metric in chosen if series[metric]]
    if not chosen:
        return None
    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    coefs = sorted({job.settings["coef"] for job in jobs})
    positive = [c for c in coefs if c > 0]
    for axis, metric in zip(axes.flat, chosen):
        for label, points in series[metric].items():
            x, mean, sd, _ = zip(*points)
            axis.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=label)
        if positive:  # λ spans decades and includes 0
            axis.set_xscale("symlog", linthresh=min(positive))
        axis.set_xticks(coefs, [f"{c:g}" for c in coefs])
        axis.set_xlabel("regularizer coefficient λ")
        axis.set_title(metric, fontsize="medium")
    for axis in list(axes.flat)[len(chosen):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle("mean ± sd over seeds")
    return save_figure(fig, path)


def write_report(sweep_dir: Path, out_dir: Path | None = None, metrics: Sequence[str] | None = None,
                 consistency: bool = True) -> dict:
    """Write the table and plots of the sweep in ``sweep_dir``; returns what was written and the job counts."""
    jobs, skipped = find_jobs(sweep_dir)
    if consistency:
        add_consistency(jobs, sweep_dir)
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(jobs, out_dir / "report.csv", out_dir / "report.md")
    finished = [job for job in jobs if job.finished]
    plots = [plot_pareto(finished, out_dir / "report_pareto.png"),
             plot_coefficients(finished, out_dir / "report_coef.png", metrics) if finished else None]
    return {
        "jobs": len(jobs),
        "finished": len(finished),
        "unfinished": [job.name for job in jobs if job.status == "unfinished"],
        "failed": {job.name: job.error for job in jobs if job.status == "failed"},
        "skipped": skipped,
        "files": [str(out_dir / name) for name in ("report.csv", "report.md")] + [str(p) for p in plots if p],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m c2r.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir, e.g. outputs/sweeps/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="columns to plot against the coefficient (default: every absorption/splitting/consistency "
                        "metric)")
    parser.add_argument("--no-consistency", action="store_true",
                        help="skip the cross-seed consistency (2·F²·d flops per pair of seeds: ~15 min on 2 CPU "
                        "cores for 65,536 latents of d=2,304)")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.sweep_dir, args.out, args.metrics, consistency=not args.no_consistency)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(f"{summary['finished']} of {summary['jobs']} jobs finished")
    if summary["unfinished"]:
        print("unfinished (relaunch the sweep command to finish them): " + ", ".join(summary["unfinished"]))
    for name, error in summary["failed"].items():
        print(f"failed: {name}: {error} (the traceback is in its FAILED file)")
    if summary["skipped"]:
        print("skipped (not training jobs): " + ", ".join(summary["skipped"]))
    print("wrote " + "\n      ".join(summary["files"]))


if __name__ == "__main__":
    main()
