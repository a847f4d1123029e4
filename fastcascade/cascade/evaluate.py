"""The one evaluation path of a cascade: one routed pass and one dense pass per batch, counts kept on the
device and summed over batches, one report at the end.

    report = evaluate_cascade(cascade, (x, labels), batch_size=1024)     # or an iterable of (x, labels)
    report.macro_f1, report.stages["stage2"].f1, report.cascade_error["rect"], report.flops_per_row

fastcascade.evaluate(cascade, dataset) (fastcascade.train) feeds a dataset's batches to it; Cascade.evaluate
is an alias. Memory is bounded by the batch, not the split: per batch the cascade runs once as routed
(Cascade.predict: final labels, exit stages) and once densely (every part on every row: what each stage
decides on rows the cascade did not send it, for its standalone accuracy); only confusion matrices and
counts outlive the batch. FLOPs come from fastcascade.cascade_cost (one extra pass on one row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from .. import routing
from ..metrics import ClassificationReport, confusion_matrix
from .cost import cascade_cost
from .dense import dense_outputs
from .tree import Ensemble

__all__ = ["EvaluationReport", "evaluate_cascade"]


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """What an evaluation returns: the report of the final labels and, for a cascade, per stage the
    report of its decisions (on the rows that reached it and whose true label lies under it), the
    fraction of rows reaching it, and its standalone vs in-cascade accuracy.

    accuracy, macro_f1, weighted_f1 and confusion are the final report's. loss is free for a trainer
    to fill (None otherwise). flops_per_row: the mean FLOPs per row (torch.utils.flop_counter: for a
    cascade as routed, for a model its forward on one row); dense_flops_per_row: a cascade's every part
    on one row (the model's own for a model); parts_reached: per cascade part (trunk segment, stage,
    ensemble member "<name>.<k>") the fraction of rows that ran it. cascade_error[stage]:
    "standalone_accuracy" (the stage's own decision on every row whose truth lies under it) and
    "in_cascade_accuracy" (the final label on those rows); the gap is the error the stages above pass on.
    """

    final: ClassificationReport
    stages: dict[str, ClassificationReport] = dataclasses.field(default_factory=dict)
    reached: dict[str, float] = dataclasses.field(default_factory=dict)
    cascade_error: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    loss: float | None = None
    flops_per_row: float | None = None
    dense_flops_per_row: float | None = None
    parts_reached: dict[str, float] = dataclasses.field(default_factory=dict)

    accuracy = property(lambda self: self.final.accuracy)
    macro_f1 = property(lambda self: self.final.macro_f1)
    weighted_f1 = property(lambda self: self.final.weighted_f1)
    confusion = property(lambda self: self.final.confusion)

    def to_dict(self) -> dict:
        """JSON-serialisable (NaN, for stages no row reached, stays a float: json.dumps writes NaN)."""
        return {"final": self.final.to_dict(), "stages": {k: r.to_dict() for k, r in self.stages.items()},
                "reached": dict(self.reached), "cascade_error": {k: dict(v) for k, v in self.cascade_error.items()},
                "loss": self.loss, "flops_per_row": self.flops_per_row, "dense_flops_per_row": self.dense_flops_per_row,
                "parts_reached": dict(self.parts_reached)}

    def __str__(self) -> str:
        parts = [str(self.final)]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.6g}")
        if self.flops_per_row is not None:
            line = f"FLOPs per row {self.flops_per_row:,.0f}"
            if self.dense_flops_per_row is not None and self.dense_flops_per_row != self.flops_per_row:
                line += f" (every part on every row: {self.dense_flops_per_row:,.0f})"
            parts.append(line)
        for name, rep in self.stages.items():
            line = f"stage {name}: reached {self.reached.get(name, float('nan')):.1%}"
            err = self.cascade_error.get(name)
            if err:
                line += (f", accuracy standalone {err['standalone_accuracy']:.4f}, in cascade "
                         f"{err['in_cascade_accuracy']:.4f}")
            parts += ["", line, str(rep)]
        return "\n".join(parts)


def _batches(data, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, labels = data
        if labels.shape[:1] != x.shape[:1]:
            raise ValueError(f"labels must be (N,) with N = {x.shape[0]} rows of x, got {tuple(labels.shape)}")
        return ((x[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, max(x.shape[0], 1), batch_size))
    if isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, str, bytes)):
        return data
    raise TypeError(f"data must be a tuple (inputs, labels) of tensors or an iterable of such batches, got "
                    f"{type(data).__name__}")


class _Totals:
    """The counts an evaluation sums over batches, on the device (no host sync until the report)."""

    def __init__(self, cascade, device):
        z = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        self.final = z(cascade.num_classes, cascade.num_classes)
        self.exits = z(len(cascade.nodes))
        self.stage = {n.name: z(_width(n), _width(n)) for n in cascade.nodes}
        # per stage: rows reached, rows whose truth lies under it, standalone right, in-cascade right
        self.rows = {n.name: z(4) for n in cascade.nodes}


def _width(node) -> int:
    return len(node.label_table) if isinstance(node, Ensemble) else len(node.kids)


def _check_labels(cascade, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"each batch must be a pair of tensors (inputs, labels), got ({type(x).__name__}, "
                        f"{type(labels).__name__})")
    labels = labels.to(device=x.device, dtype=torch.int64)
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({x.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= cascade.num_classes):
        raise ValueError(f"labels must be in [0, {cascade.num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def _add_batch(cascade, totals: _Totals, x: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
    out = cascade.predict(x, mode=mode, return_details=True)  # the routed pass
    dense = dense_outputs(cascade, x)  # the dense pass: every stage's own decision on every row
    totals.final += confusion_matrix(out.labels, labels, cascade.num_classes, backend=cascade.backend)
    totals.exits += torch.bincount(out.exit_stage, minlength=len(cascade.nodes))
    targets = cascade.stage_targets(labels)
    right = out.labels == labels
    for node in cascade.nodes:
        t = targets[node.name]
        under, reached = t >= 0, out.reached(cascade, node.name)
        if isinstance(node, Ensemble):
            pred = routing.vote(dense[node.name], node.mode, backend=cascade.backend)
        else:
            pred = node.rule.decide(dense[node.name], cascade.backend).to(torch.int64)
        sel = reached & under
        totals.stage[node.name] += confusion_matrix(pred[sel], t[sel], _width(node), backend=cascade.backend)
        totals.rows[node.name] += torch.stack([reached.sum(), under.sum(), ((pred == t) & under).sum(),
                                               (right & under).sum()])


@torch.no_grad()
def evaluate_cascade(cascade, data, *, batch_size: int = 1024, mode: str = "dynamic",
                     class_names: Sequence[str] | None = None) -> EvaluationReport:
    """Evaluate a fastcascade.Cascade against true final labels.

    data: a tuple (x, labels) of tensors (run in batches of batch_size rows) or an iterable of such
    (x, labels) batches (a DataLoader, say); labels are final ids in [0, cascade.num_classes).
    mode: Cascade.predict's ("dynamic" or "static"). class_names name the final labels (default:
    cascade.class_names, else their ids); stage reports name their branches by the stage's branch_names
    (an ensemble's class_names), else by index.

    Returns an EvaluationReport: the final report; per stage the confusion of the decisions it made in
    the cascade (rows that reached it and whose truth lies under it; rows: truth, columns: decision),
    the fraction of rows reaching it, its standalone and in-cascade accuracy; FLOPs per row as routed
    and dense, and per part the fraction of rows that ran it. Rates are NaN where no row counts.
    """
    batches = _batches(data, batch_size)
    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    totals, cost = None, None
    for x, labels in batches:
        labels = _check_labels(cascade, x, labels)
        if totals is None:
            totals = _Totals(cascade, x.device)
        if x.shape[0] == 0:
            continue
        if cost is None:
            cost = cascade_cost(cascade, x)
        _add_batch(cascade, totals, x, labels, mode)
    if totals is None:
        raise ValueError("data holds no batch")
    return _report(cascade, totals, cost, class_names)


def _rate(num: int, den: int) -> float:
    return num / den if den else float("nan")


def _report(cascade, totals: _Totals, cost, class_names) -> EvaluationReport:
    names = cascade.class_names if class_names is None else class_names
    final = ClassificationReport.from_confusion(totals.final, names)
    n = int(totals.final.sum())
    stages, reached, errors = {}, {}, {}
    for node in cascade.nodes:
        branch_names = node.class_names if isinstance(node, Ensemble) else node.branch_names
        stages[node.name] = ClassificationReport.from_confusion(totals.stage[node.name], branch_names)
        hit, under, alone, inside = totals.rows[node.name].tolist()
        reached[node.name] = _rate(hit, n)
        errors[node.name] = {"standalone_accuracy": _rate(alone, under), "in_cascade_accuracy": _rate(inside, under)}
    if cost is None:  # no rows
        flops = dense = float("nan")
        parts = {}
    else:
        exits = totals.exits.cpu()
        flops, dense, parts = cost.mean_flops_from_counts(exits), float(cost.dense), cost.reached_from_counts(exits)
    return EvaluationReport(final=final, stages=stages, reached=reached, cascade_error=errors,
                            flops_per_row=flops, dense_flops_per_row=dense, parts_reached=parts)
