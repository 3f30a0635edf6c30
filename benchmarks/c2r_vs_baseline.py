"""C²R against the baseline (coef=0) on the ground-truth hierarchy benchmark, at matched L0.

Every SAE is a TopK SAE with the same k (so L0 is matched exactly), width and training budget, trained on the same
``synthetic_hierarchy`` data (parents with mutually exclusive children, features in superposition) with the real
training step (``c2r.step``: MSE + AuxK + the C²R regularizer with its default schedule), then
exported and evaluated through ``c2r.load_sae`` with ``c2r.evaluation`` on held-out shards. C²R's weight is swept
over decades (its scale depends on batch size and width, docs/design.md §1); each setting runs with several seeds (the
SAE's initialisation and batch order; the data are fixed). A control trains the baseline on the same features with
children independent of their parents (``hierarchy=False``): the absorption an SAE shows without a hierarchy.

    python benchmarks/c2r_vs_baseline.py                     # ~2–3 min on 2 CPU cores
    python benchmarks/c2r_vs_baseline.py --coefs 0.01 0.1 --seeds 5

Prints a table (mean ± sd over seeds) and writes benchmarks/results/c2r_vs_baseline.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from c2r.data.hierarchy import HierarchicalShards
from c2r.data.shards import Manifest, ShardReader
from c2r.evaluation import run_evaluation
from c2r.export import export_sae, load_sae
from c2r.module import SAEModule
from c2r.regularizers import C2R
from c2r.sae import TopKSAE
from c2r.step import apply_gradients, loss_terms, total_loss

RESULTS = Path(__file__).parent / "results"
DATA = dict(d=32, n_parents=8, children_per_parent=3, n_independent=16, l0=4.0, child_prob=0.75,
            rows=65536, rows_per_shard=8192, val_shards=2, seed=0)
METRICS = (
    ("fvu", "core", "fvu"),
    ("l0", "core", "l0"),
    ("dead_fraction", "core", "dead_fraction"),
    ("full_absorption", "ground_truth", "full_absorption"),
    ("partial_absorption", "ground_truth", "partial_absorption"),
    ("absorption_fraction", "ground_truth", "absorption_fraction"),
    ("splitting@0.5", "ground_truth", "splitting@0.5"),
    ("splitting@0.7", "ground_truth", "splitting@0.7"),
    ("splitting@0.9", "ground_truth", "splitting@0.9"),
    ("coverage", "ground_truth", "coverage"),
    ("mmcs", "ground_truth", "mmcs"),
    ("hedging_encoder", "ground_truth", "hedging_encoder"),
)
TABLE = ("fvu", "full_absorption", "partial_absorption", "absorption_fraction", "splitting@0.5", "splitting@0.7",
         "coverage")


def training_rows(manifest: Manifest) -> torch.Tensor:
    """Every training row, normalised as training normalises them (E‖x‖² = 1)."""
    reader = ShardReader(manifest.directory)
    rows = np.concatenate([reader.rows(entry) for entry in manifest.train_shards])
    return torch.from_numpy(rows) * manifest.normalization_factor


def train(x: torch.Tensor, *, coef: float, seed: int, args: argparse.Namespace) -> TopKSAE:
    """A plain loop over the training objective and step sequence of ``c2r.train`` (no Lightning, in memory)."""
    torch.manual_seed(seed)
    sae = TopKSAE(x.shape[1], args.dict_size, k=args.k, seed=seed, dead_tokens=args.batch_size * 200)
    regularizers = {"c2r": C2R(coef=coef, seed=seed)} if coef > 0 else {}
    module = SAEModule(sae, regularizers, lr=args.lr, warmup_steps=args.steps // 20, total_steps=args.steps)
    sae.init_decoder_bias(x[:8192])
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, module.lr_factor)
    order = torch.Generator().manual_seed(seed)
    for step in range(args.steps):
        batch = x[torch.randint(len(x), (args.batch_size,), generator=order)]
        terms, out = loss_terms(sae, regularizers, batch, step)
        optimizer.zero_grad(set_to_none=True)
        total_loss(terms).backward()
        apply_gradients(sae, optimizer)
        schedule.step()
        sae.update_firing((out.acts != 0).any(dim=0), args.batch_size)
    return sae


def run_one(source: HierarchicalShards, coef: float, seed: int, args: argparse.Namespace) -> dict:
    shard_dir = source.ensure()
    manifest = Manifest.load(shard_dir)
    started = time.time()
    sae = train(training_rows(manifest), coef=coef, seed=seed, args=args)
    train_s = time.time() - started
    with tempfile.TemporaryDirectory() as tmp:
        export_sae(sae, tmp, normalization_factor=manifest.normalization_factor)
        result = run_evaluation(load_sae(tmp), shard_dir, None, split="val", plots=False)
    values = {name: result[section].get(key) if section == "core" else result[section]["summary"].get(key)
              for name, section, key in METRICS}
    return {"coef": coef, "seed": seed, "hierarchy": source.hierarchy, "train_s": round(train_s, 1), **values}


def summarise(runs: list[dict]) -> dict[str, dict[str, float | None]]:
    out = {}
    for name, _, _ in METRICS:
        values = [r[name] for r in runs if r[name] is not None]
        out[name] = {
            "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
        }
    return out


def fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}" if stat["sd"] is not None else f"{stat['mean']:.3f}"


def plot(groups: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("absorption_fraction", "full_absorption", "splitting@0.7")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8))
    for ax, metric in zip(axes, panels):
        for group in groups:
            fvu, value = group["summary"]["fvu"], group["summary"][metric]
            if value["mean"] is None:
                continue
            marker = "s" if group["label"].startswith("control") else ("o" if group["coef"] == 0 else "^")
            ax.errorbar(fvu["mean"], value["mean"], xerr=fvu["sd"] or 0, yerr=value["sd"] or 0, fmt=marker,
                        capsize=3, label=group["label"])
        ax.set_xlabel("FVU (lower is better)")
        ax.set_ylabel(metric.replace("_", " ") + " (0 = none)")
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle("C²R vs baseline on the hierarchy benchmark (TopK, matched L0; mean ± sd over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.003, 0.03, 0.3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dict-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-control", action="store_true", help="skip the baseline on independent features")
    parser.add_argument("--cache-dir", default=os.environ.get("C2R_CACHE_DIR", str(Path.home() / ".cache" / "c2r")))
    parser.add_argument("--out", type=Path, default=RESULTS / "c2r_vs_baseline.json")
    args = parser.parse_args()

    started = time.time()
    hierarchy = HierarchicalShards(**DATA, hierarchy=True, cache_dir=args.cache_dir)
    settings = [("baseline (coef=0)", hierarchy, 0.0)]
    settings += [(f"C²R coef={c:g}", hierarchy, c) for c in args.coefs]
    if not args.no_control:
        control = HierarchicalShards(**DATA, hierarchy=False, cache_dir=args.cache_dir)
        settings.append(("control: no hierarchy, coef=0", control, 0.0))
    groups = []
    for label, source, coef in settings:
        runs = []
        for seed in range(args.seeds):
            runs.append(run_one(source, coef, seed, args))
            print(f"{label:32s} seed {seed}: " + ", ".join(f"{k}={runs[-1][k]:.3f}" for k in TABLE
                                                          if runs[-1][k] is not None), flush=True)
        groups.append({"label": label, "coef": coef, "hierarchy": source.hierarchy, "runs": runs,
                       "summary": summarise(runs)})

    header = "| setting | " + " | ".join(TABLE) + " |"
    lines = [header, "|" + "---|" * (len(TABLE) + 1)]
    lines += ["| " + g["label"] + " | " + " | ".join(fmt(g["summary"][m]) for m in TABLE) + " |" for g in groups]
    table = "\n".join(lines)
    print()
    print(table)
    report = {
        "benchmark": "c2r_vs_baseline",
        "data": DATA,
        "sae": {"architecture": "topk", "dict_size": args.dict_size, "k": args.k, "batch_size": args.batch_size,
                "steps": args.steps, "lr": args.lr, "c2r": "C2R defaults (interval=5, cached neighbours) but coef"},
        "seeds": args.seeds,
        "groups": groups,
        "table_markdown": table,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "wall_time_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(groups, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {report['wall_time_s']} s")


if __name__ == "__main__":
    main()
