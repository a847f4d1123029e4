"""Shared trunks: ordered segments of one backbone that the cascade's stages tap, and split_backbone.

A trunk is an ordered ``nn.ModuleDict`` (or an ``nn.Sequential`` with named children) of segments
s_0, ..., s_{K-1}: f_k = s_k(f_{k-1}) with f_{-1} the cascade's input. A stage with ``tap="s_k"`` reads
f_k. Rows that reach a stage tapping s_k have had s_0..s_k computed exactly once, whichever stages
above them tapped the trunk: the plan below says, per node of the tree, which segments it runs (those
deeper than anything computed above it) and which computed features it hands to each child.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .tree import Ensemble, Leaf, Stage

__all__ = ["split_backbone"]

# children that start a classifier's head (pooling, then the linear layer): timm, torchvision, SmallCNN
_HEAD_POOLS = ("global_pool", "avgpool", "pool")


def as_trunk(trunk) -> nn.ModuleDict | None:
    """The trunk as an ordered nn.ModuleDict of its segments (None stays None)."""
    if trunk is None:
        return None
    if isinstance(trunk, nn.Sequential):
        trunk = nn.ModuleDict(list(trunk.named_children()))
    if not isinstance(trunk, nn.ModuleDict):
        raise TypeError(f"trunk must be an nn.ModuleDict or an nn.Sequential of named segments, got "
                        f"{type(trunk).__name__}")
    if len(trunk) == 0:
        raise ValueError("trunk must hold at least one segment")
    return trunk


def split_backbone(model: nn.Module, at: Sequence[str]) -> tuple[nn.ModuleDict, nn.Module]:
    """Cut a classifier into a trunk of segments and its head: (trunk, head), sharing the model's modules.

    Works for models whose named children are the feature stages, then a pooling layer ("global_pool",
    "avgpool" or "pool") and "fc": timm and torchvision ResNets, fastcascade.demo.SmallCNN. Segment i
    ends with the child named at[i] and is named after it; the last segment ends with the last feature
    stage (e.g. layer4) whether or not `at` names it. head(trunk outputs) is model(x) in eval mode:

        trunk, head = fc.split_backbone(timm.create_model("resnet18"), at=["layer1", "layer2"])
        # trunk: {"layer1": conv1 .. layer1, "layer2": layer2, "layer4": layer3 + layer4}
        Stage(head, Argmax(), range(1000), name="flat", tap="layer4")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    children = list(model.named_children())
    names = [n for n, _ in children]
    pool_at = next((i for i, n in enumerate(names) if n in _HEAD_POOLS), None)
    if pool_at is None or pool_at == 0 or "fc" not in names[pool_at:]:
        raise ValueError(f"model: split_backbone cuts models whose children are the feature stages, then a "
                         f"pooling layer ({', '.join(_HEAD_POOLS)}) and 'fc' (timm / torchvision ResNets, "
                         f"SmallCNN); {type(model).__name__} has children {names}")
    features = names[:pool_at]
    if isinstance(at, str) or not isinstance(at, Sequence) or not at:
        raise TypeError(f"at must be a non-empty list of child names of the model, got {at!r}")
    cuts = []
    for a in at:
        if a not in features:
            raise ValueError(f"at: {a!r} is not a feature stage of the model; its stages: {features}")
        i = features.index(a)
        if cuts and i <= cuts[-1]:
            raise ValueError(f"at must name stages in model order, without repeats, got {list(at)}")
        cuts.append(i)
    if cuts[-1] != len(features) - 1:
        cuts.append(len(features) - 1)
    trunk, start = nn.ModuleDict(), 0
    for end in cuts:
        part = children[start:end + 1]
        trunk[features[end]] = part[0][1] if len(part) == 1 else nn.Sequential(OrderedDict(part))
        start = end + 1
    head = [module for _, module in children[pool_at:]]
    if not getattr(head[0], "flatten", False):  # timm's SelectAdaptivePool2d flattens itself
        head.insert(1, nn.Flatten(1))
    return trunk, nn.Sequential(*(m for m in head if not isinstance(m, nn.Identity)))


# ---------------------------------------------------------------------------------------------
# the plan: what each node computes and carries


@dataclass(frozen=True)
class NodePlan:
    """tap: the segment index the node reads (-1: the cascade's input); resume: the deepest segment
    computed for its rows above it (-1: none); run: the segments it computes (resume + 1 .. tap, empty
    when its tap is already computed); keep: the segment outputs it holds for its descendants (ids);
    carry: per child, the ones that child receives (Leaf children receive nothing)."""

    tap: int
    resume: int
    run: tuple[int, ...]
    keep: tuple[int, ...]
    carry: tuple[tuple[int, ...], ...]

    @property
    def depth(self) -> int:
        """The deepest segment computed for the node's rows once it has run."""
        return max(self.tap, self.resume)

    @property
    def reads(self) -> int:
        """What the node reads from what its parent handed it: its tap, or the point it resumes from."""
        return self.tap if self.tap <= self.resume else self.resume


def plan_trunk(root: Stage, segments: Sequence[str]) -> dict[str, NodePlan]:
    """{node name: NodePlan} for the tree under root over the named segments (taps checked there)."""
    index = {s: k for k, s in enumerate(segments)}
    plans: dict[str, NodePlan] = {}

    def tap_of(node) -> int:
        if node.tap is None:
            return -1
        if not segments:
            raise ValueError(f"{_kind(node)} {node.name!r}: tap {node.tap!r} names a trunk segment, but the cascade "
                             f"has no trunk")
        if node.tap not in index:
            raise ValueError(f"{_kind(node)} {node.name!r}: tap {node.tap!r} is not a trunk segment; segments: "
                             f"{list(segments)}")
        return index[node.tap]

    def visit(node, resume: int) -> set[int]:
        """Plan node's subtree; return the inherited segments it needs (ids <= resume, >= 0)."""
        tap = tap_of(node)
        depth = max(tap, resume)
        kids = [c for c in node.kids] if isinstance(node, Stage) else []
        needs = [visit(c, depth) if not isinstance(c, Leaf) else set() for c in kids]
        below = set().union(*needs)
        reads = tap if tap <= resume else resume
        plans[node.name] = NodePlan(tap=tap, resume=resume, run=tuple(range(resume + 1, tap + 1)),
                                    keep=tuple(sorted(below)), carry=tuple(tuple(sorted(n)) for n in needs))
        return {k for k in below | {reads} if 0 <= k <= resume}

    visit(root, -1)
    return plans


def _kind(node) -> str:
    return "ensemble" if isinstance(node, Ensemble) else "stage"


def trunk_features(trunk: nn.ModuleDict | None, x: torch.Tensor) -> list[torch.Tensor]:
    """[f_0, ..., f_{K-1}]: every segment on every row (the dense oracle's trunk)."""
    feats, h = [], x
    for name, seg in (trunk or {}).items():
        h = call_segment(seg, h, name)
        feats.append(h)
    return feats


def call_segment(segment: nn.Module, h: torch.Tensor, name: str) -> torch.Tensor:
    try:
        return segment(h)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise RuntimeError(f"trunk segment {name!r} failed on an input of shape {tuple(h.shape)}: {e}") from e
