"""The random streams of a run, each derived from the run's seed by name.

A stream seeded with a plain ``manual_seed(seed)`` draws exactly what any other program seeded that way draws: an
SAE whose decoder is initialised like that starts at the answer when another library's data generator drew its
ground-truth directions the same way (seed 0 being everyone's default). So every stream goes through
:func:`stream_generator`: entropy mixed from the run's seed, the stream's name and its indices (shard, epoch,
step), which keeps the streams apart from each other and from any plain draw.

Streams: ``sae.init`` (decoder and tied encoder), ``data.order`` (block order per epoch), ``data.stream`` (the order
within each shuffle window of a streamed run, per rank and window), ``synthetic.features``
and ``synthetic.rows`` (generated data, per shard), ``c2r.chunks`` and ``ortho.chunks`` (random chunks per step),
``c2r.probe`` and ``c2r.renewal_probe`` (the latents C²R probes per step).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 64-bit seed from several integers, so tuples such as ``(seed, shard)`` or ``(seed, epoch)`` give unrelated
    streams; their count is mixed in too (SeedSequence alone gives ``(a, b)`` and ``(a, b, 0)`` the same seed). A
    CPU ``torch.Generator`` uses the low 32 bits."""
    return int(np.random.SeedSequence([len(parts), *(int(p) for p in parts)]).generate_state(1, np.uint64)[0])


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """The seed of the named ``stream`` of a run with ``seed``, at ``indices`` (e.g. the step)."""
    return derived_seed(seed, zlib.crc32(stream.encode("utf-8")), *indices)


def stream_generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU generator for the named ``stream`` at ``indices``: the same draws on every DDP rank and in a resumed
    run."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *indices))
