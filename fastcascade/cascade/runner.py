"""Cascade: runs a tree of stages on whole batches with device-side routing (dynamic, static, CUDA graph)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import routing
from .buckets import DEFAULT_ROW_BUCKETS, row_bucket
from .evaluate import EvaluationReport, evaluate_cascade
from .tree import Confident, Ensemble, Leaf, Stage, Threshold, names_of
from .trunk import as_trunk, call_segment, plan_trunk

__all__ = ["Cascade", "CascadeOutput"]


@dataclass
class CascadeOutput:
    """labels (N,) int64 final ids; exit_stage (N,) int64, the index in Cascade.node_names of the stage
    (or ensemble) that decided each row; probs: per stage name, (N, K) fp32 probabilities of its rule
    (the ensemble's mean member probabilities), NaN in rows that did not reach it."""

    labels: torch.Tensor
    exit_stage: torch.Tensor
    probs: dict[str, torch.Tensor] = field(default_factory=dict)

    def reached(self, cascade: Cascade, name: str) -> torch.Tensor:
        """Bool (N,): the rows that reached node `name`."""
        return cascade.reached_mask(self.exit_stage, name)


class Cascade(nn.Module):
    """An early-exit cascade over a tree of stages (see the package docstring), optionally over a shared
    trunk: an ordered nn.ModuleDict (or nn.Sequential with named children) of segments that stages tap
    by name (Stage(..., tap="layer1")). Each segment runs at most once per row, only for the rows routed
    to a stage that needs it, resuming from the deepest features already computed for those rows.
    class_names (optional, one per final label 0..num_classes-1) name the labels in evaluation reports.
    row_buckets: in dynamic mode, a node below the root runs on its rows padded (with copies of its last row,
    whose outputs are dropped) to one of row_buckets counts per doubling (fastcascade.cascade.buckets: few
    distinct shapes, so the CPU's convolution primitives are built once and cached; at most 1 / row_buckets
    more rows); 0 runs every node on its exact row count. Labels and probabilities do not depend on it."""

    def __init__(self, root: Stage, trunk: nn.ModuleDict | nn.Sequential | None = None, backend: str = "auto",
                 class_names: Sequence[str] | None = None, row_buckets: int = DEFAULT_ROW_BUCKETS):
        super().__init__()
        if not isinstance(root, Stage):
            raise TypeError(f"root must be a Stage, got {type(root).__name__}")
        if isinstance(row_buckets, bool) or not isinstance(row_buckets, int) or row_buckets < 0:
            raise ValueError(f"row_buckets must be an int >= 0 (buckets per doubling of the row count; 0: exact "
                             f"row counts), got {row_buckets!r}")
        self.root, self.backend, self.row_buckets = root, backend, row_buckets
        self.trunk = as_trunk(trunk)
        self.segments = list(self.trunk or {})
        self.nodes: list[Stage | Ensemble] = []
        self._paths: dict[str, list[str]] = {}
        self._walk(root, [])
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique, repeated: {dup}")
        parts = self.segments + [f"{n.name}.{k}" if isinstance(n, Ensemble) else n.name
                                 for n in self.nodes for k in (range(len(n.members)) if isinstance(n, Ensemble) else [0])]
        clash = sorted({q for q in parts if parts.count(q) > 1})
        if clash:
            raise ValueError(f"stage names must differ from the trunk's segment names and ensemble members' "
                             f"names (<ensemble>.<k>), repeated: {clash}")
        self.node_names = names
        self.plan = plan_trunk(root, self.segments)  # checks every tap
        labels = sorted(self._labels_under(root))
        self.num_classes = labels[-1] + 1
        self.class_names = names_of(class_names, self.num_classes, "class_names", "final labels")

    def _walk(self, node, path):
        self.nodes.append(node)
        self._paths[node.name] = path + [node.name]
        if isinstance(node, Stage):
            for c in node.kids:
                if not isinstance(c, Leaf):
                    self._walk(c, path + [node.name])

    def _labels_under(self, node) -> set[int]:
        if isinstance(node, Leaf):
            return {node.label}
        if isinstance(node, Ensemble):
            return set(node.label_table.tolist())
        return set().union(*(self._labels_under(c) for c in node.kids))

    # -----------------------------------------------------------------------------------------
    def with_setting(self, setting: dict[str, float]) -> Cascade:
        """A cascade over the same modules and trunk whose rules take the given operating point: stage name
        -> threshold (a Threshold rule) or tau (a Confident rule); other rules are kept."""
        unknown = sorted(set(setting) - set(self.node_names))
        if unknown:
            raise ValueError(f"setting: unknown stages {unknown}; stages: {self.node_names}")

        def rebuild(node):
            if not isinstance(node, Stage):
                return node
            rule = node.rule
            if node.name in setting:
                v = float(setting[node.name])
                if isinstance(rule, Threshold):
                    rule = dataclasses.replace(rule, threshold=v)
                elif isinstance(rule, Confident):
                    rule = dataclasses.replace(rule, tau=v)
                else:
                    raise ValueError(f"setting: stage {node.name!r} has an {type(rule).__name__} rule, which has no "
                                     f"threshold or tau")
            return Stage(node.module, rule, [rebuild(c) for c in node.kids], name=node.name, tap=node.tap,
                         branch_names=node.branch_names)

        return Cascade(rebuild(self.root), trunk=self.trunk, backend=self.backend, class_names=self.class_names,
                       row_buckets=self.row_buckets)

    # -----------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        for node in self.nodes:
            p = next(iter(node.parameters()), None)
            if p is not None and p.device != x.device:
                raise ValueError(f"x is on {x.device} but stage {node.name!r} is on {p.device}")
        for name, seg in (self.trunk or {}).items():
            p = next(iter(seg.parameters()), None)
            if p is not None and p.device != x.device:
                raise ValueError(f"x is on {x.device} but trunk segment {name!r} is on {p.device}")

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mode: str = "dynamic", return_details: bool = False):
        """Final labels (N,) int64; with return_details, a CascadeOutput (exit stage and probabilities)."""
        self._check_input(x)
        if mode == "dynamic":
            out = self._predict_dynamic(x, return_details)
        elif mode == "static":
            out = self._predict_static(x, return_details)
        else:
            raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
        return out if return_details else out.labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)

    def _new_output(self, N: int, device, details: bool) -> CascadeOutput:
        labels = torch.full((N,), -1, dtype=torch.int64, device=device)
        exit_stage = torch.full((N,), -1, dtype=torch.int64, device=device)
        return CascadeOutput(labels, exit_stage, {} if details else None)

    def _record_probs(self, out: CascadeOutput, name: str, rows: torch.Tensor, p: torch.Tensor, N: int,
                      valid: torch.Tensor | None = None) -> None:
        if out.probs is None:
            return
        if name not in out.probs:
            out.probs[name] = torch.full((N + (valid is not None), p.shape[1]), float("nan"), device=p.device)
        buf = out.probs[name]
        if valid is not None:
            p = torch.where(valid[:, None], p, buf[rows])
        buf.index_copy_(0, rows, p.to(buf.dtype))

    def _node_input(self, node, x: torch.Tensor, x_rows: torch.Tensor | None, feats: dict) -> torch.Tensor:
        """The input of node's module for its rows: the cascade's input (rows x_rows, None: all) or its
        tap's features. Segments deeper than anything computed above the node run here, from the deepest
        point computed (feats: segment id -> features of the node's rows, in its row order); the ones its
        descendants need are added to feats."""
        p = self.plan[node.name]
        if p.reads < 0:
            h = x if x_rows is None else routing.gather_rows(x, x_rows, backend=self.backend)
        else:
            h = feats[p.reads]
        for k in p.run:
            h = call_segment(self.trunk[self.segments[k]], h, self.segments[k])
            if k in p.keep:
                feats[k] = h
        return h

    def _child_feats(self, node, b: int, feats: dict, pos: torch.Tensor) -> dict:
        """The features child b of node receives: rows pos (in node's row order) of those it needs."""
        return {k: routing.gather_rows(feats[k], pos, backend=self.backend) for k in self.plan[node.name].carry[b]}

    def _padded(self, rows: torch.Tensor) -> torch.Tensor:
        """rows followed by copies of its last to the row bucket of its length (see row_buckets)."""
        n = rows.shape[0]
        m = row_bucket(n, self.row_buckets)
        return rows if m == n else torch.cat([rows, rows[-1:].expand(m - n)])

    def _predict_dynamic(self, x: torch.Tensor, details: bool) -> CascadeOutput:
        N = x.shape[0]
        out = self._new_output(N, x.device, details)
        level = [(self.root, None, {})]  # (node, original row ids or None for all rows, trunk features)
        while level:
            pending, counts = [], []
            for node, rows, feats in level:
                # rows padded to the row bucket: the module's outputs on the padding rows are dropped
                h = self._node_input(node, x, None if rows is None else self._padded(rows), feats)
                ids = torch.arange(N, device=x.device) if rows is None else rows
                node_id = self.node_names.index(node.name)
                if isinstance(node, Ensemble):
                    lab, p = node.classify(h, self.backend)
                    lab, p = lab[:ids.shape[0]], p[:ids.shape[0]]  # less the padding rows
                    out.labels.index_copy_(0, ids, lab)
                    out.exit_stage.index_fill_(0, ids, node_id)
                    self._record_probs(out, node.name, ids, p.float(), N)
                    continue
                logits = node.outputs(h)[:ids.shape[0]]
                self._record_probs(out, node.name, ids, node.rule.probs(logits), N)
                branch = node.rule.decide(logits, self.backend)
                part = routing.partition(branch, len(node.kids), backend=self.backend)
                pending.append((node, node_id, ids, part, feats))
                counts.append(part.counts)
            if not pending:
                break
            host_counts = torch.cat(counts).tolist()  # the one host sync of this level
            level, k = [], 0
            for node, node_id, ids, part, feats in pending:
                sorted_ids = ids[part.order]
                start = 0
                for b, child in enumerate(node.kids):
                    n = host_counts[k]
                    k += 1
                    if n == 0:
                        continue
                    sub = sorted_ids[start:start + n]
                    if isinstance(child, Leaf):
                        out.labels.index_fill_(0, sub, child.label)
                        out.exit_stage.index_fill_(0, sub, node_id)
                    else:
                        level.append((child, sub, self._child_feats(node, b, feats,
                                                                       self._padded(part.order[start:start + n]))))
                    start += n
        return out

    def _predict_static(self, x: torch.Tensor, details: bool) -> CascadeOutput:
        """Fixed shapes everywhere: each node gets N row slots, the first count of them valid. Slot
        row id N is a dummy row that absorbs the writes of invalid slots. Trunk features travel with the
        slots (gathered by slot position, N rows each), so a node resumes the trunk on its N slots."""
        N, dev = x.shape[0], x.device
        labels = torch.full((N + 1,), -1, dtype=torch.int64, device=dev)
        exit_stage = torch.full((N + 1,), -1, dtype=torch.int64, device=dev)
        out = CascadeOutput(labels, exit_stage, {} if details else None)
        slots = torch.arange(N, device=dev)
        dummy = torch.full((N,), N, dtype=torch.int64, device=dev)
        queue = [(self.root, slots, torch.ones(N, dtype=torch.bool, device=dev), {})]

        def write(buf, rows, valid, value):
            buf.index_copy_(0, rows, torch.where(valid, value, buf[rows]))

        while queue:
            node, rows, valid, feats = queue.pop(0)
            h = self._node_input(node, x, rows.clamp(max=max(N - 1, 0)) if N > 0 else None, feats)
            node_id = self.node_names.index(node.name)
            if isinstance(node, Ensemble):
                lab, p = node.classify(h, self.backend)
                write(labels, rows, valid, lab)
                write(exit_stage, rows, valid, torch.full_like(lab, node_id))
                self._record_probs(out, node.name, rows, p.float(), N, valid)
                continue
            logits = node.outputs(h)
            self._record_probs(out, node.name, rows, node.rule.probs(logits), N, valid)
            nb = len(node.kids)
            branch = node.rule.decide(logits, self.backend)
            branch = torch.where(valid, branch, torch.full_like(branch, nb))  # invalid slots: a discard branch
            part = routing.partition(branch, nb + 1, backend=self.backend)
            sorted_rows = torch.cat([rows[part.order], dummy])
            positions = torch.cat([part.order, part.order])  # slot positions; past the count any valid one
            for b, child in enumerate(node.kids):
                take = part.offsets[b] + slots
                child_rows = sorted_rows[take]
                child_valid = slots < part.counts[b]
                if isinstance(child, Leaf):
                    write(labels, child_rows, child_valid, torch.full_like(child_rows, child.label))
                    write(exit_stage, child_rows, child_valid, torch.full_like(child_rows, node_id))
                else:
                    queue.append((child, child_rows, child_valid, self._child_feats(node, b, feats, positions[take])))
        out.labels, out.exit_stage = labels[:N], exit_stage[:N]
        if out.probs is not None:
            out.probs = {k: v[:N] for k, v in out.probs.items()}
        return out

    def capture(self, batch_size: int, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A CUDA graph of predict(mode="static") for inputs shaped like `example` with `batch_size`
        rows: returns f(x) -> labels (a fresh tensor each call). CUDA only."""
        if example.device.type != "cuda":
            raise ValueError("capture needs CUDA tensors (CUDA graphs); use predict(mode='static') elsewhere")
        static_x = torch.empty((batch_size, *example.shape[1:]), dtype=example.dtype, device=example.device)
        static_x.copy_(example[:1].expand_as(static_x))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: lazy initialisation and kernel autotuning stay out of the graph
                self.predict(static_x, mode="static")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.predict(static_x, mode="static")

        def run(x: torch.Tensor) -> torch.Tensor:
            if x.shape != static_x.shape:
                raise ValueError(f"the captured cascade takes inputs of shape {tuple(static_x.shape)}, got "
                                 f"{tuple(x.shape)}")
            static_x.copy_(x)
            graph.replay()
            return static_out.clone()

        return run

    # -----------------------------------------------------------------------------------------
    # evaluation helpers

    def path(self, name: str) -> list[str]:
        """The node names from the root to node `name` (inclusive)."""
        if name not in self._paths:
            raise ValueError(f"unknown stage {name!r}; stages: {self.node_names}")
        return list(self._paths[name])

    def reached_mask(self, exit_stage: torch.Tensor, name: str) -> torch.Tensor:
        """Bool (N,): rows whose decision path passed through node `name`."""
        if name not in self._paths:
            raise ValueError(f"unknown stage {name!r}; stages: {self.node_names}")
        reached = torch.zeros_like(exit_stage, dtype=torch.bool)
        for i, n in enumerate(self.node_names):
            if name in self._paths[n]:
                reached |= exit_stage == i
        return reached

    def stage_targets(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per stage, the branch (class, for an ensemble) that leads to each row's true final label,
        -1 where that label is not under the stage. Where several branches lead to it (a gate's NONE leaf and
        the flat model behind it; a confident exit and the stage after it) the branch of its leaf counts."""
        labels = labels.to(torch.int64)
        targets = {}
        for node in self.nodes:
            t = torch.full_like(labels, -1)
            if isinstance(node, Ensemble):
                for c, lab in enumerate(node.label_table.tolist()):
                    t[labels == lab] = c
            else:  # a label reachable on several branches: its leaf's branch, else the first subtree holding it
                kids = sorted(enumerate(node.kids), key=lambda bc: not isinstance(bc[1], Leaf))
                for b, child in kids:
                    for lab in self._labels_under(child):
                        t[(labels == lab) & (t < 0)] = b
            targets[node.name] = t
        return targets

    def evaluate(self, x: torch.Tensor, labels: torch.Tensor, mode: str = "dynamic",
                 batch_size: int = 1024) -> EvaluationReport:
        """fastcascade.cascade.evaluate_cascade(self, (x, labels), ...): the cascade's report on true final labels."""
        return evaluate_cascade(self, (x, labels), batch_size=batch_size, mode=mode)

    def extra_repr(self) -> str:
        return f"stages={self.node_names}, num_classes={self.num_classes}"
