"""Codes and small helpers shared by the op families' registrations and the public API."""

from __future__ import annotations

import torch

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
ADAPTER_ACTIVATION_CODES = {"relu": 0, "gelu": 1, "silu": 2}
VOTE_MODES = {"hard": 0, "soft": 1}
NO_IGNORE_INDEX = -(2**63)  # ignore_index=None: no int64 target equals it


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of an op on t: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def graph_grads(fn, inputs, needs, grad_output: torch.Tensor) -> list:
    """The double-backward path of an op's backward (grad mode on, i.e. backward(create_graph=True)):
    d <fn(*inputs), grad_output> / d inputs[i] for every i with needs[i] (None for the others),
    computed through fn (the pure-torch reference) as a graph, so that it can be differentiated again
    in the inputs and in grad_output. The fused kernels' backward computes first derivatives only."""
    wrt = [t for t, n in zip(inputs, needs) if n]
    if not wrt:
        return [None] * len(inputs)
    with torch.enable_grad():
        out = fn(*inputs)
        got = iter(torch.autograd.grad(out, wrt, grad_output.to(out.dtype), create_graph=True,
                                       materialize_grads=True))
    return [next(got) if n else None for n in needs]


def refuse_constant_grads(ctx, names: dict) -> None:
    """The fused losses treat these inputs (index -> name) as constants: asking for their gradient is an
    error, not a silently missing gradient."""
    for i, name in names.items():
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"{name} requires grad, but the fused loss treats {name} as a constant (no "
                               f"gradient); detach it, or use the reference (backend='torch')")
