"""Benchmark helpers: device, copy bandwidth, synchronised timing, peak extra memory."""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # never timed: the interpreter is only for tests

from fastcascade.selftest import timing  # after TRITON_INTERPRET: this imports fastcascade

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# FASTCASCADE_BENCH_THREADS=n: every benchmark runs with n intra-op threads (torch.set_num_threads), so
# a CPU table can be taken at 1 and at 2 threads without OMP_NUM_THREADS reaching the build or the compiler.
_threads = os.environ.get("FASTCASCADE_BENCH_THREADS", "")
if _threads:
    if not _threads.isdigit() or int(_threads) < 1:
        raise ValueError(f"FASTCASCADE_BENCH_THREADS must be a positive integer, got {_threads!r}")
    torch.set_num_threads(int(_threads))


def headline(value):
    """A parameter of one of the headline cases (marker `headline`): the benchmarks scripts/gpu_check.sh
    runs in its short GPU slot (pytest bench -m headline)."""
    return pytest.param(value, marks=pytest.mark.headline)


def fused_backends() -> list[str]:
    """The fastcascade backends to time on DEVICE: the C++ kernels on the CPU (Triton there is only its
    interpreter); on a GPU the CUDA C++ kernels when compiled and Triton when installed."""
    if DEVICE == "cpu":
        return ["cpu"]
    from fastcascade import _ops

    return (["cuda"] if _ops.CUDA_COMPILED else []) + (["triton"] if _ops.HAS_TRITON else [])


def module_backends() -> dict[str, str]:
    """Implementations of a module benchmark by name: the eager module (its reference backend),
    torch.compile of it, each fastcascade backend, and "auto" (what a user gets by default)."""
    impls = {"module-eager": "torch", "module-compile": "compile"}
    impls.update({f"fastcascade-{b}": b for b in fused_backends()})
    impls["fastcascade-auto"] = "auto"
    return impls


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    return timing.copy_bandwidth(DEVICE, (1 << 28) if DEVICE == "cuda" else (1 << 24))


def median_seconds(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median seconds of fn() on DEVICE (CUDA events on a GPU, the wall clock on the CPU)."""
    return timing.median_seconds(fn, reps, warmup, DEVICE)


def peak_extra_bytes(fn) -> int:
    """Peak device memory allocated by fn() beyond what was allocated before it (GPU only; -1 on CPU)."""
    if DEVICE != "cuda":
        return -1
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def record(benchmark, fn, bytes_moved: int):
    """Time fn with pytest-benchmark (synchronised) and attach GB/s, fraction of copy bandwidth, memory."""
    seconds = median_seconds(fn, reps=20 if DEVICE == "cpu" else 100)
    bw = copy_bandwidth()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        median_ms=seconds * 1e3,
        bytes=bytes_moved,
        gbps=bytes_moved / seconds / 1e9,
        copy_bw_gbps=bw / 1e9,
        frac_copy_bw=bytes_moved / seconds / bw,
        peak_extra_mb=peak_extra_bytes(fn) / 2**20,
    )

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, rounds=10 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=2)
