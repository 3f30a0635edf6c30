"""The whole training step of c2r against SAELens's own, on the same shapes, threads and device, in one run.

A c2r step is what training does (``c2r.step``): forward, every loss term (MSE, AuxK, C²R with interval=1 where
enabled), backward, the decoder-gradient projection, Adam, decoder renormalisation. SAELens's is
``SAETrainer._train_step`` (``saelens_step.py``). Each configuration runs in its own worker process
(``step_worker.py``) and the workers take turns, a few steps each, so that background load on a shared machine
hits them all alike; the table shows median tokens/s and peak memory.

SAELens is never a dependency of c2r: its worker runs with the interpreter of a separate venv (``--saelens``,
default /work/venvs/saelens/bin/python; see saelens_step.py for the two pip commands), and is skipped with a
message if that interpreter cannot import sae_lens.

    python benchmarks/step_speed.py                        # CPU, 1 thread, d=576, F=16384, k=64, B=2048
    python benchmarks/step_speed.py --device cuda --d 2304 --dict-size 65536 --k 80 --bf16
    python benchmarks/step_speed.py --end-to-end           # also `python -m c2r.train` tokens/s (TopK, without and
                                                           # with C²R every step; on the SmolLM2 default's rows at d=576)

Writes benchmarks/results/step_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ARCHITECTURES = ("topk", "batchtopk")


def c2r_worker(args: argparse.Namespace) -> None:
    """One c2r configuration as a ``step_worker`` (run in its own process by the parent)."""
    import torch

    from c2r.regularizers import C2R
    from c2r.sae import BatchTopKSAE, TopKSAE
    from c2r.step import adam, train_step

    sys.path.insert(0, str(HERE))
    from step_worker import serve

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cls = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}[args.architecture]
    sae = cls(args.d, args.dict_size, k=args.k, seed=0).to(device)
    regularizers = {"c2r": C2R(coef=1.0, interval=1).to(device)} if args.c2r else {}
    optimizer = adam(sae, lr=1e-4)
    x = torch.randn(args.batch, args.d, device=device) / args.d**0.5
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    steps = iter(range(10**9))
    # How often C²R's probe rebuilt its candidate lists: on random data and a fresh decoder nearly every step,
    # in real training every ~15-60 steps (README, C²R), so the "+ C²R" rows are an upper bound.
    info = (lambda: {"c2r_refreshes": regularizers["c2r"].refreshes}) if args.c2r else dict
    serve(lambda: train_step(sae, regularizers, optimizer, x, next(steps), autocast), device, info)


def shape_args(args: argparse.Namespace) -> list[str]:
    return [f"--d={args.d}", f"--dict-size={args.dict_size}", f"--k={args.k}", f"--batch={args.batch}",
            f"--device={args.device}", f"--threads={args.threads}", *(["--bf16"] if args.bf16 else [])]


def saelens_version(python: str) -> str | None:
    """SAELens's version under ``python``, or None where it cannot be imported."""
    if not Path(python).exists():
        return None
    found = subprocess.run([python, "-c", "import sae_lens; print(sae_lens.__version__)"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def start_workers(args: argparse.Namespace) -> dict[tuple[str, str], subprocess.Popen]:
    """``(trainer, architecture) -> worker``; trainer is c2r, c2r+C²R or SAELens."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    commands = {}
    for architecture in args.architectures:
        base = [f"--architecture={architecture}", *shape_args(args)]
        commands[("c2r", architecture)] = [sys.executable, __file__, "--worker", *base]
        commands[("c2r + C²R", architecture)] = [sys.executable, __file__, "--worker", "--c2r", *base]
        if args.saelens_ok:
            commands[("SAELens", architecture)] = [args.saelens, str(HERE / "saelens_step.py"), *base]
    return {key: subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for key, command in commands.items()}


def take_turns(workers: dict, args: argparse.Namespace, turns: int, times: dict, replies: dict) -> None:
    """Each worker runs ``--steps-per-turn`` timed steps in turn, ``turns`` times; adds to ``times`` and keeps
    each worker's last reply. The first turn of a run is a warm-up (one step, not timed)."""
    first_call = not replies
    for turn in range(turns + first_call):
        warm_up = first_call and turn == 0
        for key, worker in workers.items():
            worker.stdin.write(f"{1 if warm_up else args.steps_per_turn}\n")
            worker.stdin.flush()
            replies[key] = json.loads(worker.stdout.readline())
            if not warm_up:
                times.setdefault(key, []).extend(replies[key]["times"])
        timed_turns = len(next(iter(times.values()), [])) // args.steps_per_turn
        print("warm-up done" if warm_up else f"{timed_turns}/{args.turns} turns done", file=sys.stderr, flush=True)


def summarise(times: dict, replies: dict, batch: int) -> dict[tuple[str, str], dict]:
    results = {}
    for key, step_times in times.items():
        median = statistics.median(step_times)
        extra = {name: value for name, value in replies[key].items() if name != "times"}  # peak memory, ...
        results[key] = {"median_step_s": median, "step_times_s": step_times, "tokens_per_second": batch / median,
                        **extra}
    return results


class EndToEnd(NamedTuple):
    """One timed ``python -m c2r.train`` run: with C²R every step or not, its steps, and its warm-up (None: the
    default schedule, warm-up then constant then decay)."""

    c2r: bool
    steps: int
    warmup_steps: int | None


END_TO_END = {
    "topk": EndToEnd(c2r=False, steps=30, warmup_steps=1),
    # C²R's lists age fastest at a high learning rate on a fresh decoder: lr 1e-3 from step 1 is its worst case.
    "topk + C²R, lr 1e-3 from step 1": EndToEnd(c2r=True, steps=110, warmup_steps=1),
    # The default run (train_tokens at batch 2048): warm-up over 100 steps, constant, decay over the last 20%.
    "topk + C²R, default schedule": EndToEnd(c2r=True, steps=256, warmup_steps=None),
}
"""The timed runs. With C²R they run past a forced refresh of the candidate lists (every 100 steps), so the rate
pays for it as training does; the plain rate does not depend on the learning rate."""


def end_to_end(args: argparse.Namespace, run: EndToEnd) -> float:
    """``python -m c2r.train`` (TopK, CSV logger, no evaluation): tokens/s over every logging interval but the
    first (start-up, and C²R's first refresh), as the harmonic mean of the logged ``details/tokens_per_second``
    (the intervals hold equal token counts, so this is total tokens / total time). At d=576 it trains on the
    SmolLM2 default's activations (harvested on first use, ~3.5 min), so C²R's lists age as in real training;
    other widths on synthetic rows generated for the run."""
    steps = run.steps
    with tempfile.TemporaryDirectory() as run_dir:
        data = ["data=smollm2"] if args.d == 576 else [
            "data=synthetic", f"data.d_in={args.d}", f"data.source.rows={(steps + 8) * args.batch}",
            f"data.source.rows_per_shard={4 * args.batch}", f"cache_dir={run_dir}/cache",
        ]
        command = [
            sys.executable, "-m", "c2r.train", *data, "logger=csv", "evaluation=none",
            f"hardware={'cpu' if args.device == 'cpu' else 'gpu'}", f"dict_size={args.dict_size}",
            f"model.k={args.k}", f"batch_size={args.batch}", f"train_tokens={steps * args.batch}",
            "trainer.val_check_interval=1000000", "trainer.limit_val_batches=1",
            *([] if run.warmup_steps is None else [f"optim.warmup_steps={run.warmup_steps}"]),
            f"hydra.run.dir={run_dir}",
            *(["regularizer=c2r", "regularizer.interval=1", "regularizer.coef=0.03"] if run.c2r else []),
            *([] if args.bf16 or args.device == "cpu" else ["hardware.precision=32-true"]),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
        subprocess.run(command, check=True, env=env, cwd=HERE.parent)
        rates = []
        for metrics in Path(run_dir).rglob("metrics.csv"):
            with metrics.open() as rows:
                rates += [float(row["details/tokens_per_second"]) for row in csv.DictReader(rows)
                          if row.get("details/tokens_per_second")]
        return statistics.harmonic_mean(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--architecture", choices=ARCHITECTURES, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (both trainers)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--steps-per-turn", type=int, default=2)
    parser.add_argument("--end-to-end", action="store_true", help="also time python -m c2r.train")
    parser.add_argument("--saelens", default="/work/venvs/saelens/bin/python", help="SAELens's interpreter")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--c2r", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return c2r_worker(args)

    args.saelens_version = saelens_version(args.saelens)
    args.saelens_ok = args.saelens_version is not None
    if not args.saelens_ok:
        print(f"SAELens skipped: {args.saelens} cannot import sae_lens (see saelens_step.py to install it)")
    workers = start_workers(args)
    times, replies = {}, {}
    # With --end-to-end the training run sits between two halves of the turns, so that it meets the same load.
    first = (args.turns + 1) // 2 if args.end_to_end else args.turns
    take_turns(workers, args, first, times, replies)
    e2e = {name: end_to_end(args, run) for name, run in END_TO_END.items()} if args.end_to_end else None
    take_turns(workers, args, args.turns - first, times, replies)
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    results = summarise(times, replies, args.batch)

    rows = []
    print(f"{'arch':>10} {'trainer':>10} {'ms/step':>9} {'tokens/s':>9} {'× SAELens':>9} {'peak MiB':>9}")
    for (trainer, architecture), result in results.items():
        saelens = results.get(("SAELens", architecture))
        ratio = result["tokens_per_second"] / saelens["tokens_per_second"] if saelens else None
        rows.append({"trainer": trainer, "architecture": architecture, **result, "ratio_to_saelens": ratio})
        print(f"{architecture:>10} {trainer:>10} {1000 * result['median_step_s']:>9.1f} "
              f"{result['tokens_per_second']:>9.0f} {ratio or float('nan'):>9.2f} {result['peak_bytes'] / 2**20:>9.0f}")
    if e2e is not None:
        saelens = results.get(("SAELens", "topk"))
        for name, rate in e2e.items():
            bare = results.get(("c2r + C²R" if END_TO_END[name].c2r else "c2r", "topk"))
            print(f"python -m c2r.train ({name}, {END_TO_END[name].steps} steps): {rate:.0f} tokens/s"
                  + (f", {rate / bare['tokens_per_second']:.2f}× the bare step" if bare else "")
                  + (f", {rate / saelens['tokens_per_second']:.2f}× SAELens's step" if saelens else ""))

    import torch

    machine = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads}
    config = {"d": args.d, "dict_size": args.dict_size, "k": args.k, "batch": args.batch, "bf16": args.bf16,
              "c2r": "interval=1, default (candidates, probe-refreshed)", "saelens": args.saelens_version}
    out = args.out or RESULTS / f"step_speed_{torch.device(args.device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "config": config, "results": rows,
                               "end_to_end_tokens_per_second": e2e}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
