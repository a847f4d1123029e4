"""How the demo times designs: measured blocks/s in turns (medians, ratios per round) and latency models.

Every design runs in batches over the whole split; each round times every (design, batch size) once, in
turn, so a burst of load from elsewhere meets them all alike. A design's seconds per block at a batch size
is the median of its rounds; it is reported at its fastest batch size; its ratio to the flat model is the
median over rounds of (flat's time in that round) / (its time in that round), each at its reported batch
size, never one draw.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..cascade import measure_latencies

__all__ = ["BATCH_SIZES", "RUN_BATCH", "latency_models", "timed_batch_sizes", "timed_in_turns"]

# batch sizes each design is timed at (its fastest is reported): on one CPU core the flat model runs 2.2x
# faster in 512-row batches than in one 2,760-row batch (its 16x16 feature maps then stay in cache)
BATCH_SIZES = (128, 512, 2048)
# the batch size the cascades are tuned for (tune_cascade's run_batch_size) and --quick times at
RUN_BATCH = 512
# row counts the latency models time each part at: up to the largest batch size timed
LATENCY_SIZES = (1, 16, 64, 128, 256, 512, 1024, 2048)


def timed_batch_sizes(quick: bool) -> tuple[int, ...]:
    """The batch sizes the demo times designs at: BATCH_SIZES, or RUN_BATCH alone with --quick."""
    return (RUN_BATCH,) if quick else BATCH_SIZES


@torch.no_grad()
def timed_in_turns(fns: dict, x: torch.Tensor, device: torch.device, rounds: int, batch_sizes=BATCH_SIZES,
                   reference=None) -> dict:
    """{name: {"blocks_per_s", "batch_size", "seconds_per_block", "ratio"}} of each fn over all of x in batches.

    One warm-up pass per (fn, size), then `rounds` rounds timing every (fn, size) in turn. seconds_per_block:
    the median over rounds at the fn's fastest size (batch_size; sizes above len(x) become len(x); an int:
    that one); ratio: with `reference` (a key of fns), the median over rounds of reference's time / the fn's,
    each at its own fastest size (None without a reference)."""
    n = x.shape[0]
    sizes = sorted({min(b, n) for b in ((batch_sizes,) if isinstance(batch_sizes, int) else batch_sizes)})
    chunks = {b: [x[i:i + b] for i in range(0, n, b)] for b in sizes}

    def once(fn, b) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for c in chunks[b]:
            fn(c)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    times = {(k, b): [] for k in fns for b in sizes}
    for k, b in times:
        once(fns[k], b)
    for _ in range(max(1, rounds)):
        for k, b in times:
            times[k, b].append(once(fns[k], b))
    best = {k: min(sizes, key=lambda b, k=k: statistics.median(times[k, b])) for k in fns}
    out = {}
    for k, b in best.items():
        ts = times[k, b]
        ratio = None
        if reference is not None:
            ref = times[reference, best[reference]]
            ratio = statistics.median(r / t for r, t in zip(ref, ts))
        out[k] = {"blocks_per_s": n / statistics.median(ts), "batch_size": b,
                  "seconds_per_block": statistics.median(ts) / n, "ratio": ratio}
    return out


def latency_models(models: dict, example: torch.Tensor, quick: bool) -> dict:
    """{name: fastcascade.LatencyModel} of each design (a cascade or the flat model), measured together in this
    process (fastcascade.measure_latencies: every design's parts in the same rounds, so that the load of the
    moment meets the flat model and the cascades alike) on `example` rows, up to the largest batch size the demo
    times at."""
    top = max(timed_batch_sizes(quick))
    sizes = [s for s in LATENCY_SIZES if s <= top]
    return measure_latencies(models, example, batch_sizes=sizes, repeats=5 if quick else 15)
