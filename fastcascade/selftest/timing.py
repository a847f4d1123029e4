"""Device timing shared by the self-test and bench/: the median of synchronised calls and the device's
copy bandwidth, both measured in the run that uses them."""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["copy_bandwidth", "median_seconds"]


def median_seconds(fn, reps: int, warmup: int = 3, device: torch.device | str = "cuda") -> float:
    """Median seconds of fn() over reps calls after warmup calls: between two CUDA events on a CUDA
    device (so a launch that returns early is still timed to its end), by the wall clock elsewhere."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth in bytes/s, bytes read plus written, of one nbytes copy (256 MiB default)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), reps=20, device=device)
