"""Random cascades for the tests: random trees (Threshold, Argmax and Confident stages, leaves, ensembles)
over a random trunk of linear segments, each stage tapping the input or a random segment."""

from __future__ import annotations

import torch
from torch import nn

import fastcascade as fc


def _linear(i: int, o: int, gen: torch.Generator, scale: float = 1.0) -> nn.Linear:
    m = nn.Linear(i, o)
    with torch.no_grad():
        m.weight.copy_(torch.randn(o, i, generator=gen) * scale / i ** 0.5)
        m.bias.copy_(torch.randn(o, generator=gen) * 0.3)
    return m.eval()


def random_cascade(seed: int, in_dim: int = 6, max_depth: int = 3, segments: int | None = None,
                   num_labels: int = 6, rules=("threshold", "argmax", "confident"), ensembles: bool = True,
                   taps: bool = True) -> fc.Cascade:
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    k = draw(4) if segments is None else segments
    dims = [in_dim] + [3 + draw(6) for _ in range(k)]
    trunk = nn.ModuleDict({f"seg{i}": nn.Sequential(_linear(dims[i], dims[i + 1], gen), nn.Tanh()) for i in range(k)})
    names = iter(f"s{i}" for i in range(1000))

    def tap():
        if not taps or k == 0 or draw(3) == 0:
            return None, in_dim
        i = draw(k)
        return f"seg{i}", dims[i + 1]

    def child(depth: int):
        r = draw(4)
        if depth >= max_depth or r == 0:
            return draw(num_labels)
        if ensembles and r == 1:
            t, d = tap()
            labels = torch.randperm(num_labels, generator=gen)[:2 + draw(num_labels - 1)].tolist()
            members = [_linear(d, len(labels), gen, 3.0) for _ in range(1 + draw(3))]
            return fc.Ensemble(members, labels, mode=["hard", "soft"][draw(2)], name=next(names), tap=t)
        return stage(depth + 1)

    def stage(depth: int) -> fc.Stage:
        t, d = tap()
        kind = rules[draw(len(rules))]
        if kind == "threshold":
            module, rule, width = _linear(d, 1, gen, 3.0), fc.Threshold(0.2 + 0.6 * torch.rand(1, generator=gen).item()), 2
        elif kind == "argmax":
            c = 2 + draw(2)
            module, rule, width = _linear(d, c, gen, 3.0), fc.Argmax(), c
        else:
            c = 2 + draw(2)
            tau = 0.4 + 0.5 * torch.rand(1, generator=gen).item()
            module, rule, width = _linear(d, c, gen, 3.0), fc.Confident(tau), c + 1
        return fc.Stage(module, rule, [child(depth) for _ in range(width)], name=next(names), tap=t)

    return fc.Cascade(stage(0), trunk=trunk if k else None)


def random_input(n: int, seed: int, in_dim: int = 6) -> torch.Tensor:
    return torch.randn(n, in_dim, generator=torch.Generator().manual_seed(1000 + seed)) * 2
