"""How exact C²R's neighbour search stays between refreshes, measured on every step of real training runs.

Each job is a real ``python -m c2r.train`` run with C²R on every step and ``regularizer.audit_every=1``: next to
each step's chosen pairs the exact global search runs too, and the run logs the share of latents whose chosen
neighbour is the exact one (``exact_agreement``) and loss(chosen pairs) / loss(exact pairs)
(``exact_loss_ratio``). The table gives, per window of steps after a refresh, the mean and the worst step.

    python benchmarks/c2r_exactness.py                              # SmolLM2 default + synthetic hierarchy
    python benchmarks/c2r_exactness.py --data synthetic_hierarchy --sizes 1024

Modes: ``cached`` = one kept neighbour per latent refreshed every 100 steps (``candidates=1`` without the
probe: the search that was the default before candidate lists), ``lists`` = 16 candidates per latent refreshed
every 100 steps (no probe), ``candidates`` = the default (16 candidates; when the probe finds misses the lists most likely stale are
rebuilt, and all of them when that does not remove the misses). Prints a table and writes benchmarks/results/c2r_exactness.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = {
    "cached": ["regularizer.candidates=1", "regularizer.probe_latents=0"],
    "lists": ["regularizer.probe_latents=0"],
    "candidates": [],
}
# (dictionary size, k) pairs as in the issue that measured the old cached search.
K_FOR_SIZE = {1024: 8, 4096: 32}
WINDOWS = ((0, 24), (25, 49), (50, 74), (75, 99), (100, 10**9))


def run_job(data: str, dict_size: int, mode: str, args: argparse.Namespace, run_dir: Path) -> list[dict[str, float]]:
    """Train one job and return its per-step audit rows."""
    overrides = [
        f"data={data}", f"dict_size={dict_size}", f"model.k={K_FOR_SIZE.get(dict_size, 32)}",
        "regularizer=c2r", f"regularizer.coef={args.coef}", "regularizer.interval=1", "regularizer.audit_every=1",
        f"regularizer.refresh_every={args.refresh_every}", f"optim.lr={args.lr}", f"train_tokens={args.tokens}",
        "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "evaluation=none",
        f"hydra.run.dir={run_dir}", *MODES[mode],
    ]
    print(f"  {data} F={dict_size} {mode}: python -m c2r.train {' '.join(overrides)}", flush=True)
    subprocess.run([sys.executable, "-m", "c2r.train", *overrides], check=True, stdout=subprocess.DEVNULL)
    return read_audit(run_dir / "csv" / "metrics.csv")


def read_audit(metrics_csv: Path) -> list[dict[str, float]]:
    """The audited steps of a run's CSV log."""
    with metrics_csv.open() as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("details/c2r/exact_agreement")]
    return [
        {
            "step": int(row["step"]),
            "steps_since_refresh": float(row["details/c2r/steps_since_refresh"]),
            "exact_agreement": float(row["details/c2r/exact_agreement"]),
            "exact_loss_ratio": float(row["details/c2r/exact_loss_ratio"]),
            "renewals": float(row.get("details/c2r/renewals") or 0),  # logged from the first renewal on
        }
        for row in logged
    ]


def summarise(steps: list[dict[str, float]]) -> list[dict]:
    """Mean and worst step per window of steps after a refresh."""
    windows = []
    for low, high in WINDOWS:
        inside = [s for s in steps if low <= s["steps_since_refresh"] <= high]
        if not inside:
            continue
        ratios = [s["exact_loss_ratio"] for s in inside]
        agreements = [s["exact_agreement"] for s in inside]
        windows.append({
            "window": f"{low}-{high}" if high < 10**9 else f"{low}+",
            "steps": len(inside),
            "loss_ratio_mean": statistics.fmean(ratios),
            "loss_ratio_min": min(ratios),
            "not_exact_share_mean": 1 - statistics.fmean(agreements),
            "not_exact_share_max": 1 - min(agreements),
        })
    refreshes = sum(s["steps_since_refresh"] == 0 for s in steps)
    windows.append({"window": "all", "steps": len(steps), "refreshes": refreshes,
                    "renewals": int(max(s.get("renewals", 0) for s in steps)),
                    "loss_ratio_mean": statistics.fmean(s["exact_loss_ratio"] for s in steps),
                    "loss_ratio_min": min(s["exact_loss_ratio"] for s in steps),
                    "not_exact_share_mean": 1 - statistics.fmean(s["exact_agreement"] for s in steps),
                    "not_exact_share_max": 1 - min(s["exact_agreement"] for s in steps)})
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["smollm2", "synthetic_hierarchy"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--coef", type=float, default=0.03)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--refresh-every", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=524_288, help="training tokens per job (batch 2048)")
    parser.add_argument("--out", type=Path, default=RESULTS / "c2r_exactness.json")
    args = parser.parse_args()

    stored = json.loads(args.out.read_text())["jobs"] if args.out.exists() else []
    jobs = []
    with tempfile.TemporaryDirectory() as scratch:
        for data in args.data:
            for dict_size in args.sizes:
                for mode in args.modes:
                    steps = run_job(data, dict_size, mode, args, Path(scratch) / f"{data}-{dict_size}-{mode}")
                    jobs.append({"data": data, "dict_size": dict_size, "k": K_FOR_SIZE.get(dict_size, 32),
                                 "mode": mode, "windows": summarise(steps), "steps": steps})

    print(f"\n{'data':>20} {'F':>5} {'mode':>10} {'window':>7} {'loss ratio mean (min)':>22} "
          f"{'not exact mean (max)':>21} {'refreshes':>9} {'renewals':>8}")
    for job in jobs:
        for w in job["windows"]:
            print(f"{job['data']:>20} {job['dict_size']:>5} {job['mode']:>10} {w['window']:>7} "
                  f"{w['loss_ratio_mean']:>14.3f} ({w['loss_ratio_min']:.3f}) "
                  f"{w['not_exact_share_mean']:>13.3f} ({w['not_exact_share_max']:.3f}) {w.get('refreshes', ''):>9} {w.get('renewals', ''):>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    key = lambda job: (job["data"], job["dict_size"], job["mode"])  # noqa: E731
    kept = [job for job in stored if key(job) not in {key(new) for new in jobs}]
    args.out.write_text(json.dumps({"settings": settings, "jobs": kept + jobs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
