"""Running one case on one backend: forward, backward with a non-trivial upstream gradient, and the
comparisons (bitwise equality, mismatch counts)."""

from __future__ import annotations

import torch

from .cases import Case

# ---------------------------------------------------------------------------------------------
# running one case


class Upstream:
    """Upstream gradients, one per differentiable output: values in [0.5, 1.5) rounded to bf16, so
    exactly representable in every dtype under test (the float64 truth and a bf16 backend get the same
    one), and not all ones, so a backward that ignores its upstream gradient fails."""

    def __init__(self, seed: int):
        self.seed, self.cache = seed, {}

    def get(self, i: int, out: torch.Tensor) -> torch.Tensor:
        g = self.cache.get(i)
        if g is None or g.shape != out.shape or g.device != out.device:
            gen = torch.Generator(device=out.device).manual_seed(self.seed + i)
            g = (torch.rand(out.shape, generator=gen, device=out.device, dtype=torch.float64) + 0.5)
            g = self.cache[i] = g.to(torch.bfloat16)
        return g.to(out.dtype)


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def bind(case: Case, impl: str, inputs: list, compiled=None):
    """(leaves, forward) for impl ("reference", "compile" or a backend): forward() runs the op once on
    views of the leaves, whose .grad the backward fills."""
    if case.module is not None and impl not in ("reference", "compile"):
        m = case.module(impl, inputs[0].device)
        params = list(m.parameters())
        with torch.no_grad():
            for p, v in zip(params, inputs[1:]):
                p.copy_(v)
        x = inputs[0].detach().clone().requires_grad_(True)
        view = case.views.get(0, lambda t: t)
        return [x] + params, lambda: _as_list(m(view(x)))
    args, leaves = list(inputs), []
    for i in case.diff:
        args[i] = inputs[i].detach().clone().requires_grad_(True)
        leaves.append(args[i])
    fn = {"reference": case.ref, "compile": compiled}.get(impl)
    if fn is None:
        fn = lambda *a: case.public(impl, *a)  # noqa: E731

    def forward():
        return _as_list(fn(*[case.views[i](a) if i in case.views else a for i, a in enumerate(args)]))

    return leaves, forward


def step(leaves, forward, upstream: Upstream) -> list:
    for t in leaves:
        t.grad = None
    outs = forward()
    pairs = [(o, upstream.get(i, o)) for i, o in enumerate(outs) if o.requires_grad]
    if leaves and pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs


def execute(case: Case, impl: str, inputs: list, upstream: Upstream) -> list:
    """Forward outputs, then the gradient of every differentiable input, detached."""
    leaves, forward = bind(case, impl, inputs)
    outs = [o.detach() for o in step(leaves, forward, upstream)]
    return outs + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]




def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    a = a.to(b.device)
    if a.is_floating_point():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    else:
        same = a == b
    return int((~same).sum())
