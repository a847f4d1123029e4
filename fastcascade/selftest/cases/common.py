"""What every family's case table is made of: a shape row (what the tests and the self-test draw), a
self-test case (one op at one shape and dtype, with its inputs, public call and reference) and a
compile-gate case (one Triton op's arguments as meta-tensor specs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

# ---------------------------------------------------------------------------------------------
# shape rows: the inputs a family is checked at, and which consumer runs each


@dataclasses.dataclass(frozen=True)
class Shape:
    """One input shape of a family's table.

    tier: the self-test's tier for it ("small" | "awkward" | "bench"), None when the self-test skips it;
    test: whether tests/test_<stem>.py's reference test runs it (on every backend and dtype there, under
    the Triton interpreter too: keep such rows small); layout: "contiguous" | "channels_last" | "strided"
    | "transposed" | "tokens"; kw: the family's own fields (an adapter's r, a loss's options)."""

    shape: tuple
    tier: str | None = None
    test: bool = True
    layout: str = "contiguous"
    kw: dict = dataclasses.field(default_factory=dict, compare=False)

    def __getitem__(self, key):
        return self.kw[key]

    def get(self, key, default=None):
        return self.kw.get(key, default)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


def for_tests(rows) -> list:
    """The rows tests/test_<stem>.py runs."""
    return [r for r in rows if r.test]


def in_tiers(rows, tiers) -> list:
    """The rows the self-test runs at these tiers, in table order."""
    return [r for r in rows if r.tier in tiers]


EDGE_SIZES = (1, 7, 4097)  # one element, fewer than a vector, one past a power-of-two block
I32 = 2**31  # element counts at and past it need 64-bit index arithmetic


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """Logits with a NaN, a +inf and a -inf entry where there is room (the decision ops define those)."""
    flat = x.view(-1)
    if flat.numel() >= 16:
        flat[3], flat[7], flat[11] = math.nan, math.inf, -math.inf
    return x


# ---------------------------------------------------------------------------------------------
# self-test cases


@dataclasses.dataclass
class Case:
    op: str
    tier: str  # "small" | "awkward" | "bench"
    shape: str  # what the table shows
    dtype: torch.dtype
    make: Callable  # (generator, device) -> list of inputs (floating ones in dtype, or fp32 parameters)
    public: Callable  # (backend, *args) -> Tensor or tuple: the public API
    ref: Callable  # (*args) -> Tensor or tuple: fastcascade.reference
    names: tuple  # of the inputs
    outputs: tuple  # names of the forward outputs
    diff: tuple = ()  # indices of the inputs that get a gradient
    exact: frozenset = frozenset()  # outputs (and "grad <input>") compared exactly with the reference
    views: dict = dataclasses.field(default_factory=dict)  # input index -> the view the op receives
    module: Callable | None = None  # (backend, device) -> nn.Module of inputs[0]; inputs[1:] are its parameters

    @property
    def key(self) -> str:
        return f"{self.op} {self.shape} {DTYPE_NAMES[self.dtype]}"

    @property
    def all_outputs(self) -> list:
        return list(self.outputs) + [f"grad {self.names[i]}" for i in self.diff]

    @property
    def float_outputs(self) -> bool:
        return any(n not in self.exact for n in self.all_outputs)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
               torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}


def randn(gen, device, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def randint(gen, device, high, shape, dtype=torch.int64):
    return torch.randint(0, high, shape, generator=gen, device=device).to(dtype)


def public_api():
    import fastcascade  # the public API, resolved at call time (no import cycle with the package)

    return fastcascade


# ---------------------------------------------------------------------------------------------
# compile-gate cases (tests/test_triton_compile.py): meta tensors, so any size costs no memory


class Meta(NamedTuple):
    """A meta tensor: shape, dtype, and "cl" for channels_last."""
    shape: tuple
    dtype: torch.dtype = torch.float32
    fmt: str = ""


class GateCase(NamedTuple):
    id: str
    op: str  # the Triton op's host function (fastcascade.kernels._common.HOST_FUNCTIONS)
    args: tuple  # its arguments, tensors as Meta specs
    bench: bool = False  # a benchmark shape: ptxas must report no register spills


# dropout (threshold, seed) pairs whose seed halves and threshold each equal 1 (constants in compiled
# Triton), and none
DROPOUT_EDGES = ((2**-32, 2**32 + 1), (0.25, 2**32 * 7 + 12345))


def adapter_case(kind: str, row: Shape, dtype, shape=None) -> Case:
    """A self-test case of the residual adapter of this kind ("pooled" | "pixel") at a table row (kw: r,
    act); shape: another shape than the row's (the quick run's fewer tokens)."""
    from ... import reference

    shape = shape or row.shape
    r, act, channels_last = row["r"], row["act"], row.layout == "channels_last"
    C = shape[1] if (kind == "pooled" or len(shape) == 4) else shape[-1]

    def make(gen, device):
        x = randn(gen, device, shape, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # weights large enough that the adapter branch matters next to the identity; fp32 parameters
        # with a low-precision x, as under autocast
        return [x] + [randn(gen, device, s, torch.float32, 0.3) for s in ((r, C), (r,), (C, r), (C,))]

    def module(b, device):
        return public_api().ResidualAdapter(C, r, kind, act, backend=b, device=device)

    def ref(x, dw, db, uw, ub):
        if kind == "pooled":
            return reference.pooled_adapter(x, dw, db, uw, ub, act)
        return reference.pixel_adapter(x, dw, db, uw, ub, act, channel_dim=1 if x.dim() == 4 else -1)

    label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "") + f" r={r} {act}"
    return Case(f"{kind}_adapter", row.tier, label, dtype, make, None, ref, ("x", "down_w", "down_b", "up_w", "up_b"),
                ("y",), diff=(0, 1, 2, 3, 4), module=module)


def adapter_weight_specs(C, r, dtype, scale):
    """Meta specs of an adapter's (down_w, down_b, up_w, up_b, scale): fp32 parameters, fp64 with fp64 x."""
    w = dtype if dtype == torch.float64 else torch.float32
    return (Meta((r, C), w), Meta((r,), w), Meta((C, r), w), Meta((C,), w), Meta((), w) if scale else None)
