"""What C²R costs per training step, for each neighbour search, relative to the same SAE without it.

A step is what training does: forward, every loss term (MSE, AuxK, C²R), backward, the decoder-gradient
projection, Adam, decoder renormalisation. C²R is applied on every step (interval=1) so each timed step pays
for it. For ``candidates`` (the default) each timed step pays for re-ranking the lists, every ``probe_every``-th
one for the probe too (and for a renewal when the probe asks for one), so steps are averaged, never the median;
a full refresh of the lists is timed separately and amortised over ``refresh_every`` steps (mean step without a
refresh + refresh / refresh_every), and the refreshes the probe asked for during the timed steps are counted.
``fixed`` keeps the first step's pairs and never searches again: what the loss itself costs, the floor under
every search.

    python benchmarks/c2r_overhead.py                       # CPU, F ∈ {4096, 16384, 65536}, d=576, B=2048, k=64
    python benchmarks/c2r_overhead.py --device cuda --d 2304 --sizes 65536   # GPU (bf16 autocast)

Prints a table and updates benchmarks/results/c2r_overhead_<device>.json (each row names its configuration; a new
row replaces the stored one of the same mode, size, device and shape).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from c2r.regularizers import C2R
from c2r.sae import TopKSAE
from c2r.step import adam, train_step

MODES = ("none", "chunked", "exact", "candidates", "fixed")
RESULTS = Path(__file__).parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(mode: str, d: int, dict_size: int, k: int, refresh_every: int, device: torch.device):
    sae = TopKSAE(d, dict_size, k=k, seed=0).to(device)
    search = {"neighbor_search": mode, "refresh_every": refresh_every} if mode != "fixed" else {
        "neighbor_search": "candidates", "candidates": 1, "probe_latents": 0, "refresh_every": 10**9
    }
    regularizers = {} if mode == "none" else {"c2r": C2R(coef=1.0, interval=1, **search).to(device)}
    return sae, regularizers, adam(sae, lr=1e-4)


def time_step(built: tuple, x: torch.Tensor, step: int, autocast, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    train_step(*built, x, step, autocast)
    synchronize(device)
    return time.perf_counter() - started


def time_modes(args: argparse.Namespace, dict_size: int, device: torch.device) -> list[dict]:
    """Mean step time of every mode at one dictionary size. The modes take turns step by step, so a change
    in background load (a shared machine) hits them all alike instead of biasing the ratios."""
    built = {mode: build(mode, args.d, dict_size, args.k, args.refresh_every, device) for mode in args.modes}
    x = torch.randn(args.batch, args.d, device=device) / args.d**0.5
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    times: dict[str, list[float]] = {mode: [] for mode in args.modes}
    refreshed: dict[str, list[bool]] = {mode: [] for mode in args.modes}
    for step in range(args.steps + 1):  # step 0 is warm-up (allocations; for "candidates" also its first refresh)
        for mode, parts in built.items():
            before = refreshes(parts)
            times[mode].append(time_step(parts, x, step, autocast, device))
            refreshed[mode].append(refreshes(parts) > before)
    results = []
    for mode, (sae, regularizers, _) in built.items():
        timed = list(zip(times[mode][1:], refreshed[mode][1:]))
        result = {"mode": mode, "dict_size": dict_size, "step_times_s": [t for t, _ in timed],
                  "all_steps_mean_s": statistics.fmean(t for t, _ in timed)}
        if mode == "candidates":
            # The probe rebuilds the lists when it finds them stale, as often as the training dynamics need (a
            # random decoder's neighbourhoods are flat and flip at every step; a trained one's rarely): time a
            # step without a rebuild and the rebuild itself, and amortise it over --refresh-every steps.
            plain = [t for t, rebuilt in timed if not rebuilt]
            synchronize(device)
            started = time.perf_counter()
            regularizers["c2r"].refresh(sae.W_dec, 0)
            synchronize(device)
            result["refresh_s"] = time.perf_counter() - started
            result["refreshed_steps"] = sum(rebuilt for _, rebuilt in timed)
            result["step_s"] = statistics.fmean(plain) if plain else None
            result["renewals"] = regularizers["c2r"].renewals
            result["amortised_step_s"] = (
                result["step_s"] + result["refresh_s"] / args.refresh_every if plain else result["all_steps_mean_s"]
            )
        else:
            result["step_s"] = result["amortised_step_s"] = result["all_steps_mean_s"]
        results.append(result)
    return results


def refreshes(parts) -> int:
    """How many times the run's candidate lists have been rebuilt (0 for the other modes)."""
    regularizer = parts[1].get("c2r")
    return getattr(regularizer, "refreshes", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--refresh-every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    print(f"{'F':>7} {'search':>10} {'mean s/step':>12} {'amortised':>10} {'× none':>7} {'rebuilt steps':>13} {'renewals':>8}", flush=True)
    for dict_size in args.sizes:
        results = time_modes(args, dict_size, device)
        baseline = next((r["amortised_step_s"] for r in results if r["mode"] == "none"), None)
        for result in results:
            result["ratio_to_none"] = result["amortised_step_s"] / baseline if baseline else None
            result.update(device=device.type, d=args.d, batch=args.batch, k=args.k, refresh_every=args.refresh_every)
            rows.append(result)
            ratio = f"{result['ratio_to_none']:.2f}" if baseline else "-"
            step = f"{result['step_s']:.3f}" if result["step_s"] is not None else "-"
            print(
                f"{dict_size:>7} {result['mode']:>10} {step:>12} {result['amortised_step_s']:>10.3f} {ratio:>7} "
                f"{result.get('refreshed_steps', ''):>13} {result.get('renewals', ''):>8}",
                flush=True,
            )

    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out = args.out or RESULTS / f"c2r_overhead_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows accumulate across runs of subsets: a new row replaces the stored one of the same configuration.
    key = lambda row: tuple(row.get(name) for name in ("mode", "dict_size", "device", "d", "batch", "k"))  # noqa: E731
    stored = json.loads(out.read_text()).get("results", []) if out.exists() else []
    kept = [row for row in stored if key(row) not in {key(new) for new in rows}]
    out.write_text(json.dumps({"machine": machine, "results": kept + rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
