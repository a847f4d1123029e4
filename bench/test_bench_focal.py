"""Fused focal losses, forward + backward: fastcascade backends vs torchvision / eager and torch.compile.

Run: pytest bench/test_bench_focal.py --benchmark-only  (see bench/README.md for the recorded table)
Bytes counted per step are the fewest a fused fwd+bwd must move: read logits and targets, write the
gradient (the backward's scaling by grad_output is counted as free; it is not in our kernels).
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from bench_utils import DEVICE, fused_backends, headline, record

import fastcascade as fc
from fastcascade import reference

SIGMOID_SIZES = [1 << 16, 1 << 20, headline(1 << 24), 1 << 26] if DEVICE == "cuda" else [1 << 16, headline(1 << 20)]
SOFTMAX_ROWS = (1 << 22) if DEVICE == "cuda" else (1 << 18)
DTYPES = [torch.float32, torch.bfloat16]



_compiled_sigmoid = torch.compile(reference.sigmoid_focal_loss)
_compiled_softmax = torch.compile(reference.softmax_focal_loss)


def _sigmoid_impls():
    impls = {
        "torchvision-eager": lambda x, t: torchvision.ops.sigmoid_focal_loss(x, t, 0.25, 2.0, "mean"),
        "reference-compile": lambda x, t: _compiled_sigmoid(x, t, 0.25, 2.0, "mean"),
    }
    for b in fused_backends():
        impls[f"fastcascade-{b}"] = lambda x, t, b=b: fc.sigmoid_focal_loss(x, t, 0.25, 2.0, "mean", backend=b)
    return impls


def _softmax_impls():
    impls = {
        "reference-eager": lambda x, t: reference.softmax_focal_loss(x, t, 2.0),
        "reference-compile": lambda x, t: _compiled_softmax(x, t, 2.0),
        "cross_entropy-eager (gamma=0 yardstick)": lambda x, t: F.cross_entropy(x, t),
    }
    for b in fused_backends():
        impls[f"fastcascade-{b}"] = lambda x, t, b=b: fc.softmax_focal_loss(x, t, 2.0, backend=b)
    return impls


def _step(loss_fn, x, t):
    def step():
        x.grad = None
        loss_fn(x, t).backward()

    return step


@pytest.mark.parametrize("impl", list(_sigmoid_impls()))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", SIGMOID_SIZES)
def test_sigmoid_focal_fwd_bwd(benchmark, impl, dtype, n):
    benchmark.group = f"sigmoid_focal fwd+bwd N={n} {str(dtype)[6:]}"
    x = (torch.randn(n, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    t = (torch.rand(n, device=DEVICE) > 0.9).to(dtype)
    record(benchmark, _step(_sigmoid_impls()[impl], x, t), 3 * n * x.element_size())


@pytest.mark.parametrize("impl", list(_softmax_impls()))
@pytest.mark.parametrize("C", [headline(3), headline(10), 16])
def test_softmax_focal_fwd_bwd(benchmark, impl, C):
    n = SOFTMAX_ROWS
    benchmark.group = f"softmax_focal fwd+bwd N={n} C={C} fp32"
    x = (torch.randn(n, C, device=DEVICE) * 3).requires_grad_(True)
    t = torch.randint(0, C, (n,), device=DEVICE)
    record(benchmark, _step(_softmax_impls()[impl], x, t), 2 * n * C * 4 + n * 8)


@pytest.mark.parametrize("impl", list(_softmax_impls()))  # the same calls take class-probability targets
@pytest.mark.parametrize("C", [headline(10)])
def test_softmax_focal_probabilities_fwd_bwd(benchmark, impl, C):
    n = SOFTMAX_ROWS
    benchmark.group = f"softmax_focal probabilities fwd+bwd N={n} C={C} fp32"
    x = (torch.randn(n, C, device=DEVICE) * 3).requires_grad_(True)
    r = torch.softmax(torch.randn(n, C, device=DEVICE) * 2, 1)
    record(benchmark, _step(_softmax_impls()[impl], x, r), 3 * n * C * 4)
