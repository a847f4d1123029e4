"""The dense oracle of a cascade: the semantics every Cascade.predict mode is tested against."""

from __future__ import annotations

import torch

from ..reference import route_argmax, route_confident, route_threshold, vote
from .tree import Argmax, Confident, Ensemble, Leaf, Threshold

__all__ = ["cascade_dense"]


@torch.no_grad()
def cascade_dense(cascade, x: torch.Tensor) -> torch.Tensor:
    """The dense oracle of fastcascade.Cascade.predict: every stage (and ensemble member) runs on every
    row, then each row follows its own decisions from the root to a leaf. int64 labels (N,).
    Decisions use the routing references (route_threshold / route_argmax / route_confident / vote)."""

    labels = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)

    def decide(node, logits):
        rule = node.rule
        if isinstance(rule, Threshold):
            return route_threshold(logits.reshape(-1), rule.threshold, rule.temperature)
        if isinstance(rule, Argmax):
            return route_argmax(logits)
        assert isinstance(rule, Confident)
        arg = route_argmax(logits)
        exit_ = route_confident(logits, rule.tau, rule.temperature).bool()
        return torch.where(exit_, arg, torch.full_like(arg, logits.shape[1]))

    def assign(node, mask):
        if isinstance(node, Leaf):
            labels[mask] = node.label
        elif isinstance(node, Ensemble):
            cls = vote(torch.stack([m(x) for m in node.members]), node.mode)
            labels[mask] = node.label_table[cls][mask]
        else:
            branch = decide(node, node.outputs(x))
            for b, child in enumerate(node.kids):
                assign(child, mask & (branch == b))

    assign(cascade.root, torch.ones_like(labels, dtype=torch.bool))
    return labels
