"""What a cascade's row buckets (fastcascade.Cascade(row_buckets=...)) buy on the CPU: time per block and peak
memory of a stream of batches through one cascade, with its nodes run on exact row counts (0) and on padded ones.

The cascade is bench/latency_check.py's raw-block gate in front of the demo's small CNN (random weights, batch
norm folded), its threshold set so that a chosen fraction of random blocks exits at the gate, so the flat
model behind it receives a different row count in nearly every batch. Each setting runs in a fresh process
(oneDNN's primitive cache and the allocator are per process): three passes over `--batches` batches, the
first meeting every row count for the first time.

    python bench/row_buckets_check.py [--batch 512] [--batches 100] [--exit 0.6] [--buckets 0,8]
    python bench/row_buckets_check.py --memory 600 [--channels 16,32]   # what 600 row counts of one convolution hold
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _one(batch: int, batches: int, exit_fraction: float, buckets: int) -> dict:
    import torch

    sys.path.insert(0, HERE)
    from latency_check import _at_fraction, designs

    import fastcascade as fc

    torch.set_num_threads(1)
    fc.steady_allocator()
    _, cascades = designs(torch.device("cpu"))
    torch.manual_seed(1)
    x = torch.rand(batch * batches, 1, 16, 16) ** 2
    c = _at_fraction(cascades["raw-gate"], x, exit_fraction)
    c.row_buckets = buckets
    chunks = x.split(batch)
    passes = []
    with torch.no_grad():
        c.predict(chunks[0])
        for _ in range(3):
            t = time.perf_counter()
            for ch in chunks:
                c.predict(ch)
            passes.append((time.perf_counter() - t) / x.shape[0])
    return {"buckets": buckets, "us_per_block": [p * 1e6 for p in passes],
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__}


def _memory(counts: int, cin: int, cout: int) -> dict:
    """Peak RSS growth of one convolution (cin -> cout channels, 3x3, 16x16 maps) called on `counts` row counts
    (2, 3, ...), each once: what oneDNN's cached primitives hold; and the median time of a call on 50-89 rows,
    on a new row count and on one seen before."""
    import torch
    from torch import nn

    import fastcascade as fc

    torch.set_num_threads(1)
    fc.steady_allocator()
    conv = nn.Conv2d(cin, cout, 3, 1, 1).eval()
    x = torch.rand(counts + 2, cin, 16, 16)

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def ms(k):
        t = time.perf_counter()
        conv(x[:k])
        return (time.perf_counter() - t) * 1e3

    with torch.no_grad():
        conv(x)  # the largest call first: the allocator's high-water mark is set before counting
        conv(x[:1])
        before = rss()
        new = [ms(k) for k in range(2, counts + 2)]
        grown = rss() - before
        seen = [ms(k) for k in range(2, counts + 2)]
    probe = slice(48, 88)  # 50 to 89 rows: where the build shows beside the convolution itself
    return {"counts": counts, "conv": f"{cin}->{cout}", "rss_growth_mib": grown, "torch": torch.__version__,
            "new_ms": statistics.median(new[probe]), "seen_ms": statistics.median(seen[probe]),
            "onednn_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default (1024)")}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--exit", type=float, default=0.6, help="fraction of the blocks the gate sends out")
    ap.add_argument("--buckets", default="0,8", help="row_buckets settings, each in its own process")
    ap.add_argument("--memory", type=int, default=None, metavar="COUNTS",
                    help="instead: the peak memory one convolution's cached primitives hold after COUNTS row counts")
    ap.add_argument("--channels", default="16,32", help="with --memory: the convolution's in,out channels")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process's setting
    args = ap.parse_args(argv)
    if args.memory is not None:
        r = _memory(args.memory, *(int(c) for c in args.channels.split(",")))
        print(f"one {r['conv']}-channel 3x3 convolution on 16x16 maps, {r['counts']} row counts (2..{r['counts'] + 1}): "
              f"peak RSS +{r['rss_growth_mib']:.0f} MiB; a call on 50-89 rows (median) {r['new_ms']:.2f} ms on a "
              f"new row count, {r['seen_ms']:.2f} ms on one seen before; ONEDNN_PRIMITIVE_CACHE_CAPACITY "
              f"{r['onednn_cache']}; torch {r['torch']}")
        return [r]
    if args.one is not None:
        print(json.dumps(_one(args.batch, args.batches, args.exit, args.one)))
        return []
    rows = []
    for b in (int(v) for v in args.buckets.split(",")):
        out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--batches", str(args.batches),
                              "--exit", str(args.exit), "--one", str(b)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"batch {args.batch}, {args.batches} batches, {args.exit:.0%} of the blocks out at the gate, one thread, "
          f"torch {rows[0]['torch']}")
    print(f"{'row_buckets':>11} {'pass 1 us/block':>16} {'pass 2':>8} {'pass 3':>8} {'peak RSS MiB':>13}")
    for r in rows:
        a, b, c = r["us_per_block"]
        print(f"{r['buckets']:>11} {a:16.2f} {b:8.2f} {c:8.2f} {r['max_rss_mib']:13.0f}")
    return rows


if __name__ == "__main__":
    main()
