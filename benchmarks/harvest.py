"""Harvest throughput against the bare forward pass, on the same model, hook, contexts and batch size.

The bare forward pass is what the harvest cannot avoid: the bridge's ``run_with_cache`` on each batch of
contexts, stopped after the hooked block. The harvest adds reading and tokenising the text, packing and
shuffling contexts, dropping special/outlier rows, shuffling rows, hashing and writing shards. The model is
loaded once beforehand (not timed). The bare pass runs over the harvest's own contexts just before and just
after the harvest (their mean is reported, so a neighbour's load that comes and goes hits both sides alike),
and the forward passes inside the harvest are timed too: their share of the harvest's time is the same
comparison under identical conditions. Goal: harvest ≥ 90% of the bare forward pass.

    python benchmarks/harvest.py                       # data=smollm2 (block 5 on python-docs), 131072 rows
    python benchmarks/harvest.py --tokens 262144       # the quickstart's full harvest
    python benchmarks/harvest.py data.source.model=tiny-random-llama data.source.hook=blocks.1.hook_resid_post \\
        data.source.context_start=bos data.source.doc_separator=eos   # any `python -m c2r.harvest` overrides

Prints the rates and writes benchmarks/results/harvest.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import c2r.data.activations as pipeline_module
from c2r.data.harvest import HarvestedShards
from c2r.data.lm import hook_activations

RESULTS = Path(__file__).parent / "results"


def bare_forward(source: HarvestedShards, lm, contexts: list[np.ndarray]) -> float:
    """Seconds for the forward passes alone over ``contexts``, in the harvest's batches."""
    started = time.perf_counter()
    for start in range(0, len(contexts), source.batch_size):
        tokens = torch.from_numpy(np.stack(contexts[start : start + source.batch_size]))
        hook_activations(lm, tokens, source.hook).float().cpu()
    return time.perf_counter() - started


def source_settings(overrides: list[str]) -> dict:
    """``data.source`` of ``python -m c2r.harvest``'s config (the default SmolLM2 data) with ``overrides``."""
    with initialize_config_module("c2r.conf", version_base="1.3"):
        cfg = compose("harvest", overrides=["data.source.progress=false", *overrides])
    settings = OmegaConf.to_container(cfg.data.source, resolve=True)
    return {k: v for k, v in settings.items() if not k.startswith("_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131_072, help="rows to harvest")
    parser.add_argument("overrides", nargs="*", help="config overrides as for python -m c2r.harvest, e.g. "
                        "data.source.model=tiny-random-llama data.source.hook=blocks.1.hook_resid_post")
    args = parser.parse_args()
    settings = source_settings([f"data.source.tokens={args.tokens}", *args.overrides])
    context_length = settings["context_length"]
    loader = HarvestedShards(**settings)
    started = time.perf_counter()
    lm = loader.load_model()
    load_s = time.perf_counter() - started
    expected_contexts = math.ceil(1.06 * args.tokens / (context_length - 1))  # a few rows are dropped
    contexts = list(itertools.islice(loader.contexts(lm), expected_contexts))  # also builds python-docs once
    bare_before = bare_forward(loader, lm, contexts)

    forward_s = [0.0]
    untimed = pipeline_module.hook_activations

    def timed(*a, **k):
        began = time.perf_counter()
        out = untimed(*a, **k)
        forward_s[0] += time.perf_counter() - began
        return out

    pipeline_module.hook_activations = timed
    with tempfile.TemporaryDirectory() as tmp:
        source = HarvestedShards(**settings)
        source.cache_dir = Path(tmp)  # fresh shards; the text and model copies stay in cache_dir
        started = time.perf_counter()
        manifest = source.harvest(model=lm)
        harvest_s = time.perf_counter() - started
        info = manifest.source
    pipeline_module.hook_activations = untimed
    bare_after = bare_forward(loader, lm, contexts)
    forwarded = info["tokens_forwarded"]
    bare_rate = len(contexts) * context_length / ((bare_before + bare_after) / 2)

    result = {
        "model": settings["model"],
        "hook": settings["hook"],
        "batch": [settings["batch_size"], context_length],
        "rows_written": info["rows"],
        "tokens_forwarded": forwarded,
        "dropped": info["dropped"],
        "bare_forward_tokens_per_s": round(bare_rate, 1),
        "bare_forward_before_after_tokens_per_s": [
            round(len(contexts) * context_length / t, 1) for t in (bare_before, bare_after)
        ],
        "harvest_tokens_per_s": round(forwarded / harvest_s, 1),
        "harvest_rows_per_s": round(info["rows"] / harvest_s, 1),
        "harvest_vs_bare": round(forwarded / harvest_s / bare_rate, 3),
        "forward_share_of_harvest_time": round(forward_s[0] / harvest_s, 3),
        "harvest_s": round(harvest_s, 2),
        "model_load_s": round(load_s, 2),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(
        f"{settings['model']} {settings['hook']}, batch {settings['batch_size']}x{context_length}, "
        f"{forwarded} tokens:\n"
        f"  bare forward  {result['bare_forward_tokens_per_s']:>9.1f} tokens/s\n"
        f"  harvest       {result['harvest_tokens_per_s']:>9.1f} tokens/s "
        f"({result['harvest_rows_per_s']:.1f} rows/s written) = {100 * result['harvest_vs_bare']:.1f}% of bare\n"
        f"  forward passes inside the harvest: {100 * result['forward_share_of_harvest_time']:.1f}% of its time"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "harvest.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
