"""Absorption against reconstruction, mean ± sd over seeds, from a sweep report of ground-truth runs.

Reads ``report.csv`` of ``python -m c2r.report`` (jobs with ``ground_truth.*`` columns), groups the finished jobs by
architecture and C²R coefficient, prints a markdown table (mean ± sd over the seeds of each group) and plots the
absorption fraction against FVU, one line per architecture through its coefficients, with both error bars:
where a coefficient's point lies left of and below the baseline's, C²R bought absorption at no reconstruction
cost.

    python -m c2r.train --config-dir sweeps --config-name ground_truth_grid -m model=topk,batchtopk,matryoshka \\
        model.k=8 regularizer.coef=0,0.03,0.1,0.3 seed=0,1,2 train_tokens=2097152
    python -m c2r.report outputs/sweeps/ground_truth_grid/<time>
    python benchmarks/absorption_pareto.py outputs/sweeps/ground_truth_grid/<time>/report.csv --out <folder>
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = {
    "core.fvu": "FVU",
    "core.l0": "L0",
    "ground_truth.absorption_fraction": "absorption fraction",
    "ground_truth.full_absorption": "full absorption",
    "ground_truth.splitting@0.7": "splitting@0.7",
    "ground_truth.coverage": "coverage",
    "ground_truth.mmcs": "MMCS",
}


def groups(report: Path) -> dict[tuple[str, float], dict[str, list[float]]]:
    """``(architecture, coef) -> column -> values over the seeds`` of the finished jobs."""
    grouped: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with report.open() as rows:
        for row in csv.DictReader(rows):
            if row["status"] != "finished":
                continue
            for column in COLUMNS:
                if row.get(column):
                    grouped[(row["model"], float(row["coef"]))][column].append(float(row[column]))
    return grouped


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(grouped: dict) -> str:
    lines = ["| architecture | λ | seeds | " + " | ".join(COLUMNS.values()) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for (architecture, coef), columns in sorted(grouped.items()):
        cells = [("{:.3f} ± {:.3f}".format(*mean_sd(columns[c])) if columns[c] else "–") for c in COLUMNS]
        lines.append(f"| {architecture} | {coef:g} | {len(columns['core.fvu'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grouped: dict, out: Path) -> None:
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for architecture in sorted({architecture for architecture, _ in grouped}):
        points = sorted((coef, columns) for (name, coef), columns in grouped.items() if name == architecture)
        fvu = [mean_sd(columns["core.fvu"]) for _, columns in points]
        absorption = [mean_sd(columns["ground_truth.absorption_fraction"]) for _, columns in points]
        line = axes.errorbar([m for m, _ in fvu], [m for m, _ in absorption], xerr=[s for _, s in fvu],
                             yerr=[s for _, s in absorption], marker="o", capsize=3, label=architecture)
        for (coef, _), (x, _), (y, _) in zip(points, fvu, absorption):
            axes.annotate(f"λ={coef:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                          color=line[0].get_color())
    axes.set_xlabel("FVU (held-out)")
    axes.set_ylabel("absorption fraction")
    axes.set_title("Absorption vs FVU, mean ± sd over seeds (lower left is better)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="report.csv of python -m c2r.report")
    parser.add_argument("--out", type=Path, default=None, help="folder for absorption_pareto.png/.md (default: the report's)")
    args = parser.parse_args()
    out = args.out or args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    grouped = groups(args.report)
    markdown = table(grouped)
    print(markdown)
    (out / "absorption_pareto.md").write_text(markdown + "\n")
    plot(grouped, out / "absorption_pareto.png")
    print(f"wrote {out / 'absorption_pareto.md'} and {out / 'absorption_pareto.png'}")


if __name__ == "__main__":
    main()
