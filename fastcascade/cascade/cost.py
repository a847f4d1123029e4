"""Compute accounting of a cascade: FLOPs per part (torch.utils.flop_counter) and per row as routed.

    cost = fc.cascade_cost(cascade, example)     # example: the cascade's input, one row or more
    cost.parts                                   # {"layer1": ..., "stage1": ..., "ab.0": ...} FLOPs of one row
    cost.dense                                   # every part on one row (the dense oracle's cost)
    cost.expected(x)                             # mean FLOPs per row of cascade.predict(x)

FLOPs are what torch.utils.flop_counter.FlopCounterMode counts for one row (matrix products and
convolutions, 2 per multiply-add; elementwise ops, normalisation and pooling count 0): no formula here.
A row pays for the trunk segments computed for it (those up to the deepest tap on its path) and for
every stage and ensemble member on its path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._checks import model_input
from .tree import Ensemble

__all__ = ["CascadeCost", "cascade_cost", "flops_per_row"]


class eval_mode:
    """Modules in eval mode for a measurement (no batch-norm statistics updated), their modes restored."""

    def __init__(self, module: nn.Module):
        self.modes = {m: m.training for m in module.modules()}
        self.module = module

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode


def _one_row(example, what: str) -> torch.Tensor:
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (the model's input, one row or more), got {type(example).__name__}")
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"{what} must hold at least one row, got shape {tuple(example.shape)}")
    return model_input(example[:1])


def _counted(fn, *args) -> tuple[int, object]:
    # imported here: torch.utils.flop_counter imports Triton (about a second, and before a caller can set
    # TRITON_INTERPRET), which `import fastcascade` must not do off a GPU
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


@torch.no_grad()
def flops_per_row(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of module on one row (example[:1]), as torch.utils.flop_counter counts them, in eval mode."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    x = _one_row(example, "example")
    with eval_mode(module):
        return _counted(module, x)[0]


@dataclass(frozen=True)
class CascadeCost:
    """FLOPs of one row through each part of a cascade: trunk segments (by segment name), stages (by
    stage name) and ensemble members ("<ensemble>.<k>"). ``entry[name]`` is what a row pays on entering
    node `name`: its module (or members) and the trunk segments first computed there."""

    parts: dict[str, int]
    entry: dict[str, int]
    path_flops: tuple[int, ...] = field(repr=False)  # per node id: FLOPs of a row that exits there
    parts_of_exit: tuple[tuple[str, ...], ...] = field(repr=False)  # per node id: the parts its rows pay for
    cascade: object = field(repr=False, compare=False, default=None)

    @property
    def dense(self) -> int:
        """FLOPs of one row through every part (what the dense oracle computes)."""
        return sum(self.parts.values())

    def row_flops(self, exit_stage: torch.Tensor) -> torch.Tensor:
        """int64 (N,): FLOPs of each row, from its exit stage (CascadeOutput.exit_stage)."""
        table = torch.tensor(self.path_flops, dtype=torch.int64, device=exit_stage.device)
        return table[exit_stage]

    def exit_counts(self, exit_stage: torch.Tensor) -> torch.Tensor:
        """int64 (nodes,) on the CPU: how many rows exited at each node (a histogram of exit_stage)."""
        return torch.bincount(exit_stage.reshape(-1).cpu(), minlength=len(self.path_flops))

    def reached(self, exit_stage: torch.Tensor) -> dict[str, float]:
        """Per part, the fraction of rows that ran it (NaN for no rows)."""
        return self.reached_from_counts(self.exit_counts(exit_stage))

    def reached_from_counts(self, counts: torch.Tensor) -> dict[str, float]:
        """reached() from exit_counts() (summed over batches, say)."""
        n = int(counts.sum())
        out = {p: 0 for p in self.parts}
        for node_id, count in enumerate(counts.tolist()):
            for p in self.parts_of_exit[node_id]:
                out[p] += count
        return {p: c / n if n else float("nan") for p, c in out.items()}

    def mean_flops(self, exit_stage: torch.Tensor) -> float:
        """Mean FLOPs per row (NaN for no rows); summed exactly in int64."""
        return self.mean_flops_from_counts(self.exit_counts(exit_stage))

    def mean_flops_from_counts(self, counts: torch.Tensor) -> float:
        """mean_flops() from exit_counts()."""
        n = int(counts.sum())
        table = torch.tensor(self.path_flops, dtype=torch.int64)
        return int((counts.to(torch.int64).cpu() * table).sum()) / n if n else float("nan")

    def expected(self, x: torch.Tensor, mode: str = "dynamic") -> float:
        """Mean FLOPs per row of cascade.predict(x, mode): each part counted for the rows that reach it."""
        out = self.cascade.predict(x, mode=mode, return_details=True)
        return self.mean_flops(out.exit_stage)


@torch.no_grad()
def cascade_cost(cascade, example: torch.Tensor) -> CascadeCost:
    """The CascadeCost of a fastcascade.Cascade: every part run once on example[:1] (an input row of the
    cascade) under torch.utils.flop_counter.FlopCounterMode, in eval mode."""
    x = _one_row(example, "example")
    with eval_mode(cascade):
        parts, feats, h = {}, [], x
        for name, seg in (cascade.trunk or {}).items():
            parts[name], h = _counted(seg, h)
            feats.append(h)
        for node in cascade.nodes:
            p = cascade.plan[node.name]
            inp = x if p.tap < 0 else feats[p.tap]
            if isinstance(node, Ensemble):
                for k, m in enumerate(node.members):
                    parts[f"{node.name}.{k}"] = _counted(m, inp)[0]
            else:
                parts[node.name] = _counted(node.module, inp)[0]
    own = {n.name: _node_parts(n) for n in cascade.nodes}
    segments = cascade.segments
    entry = {name: sum(parts[q] for q in own[name]) + sum(parts[segments[k]] for k in cascade.plan[name].run)
             for name in own}
    paths, exits = [], []
    for name in cascade.node_names:
        on_path = cascade.path(name)
        names = [q for n in on_path for q in own[n]] + segments[:cascade.plan[name].depth + 1]
        exits.append(tuple(names))
        paths.append(sum(entry[n] for n in on_path))
    return CascadeCost(parts=parts, entry=entry, path_flops=tuple(paths), parts_of_exit=tuple(exits), cascade=cascade)


def _node_parts(node) -> list[str]:
    if isinstance(node, Ensemble):
        return [f"{node.name}.{k}" for k in range(len(node.members))]
    return [node.name]
