"""The loop every step-speed worker runs (``step_speed.py`` starts one process per configuration): time the
steps the parent asks for and reply with their durations and peak memory, so that the parent can let the
workers take turns. Only torch and the standard library: the SAELens worker runs it from SAELens's own venv."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Mapping

import torch


def rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def serve(step: Callable[[], None], device: torch.device, info: Callable[[], Mapping] = dict) -> None:
    """Per line ``n`` on stdin: run ``n`` timed steps, print ``{"times": [...], "peak_bytes": ..., **info()}``.
    Peak memory is CUDA's peak allocation, or on CPU the peak resident memory above what the process held before
    its first step (the model and optimiser built, nothing else)."""
    baseline = rss_bytes()
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        print(json.dumps({"times": times, "peak_bytes": peak, **info()}), flush=True)
