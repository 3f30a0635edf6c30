"""c2r's BatchTopK against SAELens's, trained on the same activations at the same budget, evaluated alike.

Both trainers get the same normalised rows (E‖x‖² = 1) in the same batch order (``parity_common.batch_order``),
the same width, k, batch size, number of steps and a constant lr (SAELens's default scheduler; c2r's warm-up and
decay are left out so that the schedule is not what differs). c2r trains in-process with ``c2r.step.train_step``
and the settings of ``conf/model/batchtopk.yaml`` (what ``model=batchtopk`` gives a user), its ``b_dec`` at the
geometric median of 8192 training rows as ``c2r.train`` does; SAELens trains in a subprocess with its own
interpreter and defaults (``saelens_train.py``). Each is evaluated in its inference form on the held-out rows
(c2r: exported and loaded back with ``c2r.load_sae``, a JumpReLU with the learned threshold; SAELens: the JumpReLU
it saves) by the same code: FVU, L0, dead latents (firing on no held-out row) and, on generated data, coverage
(true features with a live decoder row at cosine ≥ 0.9).

Datasets: ``hierarchy``: c2r's ground-truth hierarchy at the issue's setting (512 features in d=64, 64 parents
with 4 exclusive children each and 192 independent features, Zipf rates; width 512, k=4, batch 1024) for 3000
steps (3.1M samples, about half the issue's 6M); ``smollm2``: the cached SmolLM2-135M layer-5 residual shards
(d=576) at c2r.train's default: width 1024, k=8, batch 2048, 256 steps (524288 tokens).

    python benchmarks/batchtopk_parity.py                               # both datasets, 2 seeds
    python benchmarks/batchtopk_parity.py --label after                  # ~20 min on 2 shared CPU cores
    python benchmarks/batchtopk_parity.py --no-saelens --set encoder_init_scale=1.0 --label before   # old init

Prints a table and merges the run, under ``--label``, into benchmarks/results/batchtopk_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from c2r.data.hierarchy import HierarchicalShards
from c2r.export import export_sae, load_sae
from c2r.sae import SparseAutoencoder
from c2r.step import adam, train_step

sys.path.insert(0, str(Path(__file__).parent))
from parity_common import SMOLLM2, batch_order, ground_truth_features, inference_metrics, load_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SAELENS_PYTHON = Path("/work/venvs/saelens/bin/python")
HIERARCHY = dict(d=64, n_parents=64, children_per_parent=4, n_independent=192, l0=6.0, rows=1 << 20,
                 rows_per_shard=16384, val_shards=2, seed=0)
SETTINGS = {
    "hierarchy": dict(dict_size=512, k=4, batch_size=1024, steps=3000, lr=1e-3),
    "smollm2": dict(dict_size=1024, k=8, batch_size=2048, steps=256, lr=1e-3),  # c2r.train's SmolLM2 default
}
METRICS = ("fvu", "l0", "dead", "coverage")


def shard_dir(dataset: str, cache_dir: Path) -> Path:
    if dataset == "hierarchy":
        return HierarchicalShards(**HIERARCHY, cache_dir=cache_dir).ensure()
    return cache_dir / SMOLLM2


def c2r_sae(d_in: int, dict_size: int, k: int, seed: int, overrides: list[str]) -> SparseAutoencoder:
    """The SAE of ``model=batchtopk`` (its yaml, with ``overrides`` as ``key=value``)."""
    model = OmegaConf.load(ROOT / "conf" / "model" / "batchtopk.yaml")
    model = OmegaConf.merge(model, OmegaConf.from_dotlist([f"k={k}", *overrides]))
    cfg = OmegaConf.create({"dict_size": dict_size, "seed": seed, "model": model})
    return instantiate(cfg.model)(d_in=d_in)


def run_c2r(directory: Path, settings: dict, seed: int, overrides: list[str]) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    x = load_rows(directory, "train")
    torch.manual_seed(seed)
    sae = c2r_sae(x.shape[1], settings["dict_size"], settings["k"], seed, overrides)
    sae.init_decoder_bias(x[:8192])
    optimizer = adam(sae, settings["lr"])
    started = time.time()
    for step, indices in enumerate(batch_order(len(x), settings["steps"], settings["batch_size"], seed)):
        train_step(sae, {}, optimizer, x[indices], step)
    train_s = time.time() - started
    trainer_dead = int(sae.dead_mask().sum())
    with tempfile.TemporaryDirectory() as tmp:
        export_sae(sae, tmp, normalization_factor=manifest["normalization_factor"])
        inference = load_sae(tmp)
    raw_val = load_rows(directory, "val") / manifest["normalization_factor"]
    metrics = inference_metrics(raw_val, inference.encode, inference.decode, inference.W_dec,
                                ground_truth_features(directory))
    return {**metrics, "threshold": float(sae.threshold), "trainer_dead": trainer_dead, "train_s": round(train_s, 1)}


def run_saelens(directory: Path, settings: dict, seed: int, threads: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [str(SAELENS_PYTHON), str(Path(__file__).parent / "saelens_train.py"), "--shards", str(directory),
                   "--seed", str(seed), "--threads", str(threads), "--out", str(out)]
        command += [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
        command += ["--set", *overrides] if overrides else []
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def fmt(stat: dict | None) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.4g} ± {stat['sd']:.2g}" if stat["sd"] is not None else f"{stat['mean']:.4g}"


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "c2r", "conf"], cwd=ROOT, capture_output=True,
                           text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="override every dataset's number of steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="c2r model settings over conf/model/batchtopk.yaml, e.g. aux_coef=1 (diagnosis)")
    parser.add_argument("--saelens-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SAELens config fields over its defaults, e.g. decoder_init_norm=1.0 (diagnosis)")
    parser.add_argument("--lr", type=float, help="override every dataset's lr (both trainers)")
    parser.add_argument("--no-saelens", action="store_true", help="c2r only (diagnosis runs)")
    parser.add_argument("--label", default="current", help="key of this run in the JSON")
    parser.add_argument("--threads", type=int, default=1, help="1: faster than 2 on a shared 2-core machine")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("C2R_CACHE_DIR", Path.home() / ".cache" / "c2r")))
    parser.add_argument("--out", type=Path, default=RESULTS / "batchtopk_parity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.time()
    trainers = ["c2r"] + ([] if args.no_saelens else ["saelens"])
    datasets = {}
    for dataset in args.datasets:
        settings = {**SETTINGS[dataset], **({"steps": args.steps} if args.steps else {}),
                    **({"lr": args.lr} if args.lr else {})}
        directory = shard_dir(dataset, args.cache_dir)
        runs: dict[str, list[dict]] = {trainer: [] for trainer in trainers}
        for seed in range(args.seeds):
            runs["c2r"].append({"seed": seed, **run_c2r(directory, settings, seed, args.set)})
            if not args.no_saelens:
                saelens = run_saelens(directory, settings, seed, args.threads, args.saelens_set)
                runs["saelens"].append({"seed": seed, **saelens})
            for trainer in trainers:
                print(f"{dataset} seed {seed} {trainer:8s} " + json.dumps(runs[trainer][-1]), flush=True)
        summary = {trainer: {m: mean_sd([r[m] for r in trainer_runs]) for m in METRICS if m in trainer_runs[0]}
                   for trainer, trainer_runs in runs.items()}
        datasets[dataset] = {"settings": settings, "runs": runs, "summary": summary}

    lines = ["| dataset | trainer | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for dataset, result in datasets.items():
        for trainer, stats in result["summary"].items():
            lines.append(f"| {dataset} | {trainer} | " + " | ".join(fmt(stats.get(m)) for m in METRICS) + " |")
    table = "\n".join(lines)
    print("\n" + table)

    report = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "batchtopk_parity"}
    report.setdefault("runs", {})[args.label] = {
        "commit": git_commit(), "c2r_overrides": args.set, "saelens_overrides": args.saelens_set,
        "seeds": args.seeds, "datasets": datasets,
        "table_markdown": table, "hierarchy_data": HIERARCHY, "lr_schedule": "constant, both trainers",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "wall_time_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({args.label}) in {report['runs'][args.label]['wall_time_s']} s")


if __name__ == "__main__":
    main()
