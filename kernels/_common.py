"""Host plumbing shared by the Triton ops: op registration and the one path every launch takes.

* ``triton_op(qualname)`` registers a host function as ``torch.library.triton_op(qualname)`` and keeps
  the plain function in ``HOST_FUNCTIONS`` (by op name), so that the host side can run on its own (on
  meta tensors, say) and show which kernels, grids and configurations it launches without launching
  anything: the sm_90 compile test in tests/test_triton_compile.py does exactly that.
* ``launch(kernel, grid, *args, **meta)`` is ``wrap_triton(kernel)[grid](*args, **meta)`` under a
  guard that makes the tensors' CUDA device current: Triton launches on the *current* device and its
  current stream, so without it tensors on ``cuda:1`` while device 0 is current would be read from
  the wrong device (an illegal address, or silently wrong results with peer access).
"""

import contextlib
import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.library import triton_op as _torch_triton_op
from torch.library import wrap_triton

__all__ = ["HOST_FUNCTIONS", "INTERPRETED", "device_guard", "launch", "triton_op"]

# op name (without the namespace) -> the host function registered under it
HOST_FUNCTIONS: dict[str, Callable] = {}

# Kernels run under Triton's interpreter (numpy on CPU tensors): set before triton is imported, as
# triton.jit reads it when the kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_op(qualname: str):
    """Decorator: ``torch.library.triton_op(qualname, mutates_args=())``, the host function kept."""

    def register(fn: Callable):
        HOST_FUNCTIONS[qualname.split("::")[-1]] = fn
        return _torch_triton_op(qualname, mutates_args=())(fn)

    return register


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device (nothing for CPU or meta tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """Launches `kernel` on `grid` on the device of its tensor arguments (an op checks that they
    share one device before it launches)."""
    device = next(a.device for a in args if isinstance(a, Tensor))
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **meta)
