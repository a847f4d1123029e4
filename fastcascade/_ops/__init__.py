"""The op layer: loads fastcascade._C, registers every op family's fake kernels and autograd (for the C++
ops and their Triton twins alike), and decides which backend runs a call.

An op family has one stem everywhere: its schemas in csrc/fastcascade.cpp, its kernels in csrc/<stem>/,
its Triton twins in kernels/<stem>.py (installed as fastcascade.kernels.<stem>, each op ``<name>_triton``
with the C++ op's schema), and here a module ``<stem>.py`` with two tables: FAKES (op name -> fake
kernel) and AUTOGRAD (op name -> factory(op) -> (backward, setup_context), where op(name) is the sibling
op of the same backend), listed in FAMILIES below. A new family touches more than this package: its C++
schema and backends, the CPU launch table, the reference, a case table, the self-test, the public API,
tests and benchmarks. docs/adding-an-op.md lists every file in order, and tests/test_layout.py fails
while one is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .._checks import BACKENDS, check_backend
from . import dice_focal, focal, metrics, pixel_adapter, pooled_adapter, routing
from .common import ADAPTER_ACTIVATION_CODES, NO_IGNORE_INDEX, REDUCTION_CODES, VOTE_MODES, acc_dtype
from .extension import REBUILD, load

__all__ = ["ADAPTER_ACTIVATION_CODES", "BACKENDS", "BUILD_INFO", "CUDA_COMPILED", "FAMILIES", "HAS_TRITON",
           "NO_IGNORE_INDEX", "REDUCTION_CODES", "VOTE_MODES", "acc_dtype", "load_triton_ops", "op",
           "resolve_backend"]

# stem -> registration module; the Triton twins of a family live in fastcascade.kernels.<stem>
FAMILIES = {"focal": focal, "pooled_adapter": pooled_adapter, "pixel_adapter": pixel_adapter,
            "routing": routing, "metrics": metrics, "dice_focal": dice_focal}

_C, BUILD_INFO = load()
CUDA_COMPILED: bool = bool(_C.with_cuda)
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
_triton_ops_loaded = False


def _register(family, suffix: str) -> None:
    """Fake kernels and autograd of one family's ops: the C++ ops (suffix "") or their Triton twins."""
    def sibling(name):
        return getattr(torch.ops.fastcascade, name + suffix)

    for name, fake in family.FAKES.items():
        torch.library.register_fake(f"fastcascade::{name}{suffix}")(fake)
    for name, make in family.AUTOGRAD.items():
        backward, setup_context = make(sibling)
        torch.library.register_autograd(f"fastcascade::{name}{suffix}", backward, setup_context=setup_context)


def load_triton_ops() -> None:
    """Imports the Triton kernels (fastcascade.kernels.<stem> for every family), which defines the
    *_triton ops, and gives them the fake kernels and autograd of their C++ twins. Importing Triton takes
    about a second, so this runs at import only where Triton is likely to be used (a visible GPU,
    TRITON_INTERPRET=1, FASTCASCADE_BACKEND=triton) and otherwise on first use."""
    global _triton_ops_loaded
    if _triton_ops_loaded:
        return
    package = __package__.rpartition(".")[0]
    for stem, family in FAMILIES.items():
        importlib.import_module(f"{package}.kernels.{stem}")
        _register(family, "_triton")
    _triton_ops_loaded = True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a call on `device`. FASTCASCADE_BACKEND replaces "auto"."""
    if backend == "auto":
        backend = os.environ.get("FASTCASCADE_BACKEND", "auto") or "auto"
    check_backend(backend)
    dev = device.type
    if backend == "auto":
        if dev == "cpu":
            return "cpu"
        if dev == "cuda":
            # Triton first: its kernels are verified (interpreter) and the CUDA C++ ones are not yet
            # measured on a GPU; revisit with bench/README.md's GPU table.
            return "triton" if HAS_TRITON else ("cuda" if CUDA_COMPILED else "torch")
        return "torch"
    if backend == "cpu" and dev != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not CUDA_COMPILED:
            raise RuntimeError(
                "this fastcascade build has no CUDA kernels (built without a CUDA toolkit). Rebuild with one: "
                f"FASTCASCADE_FORCE_CUDA=1 {REBUILD}  (or use backend='triton' or 'torch')"
            )
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors runs only under TRITON_INTERPRET=1")
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
    return backend


def op(name: str, backend: str):
    """The registered op `name` for a resolved backend: the C++ op (CPU or CUDA dispatch) or, for
    "triton", its Triton twin."""
    if backend == "triton":
        load_triton_ops()
        return getattr(torch.ops.fastcascade, f"{name}_triton")
    return getattr(torch.ops.fastcascade, name)


for _family in FAMILIES.values():
    _register(_family, "")

# Last, once every C++ op is registered: on a GPU (or under the interpreter) the Triton twins load now.
if HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                   or os.environ.get("FASTCASCADE_BACKEND") == "triton"):
    load_triton_ops()
