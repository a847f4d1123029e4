"""The cascade's tree: decision rules (Threshold, Argmax, Confident), Leaf, Ensemble and Stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import routing

__all__ = ["Argmax", "Confident", "Ensemble", "Leaf", "Stage", "Threshold"]


# ---------------------------------------------------------------------------------------------
# decision rules


@dataclass(frozen=True)
class Threshold:
    """Binary rule on one logit per row: branch 1 where sigmoid(logit / temperature) > threshold, else 0.
    The stage's output must be (N,) or (N, 1)."""

    threshold: float = 0.5
    temperature: float = 1.0

    def num_branches(self, width: int) -> int:
        return 2

    def check_width(self, width: int, stage: str) -> None:
        if width != 1:
            raise ValueError(f"stage {stage!r}: a Threshold rule needs one logit per row, the module gave {width}")

    def decide(self, out: torch.Tensor, backend: str) -> torch.Tensor:
        return routing.route_threshold(out.reshape(-1), self.threshold, self.temperature, backend=backend)

    def probs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out.reshape(-1, 1).float() / self.temperature)


@dataclass(frozen=True)
class Argmax:
    """Multi-way rule: branch c = the first maximum of the row's C logits (C branches)."""

    def num_branches(self, width: int) -> int:
        return width

    def check_width(self, width: int, stage: str) -> None:
        if width < 1:
            raise ValueError(f"stage {stage!r}: an Argmax rule needs at least one logit per row")

    def decide(self, out: torch.Tensor, backend: str) -> torch.Tensor:
        return routing.route_argmax(out, backend=backend)

    def probs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out.float(), dim=1)


@dataclass(frozen=True)
class Confident:
    """Exit-if-confident rule on C logits: branch c (the row's argmax) where max softmax(logits /
    temperature) >= tau, else branch C ("continue"). C + 1 branches: children 0..C-1 are usually
    leaves, child C the next stage."""

    tau: float
    temperature: float = 1.0

    def num_branches(self, width: int) -> int:
        return width + 1

    def check_width(self, width: int, stage: str) -> None:
        if width < 1:
            raise ValueError(f"stage {stage!r}: a Confident rule needs at least one logit per row")

    def decide(self, out: torch.Tensor, backend: str) -> torch.Tensor:
        exit_ = routing.route_confident(out, self.tau, self.temperature, backend=backend)
        arg = routing.route_argmax(out, backend=backend)
        return torch.where(exit_.bool(), arg, torch.full_like(arg, out.shape[1]))

    def probs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out.float() / self.temperature, dim=1)


# ---------------------------------------------------------------------------------------------
# the tree


@dataclass(frozen=True)
class Leaf:
    """A final class id."""

    label: int


class Ensemble(nn.Module):
    """K member modules with C outputs each; their vote (fastcascade.routing.vote: "hard" majority with
    the mean probability breaking ties, or "soft") picks class c, whose final id is labels[c]. The
    members read the cascade's input, or with tap="<segment>" the output of that trunk segment.
    class_names (optional, one per class) name the classes in evaluation reports."""

    def __init__(self, members: Sequence[nn.Module], labels: Sequence[int], mode: str = "hard", name: str = "ensemble",
                 tap: str | None = None, class_names: Sequence[str] | None = None):
        super().__init__()
        if len(members) < 1:
            raise ValueError(f"ensemble {name!r} needs at least one member")
        if mode not in ("hard", "soft"):
            raise ValueError(f"ensemble {name!r}: mode must be 'hard' or 'soft', got {mode!r}")
        self.members = nn.ModuleList(members)
        self.name, self.mode, self.tap = name, mode, _tap(tap, f"ensemble {name!r}")
        self.register_buffer("label_table", _label_table(labels, name), persistent=False)
        self.class_names = names_of(class_names, len(self.label_table), f"ensemble {name!r}: class_names", "classes")

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        outs = [_call(m, x, f"ensemble {self.name!r} member {k}", self.tap) for k, m in enumerate(self.members)]
        for k, o in enumerate(outs):
            if o.dim() != 2 or o.shape[1] != len(self.label_table):
                raise ValueError(f"ensemble {self.name!r}: member {k} must output (N, {len(self.label_table)}) "
                                 f"logits (one per label), got {tuple(o.shape)}")
        return torch.stack(outs)

    def classify(self, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(final labels (N,), mean member probabilities (N, C))."""
        cls, probs = routing.vote(self.member_logits(x), self.mode, return_probs=True, backend=backend)
        return self.label_table[cls], probs


def _tap(tap, owner: str) -> str | None:
    if tap is not None and not (isinstance(tap, str) and tap):
        raise TypeError(f"{owner}: tap must be the name of a trunk segment (a non-empty str) or None, got {tap!r}")
    return tap


def _call(module: nn.Module, x: torch.Tensor, owner: str, tap: str | None) -> torch.Tensor:
    """module(x), a failure named after the stage that ran it (a head fed the wrong tap fails deep in torch)."""
    try:
        return module(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        where = "the cascade's input" if tap is None else f"trunk segment {tap!r}"
        raise RuntimeError(f"{owner} failed on {where}, shape {tuple(x.shape)}: {e}") from e


def names_of(names, count: int, what: str, per: str) -> tuple[str, ...] | None:
    """names as a tuple of `count` str (None stays None); errors name `what` and say `count` `per` are expected."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a sequence of str, got {names!r}")
    if len(names) != count:
        raise ValueError(f"{what} must name each of the {count} {per}, got {len(names)} names")
    return tuple(names)


def _label_table(labels: Sequence[int], name: str) -> torch.Tensor:
    labels = [int(v) for v in labels]
    if not labels or min(labels) < 0:
        raise ValueError(f"{name!r}: labels must be non-empty non-negative class ids, got {labels}")
    return torch.tensor(labels, dtype=torch.int64)


class Stage(nn.Module):
    """A module, its decision rule and one child per branch (Stage, Ensemble, Leaf or an int label).

    The module reads the cascade's input (tap=None) or the output of the trunk segment named by tap
    (see fastcascade.Cascade's trunk). A whole model with an Argmax over its classes and the leaves
    0..C-1 is the flat fallback: Stage(model, Argmax(), range(C)). branch_names (optional, one per
    child) name the branches in evaluation reports.
    """

    def __init__(self, module: nn.Module, rule: Threshold | Argmax | Confident,
                 children: Sequence[Stage | Ensemble | Leaf | int], name: str = "stage", tap: str | None = None,
                 branch_names: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(rule, (Threshold, Argmax, Confident)):
            raise TypeError(f"stage {name!r}: rule must be Threshold, Argmax or Confident, got {type(rule).__name__}")
        kids = []
        for b, c in enumerate(children):
            if isinstance(c, bool) or c is None:
                raise ValueError(f"stage {name!r}: branch {b} has no child")
            if isinstance(c, int):
                c = Leaf(c)
            if not isinstance(c, (Stage, Ensemble, Leaf)):
                raise TypeError(f"stage {name!r}: child {b} must be a Stage, Ensemble, Leaf or int label, got "
                                f"{type(c).__name__}")
            if isinstance(c, Leaf) and c.label < 0:
                raise ValueError(f"stage {name!r}: leaf of branch {b} has a negative label {c.label}")
            kids.append(c)
        if isinstance(rule, Threshold) and len(kids) != 2:
            raise ValueError(f"stage {name!r}: a Threshold rule has 2 branches, got {len(kids)} children")
        if not isinstance(module, nn.Module):
            raise TypeError(f"stage {name!r}: module must be an nn.Module, got {type(module).__name__}")
        self.module, self.rule, self.name, self.tap = module, rule, name, _tap(tap, f"stage {name!r}")
        self.branch_names = names_of(branch_names, len(kids), f"stage {name!r}: branch_names", "branches")
        self.kids = kids  # Leaf entries are plain data; Stage/Ensemble children are registered below
        self.child_modules = nn.ModuleList([c for c in kids if isinstance(c, nn.Module)])

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        out = _call(self.module, x, f"stage {self.name!r}", self.tap)
        width = 1 if out.dim() == 1 else out.shape[1]
        if out.dim() not in (1, 2) or out.shape[0] != x.shape[0]:
            raise ValueError(f"stage {self.name!r}: the module must return (N,) or (N, C) logits for N = "
                             f"{x.shape[0]} rows, got {tuple(out.shape)}")
        self.rule.check_width(width, self.name)
        if self.rule.num_branches(width) != len(self.kids):
            raise ValueError(f"stage {self.name!r}: its rule gives {self.rule.num_branches(width)} branches for "
                             f"{width} logits, but the stage has {len(self.kids)} children")
        return out if out.dim() == 2 else out[:, None]
