"""The dense oracle of a cascade: the semantics every Cascade.predict mode is tested against."""

from __future__ import annotations

import torch

from ..reference import route_argmax, route_confident, route_threshold, vote
from .tree import Argmax, Confident, Ensemble, Leaf, Threshold
from .trunk import trunk_features

__all__ = ["cascade_dense", "dense_outputs"]


@torch.no_grad()
def dense_outputs(cascade, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every trunk segment and every stage on every row: {stage name: its (N, C) logits, ensemble name:
    its members' (K, N, C) logits}. Each module reads the cascade's input or its tap's features, the
    trunk run once on all rows."""
    feats = trunk_features(cascade.trunk, x)
    index = {s: k for k, s in enumerate(cascade.segments)}
    outs = {}
    for node in cascade.nodes:
        h = x if node.tap is None else feats[index[node.tap]]
        outs[node.name] = node.member_logits(h) if isinstance(node, Ensemble) else node.outputs(h)
    return outs


def reference_decision(rule, logits: torch.Tensor) -> torch.Tensor:
    """The branch (N,) a rule takes on (N, C) logits, by the routing references (fastcascade.reference)."""
    if isinstance(rule, Threshold):
        return route_threshold(logits.reshape(-1), rule.threshold, rule.temperature)
    if isinstance(rule, Argmax):
        return route_argmax(logits)
    assert isinstance(rule, Confident)
    arg = route_argmax(logits)
    exit_ = route_confident(logits, rule.tau, rule.temperature).bool()
    return torch.where(exit_, arg, torch.full_like(arg, logits.shape[1]))


@torch.no_grad()
def cascade_dense(cascade, x: torch.Tensor) -> torch.Tensor:
    """The dense oracle of fastcascade.Cascade.predict: every trunk segment, stage and ensemble member
    runs on every row, then each row follows its own decisions from the root to a leaf. int64 labels
    (N,). Decisions use the routing references (route_threshold / route_argmax / route_confident / vote)."""

    labels = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    outs = dense_outputs(cascade, x)

    def assign(node, mask):
        if isinstance(node, Leaf):
            labels[mask] = node.label
        elif isinstance(node, Ensemble):
            labels[mask] = node.label_table[vote(outs[node.name], node.mode)][mask]
        else:
            branch = reference_decision(node.rule, outs[node.name])
            for b, child in enumerate(node.kids):
                assign(child, mask & (branch == b))

    assign(cascade.root, torch.ones_like(labels, dtype=torch.bool))
    return labels
