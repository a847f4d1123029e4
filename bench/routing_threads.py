"""Routing split on the CPU at 1 and 2 threads: mask-eager against fastcascade, timed in turns.

    python -P bench/routing_threads.py [--threads 1 2] [--rows 16384 65536] [--repeats 31]

The implementations are bench/test_bench_routing.py's own (three `x[branch == b]` against partition +
gather_rows + views of the sorted rows), on its inputs (N rows x 512 fp16, 3 branches). On a shared
machine one implementation timed after the other can land in a quiet and a busy minute: here each
repeat calls every implementation once, in an order rotated from repeat to repeat, and the table gives
each one's median over the repeats (and the 25th-75th percentiles) for every rows x threads case,
plus fastcascade / mask, the ratio of the medians. Exits with status 1 when fastcascade's median is
slower than mask-eager's in any case (--check).
"""

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # python -P leaves the script's folder out

from test_bench_routing import BRANCHES, D, _fc_sorted, _mask_split, _views  # noqa: E402

IMPLS = {
    "mask-eager": _mask_split,
    "fastcascade-cpu": lambda x, br: _views(*_fc_sorted(x, br, "cpu")),
}


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def measure(n: int, threads: int, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=gen).to(torch.float16)
    branch = torch.randint(0, BRANCHES, (n,), generator=gen, dtype=torch.int32)
    want = _mask_split(x, branch)
    for name, fn in IMPLS.items():
        got = fn(x, branch)
        if not all(torch.equal(a, b) for a, b in zip(got, want)):
            raise AssertionError(f"{name} split {n} rows differently from boolean masks")
        for _ in range(warmup):
            fn(x, branch)
    names = list(IMPLS)
    times = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            IMPLS[name](x, branch)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1 << 14, 1 << 16])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--check", action="store_true", help="exit 1 if fastcascade is slower than masks anywhere")
    args = ap.parse_args()
    if args.repeats < 3 or min(args.threads) < 1 or min(args.rows) < 1:
        ap.error("--repeats must be >= 3, --threads and --rows >= 1")
    print(f"CPU, torch {torch.__version__}, {args.repeats} repeats in turns, median ms (25th-75th percentile)\n")
    print("| rows x 512 fp16 | threads | mask-eager | fastcascade-cpu | fastcascade / mask |")
    print("|---:|---:|---:|---:|---:|")
    slower = []
    for n in args.rows:
        for t in args.threads:
            times = measure(n, t, args.repeats)
            cells, med = [], {}
            for name in IMPLS:
                lo, mid, hi = (1e3 * v for v in quartiles(times[name]))
                med[name] = mid
                cells.append(f"{mid:.2f} ({lo:.2f}-{hi:.2f})")
            ratio = med["fastcascade-cpu"] / med["mask-eager"]
            if ratio > 1:
                slower.append((n, t))
            print(f"| {n:,} | {t} | {' | '.join(cells)} | {ratio:.2f} |", flush=True)
    if args.check and slower:
        print(f"\nfastcascade slower than mask-eager at (rows, threads) {slower}")
        sys.exit(1)


if __name__ == "__main__":
    main()
