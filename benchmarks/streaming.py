"""Streaming throughput against the bare forward pass, on the same model, hook, contexts, batch size and device.

The bare forward pass is the bridge's ``run_with_cache`` on each batch of contexts, stopped after the hooked block:
what a stream cannot avoid. The stream (:class:`c2r.data.stream.ActivationStream`) adds tokenising and packing the
text, the keep mask (special tokens, outliers), the shuffle window and serving blocks; its windows are filled by a
background thread while blocks are served, as in training (here nothing trains, so this is the stream's own
ceiling). The model is loaded once beforehand (not timed); the bare pass runs just before and just after the stream
(their mean is reported). Goal: streaming ≥ 90% of the bare forward pass.

    python benchmarks/streaming.py                          # data=smollm2 (block 5 on python-docs), 131072 rows
    python benchmarks/streaming.py --device cuda --rows 1048576 data=gpt2 data.source.batch_size=64

Prints a table and writes benchmarks/results/streaming_<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from c2r.data.harvest import HarvestedShards
from c2r.data.lm import hook_activations, load_model
from c2r.data.stream import ActivationStream

from harvest import source_settings

RESULTS = Path(__file__).parent / "results"


def bare_forward(recipe: HarvestedShards, lm, contexts: list, synchronize) -> float:
    """Seconds for the forward passes alone over ``contexts``, in the stream's batches, activations left on the
    device (where the stream keeps them)."""
    started = time.perf_counter()
    for start in range(0, len(contexts), recipe.batch_size):
        hook_activations(lm, torch.from_numpy(np.stack(contexts[start : start + recipe.batch_size])), recipe.hook)
    synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=131_072, help="rows to stream (whole windows)")
    parser.add_argument("--buffer-rows", type=int, default=65_536, help="rows per shuffle window")
    parser.add_argument("--block-rows", type=int, default=2048, help="rows per served block (the batch)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("overrides", nargs="*", help="config overrides as for python -m c2r.harvest")
    args = parser.parse_args()
    settings = source_settings([f"data.source.device={args.device}", *args.overrides])
    recipe = instantiate({"_target_": "c2r.data.HarvestedShards", **settings})
    lm = load_model(recipe.model, device=args.device, dtype=recipe.model_dtype, revision=recipe.model_revision,
                    cache_dir=recipe.cache_dir)
    stream = ActivationStream(recipe, lm, skip_contexts=0, buffer_rows=args.buffer_rows, block_rows=args.block_rows,
                              scale=1.0, seed=0)
    contexts = list(itertools.islice(stream.training_contexts(), int(1.06 * args.rows / (recipe.context_length - 1))))
    synchronize = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    bare_forward(recipe, lm, contexts[: 4 * recipe.batch_size], synchronize)  # warm-up (allocator, caches): untimed
    bare_before = bare_forward(recipe, lm, contexts, synchronize)

    blocks = args.rows // args.block_rows
    served = stream.blocks()
    started = time.perf_counter()
    for block in itertools.islice(served, blocks):
        block.sum().item()  # the consumer touches every block
    synchronize()
    stream_s = time.perf_counter() - started
    forwarded_batches = stream.window_starts[stream.window_of(blocks)].batch  # batches behind the served windows
    served.close()
    bare_after = bare_forward(recipe, lm, contexts, synchronize)
    bare_rate = len(contexts) * recipe.context_length / ((bare_before + bare_after) / 2)
    forwarded = forwarded_batches * recipe.batch_size * recipe.context_length
    stream_rate = forwarded / stream_s

    result = {
        "model": recipe.model, "hook": recipe.hook, "device": args.device,
        "batch": [recipe.batch_size, recipe.context_length], "buffer_rows": args.buffer_rows,
        "block_rows": args.block_rows, "rows_served": blocks * args.block_rows, "tokens_forwarded": forwarded,
        "bare_forward_tokens_per_s": round(bare_rate, 1),
        "bare_forward_before_after_tokens_per_s": [
            round(len(contexts) * recipe.context_length / t, 1) for t in (bare_before, bare_after)
        ],
        "stream_tokens_per_s": round(stream_rate, 1),
        "stream_rows_per_s": round(blocks * args.block_rows / stream_s, 1),
        "stream_vs_bare": round(stream_rate / bare_rate, 3),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
                   + (f", {torch.cuda.get_device_name()}" if torch.device(args.device).type == "cuda" else ""),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"{recipe.model} {recipe.hook} on {args.device}, batch {recipe.batch_size}x{recipe.context_length}, "
          f"windows of {args.buffer_rows} rows\n"
          f"  {'':<14}{'tokens/s':>12}{'rows/s':>12}{'vs bare':>9}\n"
          f"  {'bare forward':<14}{bare_rate:>12.1f}{'':>12}{'100.0%':>9}\n"
          f"  {'stream':<14}{stream_rate:>12.1f}{result['stream_rows_per_s']:>12.1f}"
          f"{100 * result['stream_vs_bare']:>8.1f}%")
    before, after = result["bare_forward_before_after_tokens_per_s"]
    result["load_changed"] = abs(before - after) > 0.1 * max(before, after)
    if result["load_changed"]:
        print(f"  the bare pass ran at {before:.0f} tokens/s before and {after:.0f} after the stream: the machine's "
              "load changed during the run, so the ratio is not comparable; rerun on a quieter machine")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"streaming_{torch.device(args.device).type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
