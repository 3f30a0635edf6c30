"""Which C²R candidate lists go stale first: the renewal's premise (docs/design.md §1), measured on SmolLM2.

A TopK SAE trains on the SmolLM2 default's rows with C²R on every step, while the candidate lists made at step 0 are
never renewed (no probe, no refresh). Every ``--every`` steps the exact search says which latents' chosen pair is
wrong, and the table gives the share of those wrong latents held by the q smallest *leads* (a list's best listed
cosine now minus its floor, the best left-out cosine when it was made), next to a random q of the latents.

    python benchmarks/c2r_leads.py      # 4,096 latents, k=64, batch 2048, coef 0.03, lr warm-up to 1e-3 over 100 steps

Prints a table and writes benchmarks/results/c2r_leads.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from c2r.geometry import best_candidates, nearest_neighbors_exact, unit_and_norms
from c2r.module import SAEModule
from c2r.regularizers import C2R
from c2r.sae import TopKSAE
from c2r.step import adam, train_step

sys.path.insert(0, str(Path(__file__).parent))
from parity_common import SMOLLM2, load_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHARES = (0.05, 0.1, 0.2)


def held_by(wrong: torch.Tensor, order: torch.Tensor, share: float) -> float | None:
    """The share of the ``wrong`` latents among the first ``share`` of ``order`` (None while none is wrong)."""
    chosen = torch.zeros_like(wrong)
    chosen[order[: int(share * wrong.shape[0])]] = True
    return float((wrong & chosen).sum() / wrong.sum()) if wrong.any() else None


def cell(value: float | None, width: int) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dict-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "c2r")
    parser.add_argument("--out", type=Path, default=RESULTS / "c2r_leads.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = load_rows(args.cache_dir / SMOLLM2, "train")
    sae = TopKSAE(x.shape[1], args.dict_size, k=args.k, seed=0)
    sae.init_decoder_bias(x[:8192])
    c2r = C2R(coef=0.03, interval=1, probe_latents=0, refresh_every=10**9)
    optimizer = adam(sae, 1e-3)
    # Training's schedule (c2r.module), warm-up only: the lists age under the learning rates a run starts with.
    schedule = SAEModule(sae, {"c2r": c2r}, lr=1e-3, warmup_steps=100, decay_fraction=0.0, total_steps=args.steps + 1)
    learning_rate = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    order, coin = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    rows = []
    print(f"{'step':>5} {'wrong':>7} " + " ".join(f"{'leads ' + str(q):>10} {'random ' + str(q):>11}" for q in SHARES))
    for step in range(args.steps + 1):
        train_step(sae, {"c2r": c2r}, optimizer, x[torch.randint(len(x), (2048,), generator=order)], step)
        learning_rate.step()
        if step == 0 or step % args.every:
            continue
        unit = unit_and_norms(sae.W_dec.detach())
        best = best_candidates(unit, c2r.candidate_lists)
        wrong = best.neighbors != nearest_neighbors_exact(unit)
        by_lead = (best.cosines - c2r.candidate_floors).argsort()
        at_random = torch.randperm(wrong.shape[0], generator=coin)
        row = {"step": step, "wrong_share": float(wrong.float().mean()),
               **{f"leads_{q}": held_by(wrong, by_lead, q) for q in SHARES},
               **{f"random_{q}": held_by(wrong, at_random, q) for q in SHARES}}
        rows.append(row)
        print(f"{step:>5} {row['wrong_share']:>7.4f} "
              + " ".join(f"{cell(row[f'leads_{q}'], 10)} {cell(row[f'random_{q}'], 11)}" for q in SHARES), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"dict_size": args.dict_size, "k": args.k, "batch": 2048, "coef": 0.03, "lr": 1e-3, "warmup_steps": 100}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
