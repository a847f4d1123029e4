"""Argument and value checks shared by the public API: one home for each, so every function words the
same mistake the same way."""

from __future__ import annotations

import math
import numbers
import operator
import os
import pathlib
from collections.abc import Iterable, Sequence

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def checks_forced() -> bool:
    """FASTCASCADE_CHECK=1: raise on bad values even where checking them costs a device sync."""
    return os.environ.get("FASTCASCADE_CHECK") == "1"


def value_checks_on(t: torch.Tensor) -> bool:
    """Whether to check the values of t (target ids, indices) on the host: always on the CPU (no sync
    there), on CUDA only with FASTCASCADE_CHECK=1 (the kernels give NaN rows or skip instead); never
    while compiling (data-dependent; the C++ CPU kernels still raise)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or checks_forced()


def model_input(x: torch.Tensor) -> torch.Tensor:
    """A model's input as its tools read it: uint8 pixels as float in [0, 1] (x / 255), anything else as is."""
    return x.float() / 255 if x.dtype == torch.uint8 else x


def tensor_arg(t, name: str) -> torch.Tensor:
    """t itself; TypeError naming the argument when it is not a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def int_arg(v, name: str, lowest: int) -> int:
    """An int (or SymInt) >= lowest; TypeError for other types (bool included), ValueError below lowest."""
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {v}")
    return v


def positive_int(value, name: str) -> int:
    """An int >= 1 from anything with __index__ (numpy ints too); bool refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= 1, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def number_arg(value, name: str, low: float | None = None, *, low_inclusive: bool = True) -> float:
    """A finite real number (numpy and 0-dim tensors too) >= low (> low with low_inclusive=False), as a
    float; TypeError for other types (bool included), ValueError for NaN, infinity or a value below low."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low if low_inclusive else v <= low):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {v}")
    return v


def device_arg(device, name: str = "device") -> torch.device:
    """The torch.device of `device` (str, int or torch.device), checked to exist here. ValueError naming the
    argument for a string torch does not know ("tpu"), "meta" (no data to compute on), or a device this
    machine lacks: "cuda" with no GPU visible, "cuda:3" with two, "mps" or "xpu" where unavailable."""
    label = (lambda: f"{name} {device}") if name.startswith("--") else (lambda: f"{name}={device!r}")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a device string such as 'cpu' or 'cuda:0', or a torch.device, got "
                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{label()}: not a device torch knows; expected 'cpu', 'cuda' or 'cuda:N' (or "
                         f"another type torch.device accepts that this machine has)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ValueError(f"{label()}: meta tensors have shapes but no data, so nothing can be computed on "
                         f"them; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{label()}: no CUDA device is visible here (torch.cuda.is_available() is "
                             f"False); use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{label()}: only {n} CUDA device(s) are visible (cuda:0 to cuda:{n - 1})")
        return dev
    try:
        if dev.type == "mps":
            usable = torch.backends.mps.is_available()
        else:
            usable = getattr(getattr(torch, dev.type, None), "is_available", lambda: True)()
        if usable:
            torch.empty(1, device=dev)
    except Exception:  # e.g. no torch.<type> module, or no kernels registered for that backend
        usable = False
    if not usable:
        raise ValueError(f"{label()}: this machine (or this torch build) has no usable {dev.type} device; use "
                         + ("'cpu' or 'cuda'" if torch.cuda.is_available() else "'cpu'"))
    return dev


def file_in_the_way(path: str | os.PathLike) -> pathlib.Path | None:
    """What keeps `path` from being (or becoming) a folder: path itself or its nearest existing ancestor, when
    that is not a folder (a file); None when path is a folder or can be created as one."""
    p = pathlib.Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            return None if q.is_dir() else q
    return None


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def few(items: Iterable, n: int = 5, *, as_list: bool = False) -> str:
    """The first n items and how many more, for error messages about long lists: "a, b and 3 more", or
    with as_list "['a', 'b'] and 3 more" (names that may hold commas or spaces)."""
    items = list(items)
    head = f"{items[:n]}" if as_list else ", ".join(str(i) for i in items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def listed(groups: Iterable[tuple[str, Sequence]], n: int = 8, *, as_list: bool = False) -> str:
    """The non-empty groups of an error message, "label: a, b and 3 more; label2: c" (see few): e.g. the
    entries a model and a checkpoint disagree on."""
    return "; ".join(f"{label}: {few(items, n, as_list=as_list)}" for label, items in groups if items)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN payloads included; torch.equal says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    if a.numel() == 0:
        return True
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.to(a.device).view(torch.uint8))
