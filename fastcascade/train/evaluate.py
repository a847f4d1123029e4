"""Evaluation: evaluate (a model or a Cascade on a dataset) and validate (fit's per-epoch validation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..cascade import Cascade, flops_per_row
from ..data.labels import STAGE_CLASS_NAMES
from ..metrics import ClassificationReport, EvaluationReport, confusion_matrix
from .batches import kept_rows, loader, num_output_classes, predicted_labels, targets_of
from .checkpoint import unwrap
from .distributed import all_sum, as_count

__all__ = ["evaluate", "validate"]


@torch.no_grad()
def validate(model, loss_fn, val, order, target_fn, batch_size, device, amp_dtype, num_classes, class_names,
              world):
    """(val loss: mean over rows of the batch-mean losses weighted by batch size, ClassificationReport),
    each summed over ranks."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rows = 0
    cm = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    try:
        if order:
            for x, y in loader(val, order, batch_size, 0):
                t = targets_of(y, target_fn)
                keep = kept_rows(t)
                x, t = x[keep].to(device), t[keep].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(x)
                    loss = loss_fn(out, t)
                loss_sum += loss.double() * t.shape[0]
                rows += t.shape[0]
                cm += confusion_matrix(predicted_labels(out.float()), t, num_classes).to(device)
    finally:
        for m, mode in modes.items():
            m.training = mode
    totals = all_sum(torch.stack([loss_sum, as_count(rows, device)]), world, device)
    cm = all_sum(cm, world, device)
    return (totals[0] / totals[1]).item(), ClassificationReport.from_confusion(cm.cpu(), class_names)


def _tensors_of(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        idx = list(range(len(data)))
        xs, ys = zip(*loader(data, idx, 4096, 0)) if idx else ((), ())
        if not xs:
            raise ValueError("data is empty")
        return torch.cat(xs), torch.cat(ys)
    raise TypeError(f"data must be a dataset of (input, label) items or a tuple (inputs, labels), got "
                    f"{type(data).__name__}")


@torch.no_grad()
def evaluate(model_or_cascade: nn.Module, data, *, batch_size: int = 1024, device=None,
             num_classes: int | None = None, target_fn: Callable | None = None,
             class_names: Sequence[str] | None = None, mode: str = "dynamic"):
    """Evaluate a model or a Cascade on data (a dataset of (input, label) items or a tuple (inputs, labels)).

    A model: its predictions (argmax, or logit > 0 for one logit per row) against target_fn(labels)
    (rows with IGNORE_INDEX dropped); returns a fastcascade.metrics.ClassificationReport over
    num_classes (default: the output width, 2 for one logit). A Cascade: labels are final labels;
    the report adds, per stage, the report of the decisions it made on the rows that reached it (its
    branches named as in fastcascade.data.STAGE_CLASS_NAMES for the AV1 stages), the fraction of rows
    reaching it and its standalone vs in-cascade accuracy (Cascade.predict(mode=mode) and
    Cascade.evaluate), with the mean FLOPs per row as routed and per part the fraction of rows that ran
    it; a model's report holds its FLOPs per row, to put next to a cascade's. Returns a fastcascade.metrics.EvaluationReport (accuracy, macro_f1,
    weighted_f1, confusion; .final is the ClassificationReport). Runs in eval mode (restored after),
    on `device` (default: the model's).
    """
    if not isinstance(model_or_cascade, nn.Module):
        raise TypeError(f"model_or_cascade must be an nn.Module or a fastcascade.Cascade, got "
                        f"{type(model_or_cascade).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    model = unwrap(model_or_cascade)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    x, labels = _tensors_of(data)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    modes = {m: m.training for m in model.modules()}
    model.to(device).eval()
    try:
        if isinstance(model, Cascade):
            return _evaluate_cascade(model, x.to(device), labels.to(device), batch_size, class_names, mode)
        t = targets_of(labels, target_fn)
        keep = kept_rows(t)
        x, t = x[keep], t[keep]
        starts = range(0, x.shape[0], batch_size)
        preds = [predicted_labels(model(x[i:i + batch_size].to(device)).float()) for i in starts]
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
        if num_classes is None:
            num_classes = num_output_classes(model(x[:1].to(device)))
        cm = confusion_matrix(pred.cpu(), t.cpu(), num_classes)
        flops = float(flops_per_row(model, x[:1].to(device))) if x.shape[0] else None
        return EvaluationReport(final=ClassificationReport.from_confusion(cm, class_names), flops_per_row=flops,
                                dense_flops_per_row=flops)
    finally:
        for m, m_mode in modes.items():
            m.training = m_mode


def _evaluate_cascade(cascade: Cascade, x, labels, batch_size, class_names, mode) -> EvaluationReport:
    starts = range(0, x.shape[0], batch_size)
    pred = torch.cat([cascade.predict(x[i:i + batch_size], mode=mode) for i in starts])
    cm = confusion_matrix(pred.cpu(), labels.cpu(), cascade.num_classes)
    final = ClassificationReport.from_confusion(cm, class_names)
    ev = cascade.evaluate(x, labels, mode=mode)
    stages = {}
    for node in cascade.nodes:
        cm = ev["confusion"][node.name]
        k = cm.shape[0]
        names = STAGE_CLASS_NAMES.get(node.name)
        stages[node.name] = ClassificationReport.from_confusion(cm, list(names[:k]) if names else None)
    return EvaluationReport(final=final, stages=stages, reached=dict(ev["reached"]),
                            cascade_error=dict(ev["cascade_error"]), flops_per_row=ev["flops_per_row"],
                            dense_flops_per_row=ev["dense_flops_per_row"], parts_reached=dict(ev["parts_reached"]))
