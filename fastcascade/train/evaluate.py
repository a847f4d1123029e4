"""Evaluation: evaluate (a model or a Cascade on a dataset) and validate (fit's per-epoch validation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .._checks import model_input
from ..cascade import Cascade, EvaluationReport, evaluate_cascade, flops_per_row
from ..metrics import ClassificationReport, confusion_matrix
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


def _batches(data, batch_size: int, device: torch.device):
    """(inputs on device, float in [0, 1] for uint8; labels) batches of data, in order."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"data: labels must have one row per input ({x.shape[0]}), got {tuple(y.shape)}")
        parts = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size))
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        parts = loader(data, list(range(len(data))), batch_size, 0)
    else:
        raise TypeError(f"data must be a dataset of (input, label) items or a tuple (inputs, labels), got "
                        f"{type(data).__name__}")
    for xb, yb in parts:  # own names: the slices above read x and y lazily
        xb = xb.to(device)
        yield model_input(xb), torch.as_tensor(yb)


@torch.no_grad()
def evaluate(model_or_cascade: nn.Module, data, *, batch_size: int = 1024, device=None,
             num_classes: int | None = None, target_fn: Callable | None = None,
             class_names: Sequence[str] | None = None, mode: str = "dynamic") -> EvaluationReport:
    """Evaluate a model or a Cascade on data (a dataset of (input, label) items or a tuple (inputs, labels)),
    batch by batch (memory bounded by batch_size rows, not by the split). Returns a
    fastcascade.EvaluationReport (accuracy, macro_f1, weighted_f1, confusion; .final is the
    ClassificationReport).

    A model: its predictions (argmax, or logit > 0 for one logit per row) against target_fn(labels)
    (rows with IGNORE_INDEX dropped), over num_classes (default: the output width, 2 for one logit); the
    report holds its FLOPs per row, to put next to a cascade's. A Cascade: labels are final labels, and
    the report is fastcascade.cascade.evaluate_cascade's (per stage, the report of the decisions it made
    on the rows that reached it, the fraction of rows reaching it, its standalone vs in-cascade accuracy;
    FLOPs per row as routed; mode is Cascade.predict's); class_names default to the cascade's. Runs in
    eval mode (restored after), on `device` (default: the model's).
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
    modes = {m: m.training for m in model.modules()}
    model.to(device).eval()
    try:
        batches = _batches(data, batch_size, device)
        if isinstance(model, Cascade):
            return evaluate_cascade(model, batches, mode=mode, class_names=class_names)
        return _evaluate_model(model, batches, target_fn, num_classes, class_names)
    finally:
        for m, m_mode in modes.items():
            m.training = m_mode


def _evaluate_model(model: nn.Module, batches, target_fn, num_classes, class_names) -> EvaluationReport:
    cm, flops = None, None
    for x, y in batches:
        t = targets_of(y, target_fn)
        keep = kept_rows(t)
        x, t = x[keep.to(x.device)], t[keep].to(x.device)
        if x.shape[0] == 0:
            continue
        out = model(x).float()
        if cm is None:
            num_classes = num_output_classes(out) if num_classes is None else num_classes
            cm = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=x.device)
            flops = float(flops_per_row(model, x[:1]))
        cm += confusion_matrix(predicted_labels(out), t, num_classes)
    if cm is None:  # no row with a target
        if num_classes is None:
            raise ValueError("data holds no row with a target, so num_classes cannot be read off the model's "
                             "output: pass num_classes")
        cm = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    return EvaluationReport(final=ClassificationReport.from_confusion(cm, class_names), flops_per_row=flops,
                            dense_flops_per_row=flops)
