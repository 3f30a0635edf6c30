"""Absorption against reconstruction, mean ± sd over seeds, from a sweep report.

Reads ``report.csv`` of ``python -m c2r.report``, groups the finished jobs by architecture and C²R coefficient,
prints a markdown table (mean ± sd over the seeds of each group) and plots the absorption fraction against FVU,
one line per architecture through its coefficients, with both error bars: where a coefficient's point lies left
of and below the baseline's, C²R bought absorption at no reconstruction cost. ``--eval`` picks whose absorption:
``ground_truth`` (synthetic data, features known) or ``first_letter`` (the LM, SAEBench-style); ``--json`` also
writes every finished job as one record.

    python -m c2r.train --config-dir sweeps --config-name ground_truth_grid -m model=topk,batchtopk,matryoshka \\
        model.k=8 regularizer.coef=0,0.03,0.1,0.3 seed=0,1,2 train_tokens=2097152
    python -m c2r.report outputs/sweeps/ground_truth_grid/<time>
    python benchmarks/absorption_pareto.py outputs/sweeps/ground_truth_grid/<time>/report.csv --out <folder>

    python -m c2r.train --config-dir sweeps --config-name lm_absorption -m
    python -m c2r.report outputs/sweeps/lm_absorption/<time>
    python benchmarks/absorption_pareto.py outputs/sweeps/lm_absorption/<time>/report.csv --eval first_letter \\
        --out benchmarks/results/lm_absorption --json benchmarks/results/lm_absorption.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# report.csv column -> (short name, table header), per evaluation; the plot is core.fvu vs <eval>.absorption_fraction.
RECONSTRUCTION = {"core.fvu": ("fvu", "FVU"), "core.l0": ("l0", "L0")}
COLUMNS = {
    "ground_truth": {
        **RECONSTRUCTION,
        "ground_truth.absorption_fraction": ("absorption_fraction", "absorption fraction"),
        "ground_truth.full_absorption": ("full_absorption", "full absorption"),
        "ground_truth.splitting@0.7": ("splitting@0.7", "splitting@0.7"),
        "ground_truth.coverage": ("coverage", "coverage"),
        "ground_truth.mmcs": ("mmcs", "MMCS"),
    },
    "first_letter": {
        **RECONSTRUCTION,
        "first_letter.absorption_fraction": ("absorption_fraction", "absorption fraction"),
        "first_letter.full_absorption_rate": ("full_absorption_rate", "full absorption rate"),
        "first_letter.split_features": ("split_features", "split features"),
        "first_letter.letters_kept": ("letters_kept", "letters kept"),
        "ce_loss.ce_loss_score": ("ce_loss_score", "CE-loss score"),
        "core.decoder_max_cos_mean": ("decoder_max_cos_mean", "decoder max cos"),
        "consistency.mean_best_cosine": ("consistency_mean_best_cosine", "cross-seed best cos"),
    },
}


def finished_runs(report: Path, columns: dict[str, tuple[str, str]]) -> list[dict]:
    """One record per finished job: architecture, coef, seed and the selected columns (None where empty)."""
    with report.open() as rows:
        return [
            {"arch": row["model"], "coef": float(row["coef"]), "seed": int(row["seed"]), "job": row["job"]}
            | {name: float(row[column]) if row.get(column) else None for column, (name, _) in columns.items()}
            for row in csv.DictReader(rows)
            if row["status"] == "finished"
        ]


def groups(runs: list[dict], columns: dict[str, tuple[str, str]]) -> dict[tuple[str, float], dict[str, list[float]]]:
    """``(architecture, coef) -> column -> values over the seeds``."""
    grouped: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for column, (name, _) in columns.items():
            if run[name] is not None:
                grouped[(run["arch"], run["coef"])][column].append(run[name])
    return grouped


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(grouped: dict, columns: dict[str, tuple[str, str]]) -> str:
    headers = [header for _, header in columns.values()]
    lines = ["| architecture | λ | seeds | " + " | ".join(headers) + " |", "|---|---|---|" + "---|" * len(headers)]
    for (architecture, coef), values in sorted(grouped.items()):
        cells = [("{:.3f} ± {:.3f}".format(*mean_sd(values[c])) if values[c] else "–") for c in columns]
        lines.append(f"| {architecture} | {coef:g} | {len(values['core.fvu'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grouped: dict, columns: dict[str, tuple[str, str]], evaluation: str, out: Path) -> None:
    x_column, y_column = "core.fvu", f"{evaluation}.absorption_fraction"
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for architecture in sorted({architecture for architecture, _ in grouped}):
        points = sorted((coef, values) for (name, coef), values in grouped.items() if name == architecture)
        fvu = [mean_sd(values[x_column]) for _, values in points]
        absorption = [mean_sd(values[y_column]) for _, values in points]
        line = axes.errorbar([m for m, _ in fvu], [m for m, _ in absorption], xerr=[s for _, s in fvu],
                             yerr=[s for _, s in absorption], marker="o", capsize=3, label=architecture)
        for (coef, _), (x, _), (y, _) in zip(points, fvu, absorption):
            axes.annotate(f"λ={coef:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                          color=line[0].get_color())
    axes.set_xlabel("FVU (held-out)")
    axes.set_ylabel(columns[y_column][1])
    axes.set_title(f"{evaluation}: absorption vs FVU, mean ± sd over seeds (lower left is better)", fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="report.csv of python -m c2r.report")
    parser.add_argument("--eval", choices=sorted(COLUMNS), default="ground_truth", help="whose absorption metrics")
    parser.add_argument("--out", type=Path, default=None, help="folder for absorption_pareto.png/.md (default: the report's)")
    parser.add_argument("--json", type=Path, default=None, help="also write every finished job as {'runs': [...]}")
    args = parser.parse_args()
    out = args.out or args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    columns = COLUMNS[args.eval]
    runs = finished_runs(args.report, columns)
    grouped = groups(runs, columns)
    markdown = table(grouped, columns)
    print(markdown)
    (out / "absorption_pareto.md").write_text(markdown + "\n")
    plot(grouped, columns, args.eval, out / "absorption_pareto.png")
    print(f"wrote {out / 'absorption_pareto.md'} and {out / 'absorption_pareto.png'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"source": str(args.report), "eval": args.eval, "runs": runs}, indent=1) + "\n")
        print(f"wrote {args.json} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
