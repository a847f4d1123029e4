"""Classification metrics: a fused, deterministic confusion matrix and the scores derived from it.

    cm = confusion_matrix(pred, target, num_classes=8, ignore_index=-100)   # int64 (C, C), on the device
    report = ClassificationReport.from_confusion(cm, class_names=names)    # P/R/F1, accuracy, IoU, ...
    print(report)                                                          # a table like scikit-learn's
    json.dumps(report.to_dict())

The confusion matrix is one op (fastcascade::confusion_matrix: C++ CPU, CUDA, Triton) that reads pred
and target once and never synchronises with the host, so it can be accumulated batch by batch
(cm += confusion_matrix(...)) and summed across ranks (dist.all_reduce(cm)) before one report at the
end. Counts are integers: every backend gives the same matrix, whatever the scheduling.

Scores follow scikit-learn with zero_division=0: per class, precision = tp / predicted, recall =
tp / support, f1 = 2 tp / (support + predicted), iou = tp / (support + predicted - tp), each 0 where
its denominator is 0. Macro averages run over the classes present in target or prediction (support +
predicted > 0), as scikit-learn's averages over unique_labels(y_true, y_pred) and segmentation's mIoU
do; weighted averages weigh each class by its support.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import _ops, reference
from ._checks import value_checks_on

__all__ = ["IGNORE_INDEX", "ClassificationReport", "classification_report", "confusion_matrix"]

# The target id that losses, metrics and training skip: F.cross_entropy's default ignore_index.
IGNORE_INDEX = -100

_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _int_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor of class ids (int64, int32, int16, int8, uint8 or bool), "
                         f"got dtype {t.dtype}")
    return t


def _num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, torch.SymInt)):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if not 1 <= num_classes <= 46340:
        raise ValueError(f"num_classes must be in [1, 46340], got {num_classes}")
    return num_classes


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None, *,
                     backend: str = "auto") -> torch.Tensor:
    """int64 (C, C) counts on pred's device: cm[t, p] = #{i : target_i = t, pred_i = p}; rows are the
    target, columns the prediction (scikit-learn's convention). No host sync, deterministic.

    Args:
        pred: predicted class ids, any shape (e.g. (N,) labels or (B, H, W) segmentation maps);
            int64 / int32 (read in place) or int16 / int8 / uint8 / bool (converted to int32 first).
        target: true class ids, the shape of pred, same kinds of dtype.
        num_classes: C, in [1, 46340].
        ignore_index: elements whose target equals it are skipped (its pred is not looked at).
    Ids outside [0, C) (other than ignored targets) raise a ValueError on the CPU. On CUDA (no sync)
    such elements are skipped; FASTCASCADE_CHECK=1 raises there too.
    """
    _int_tensor(pred, "pred")
    _int_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    C = _num_classes(num_classes)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    backend = _ops.resolve_backend(backend, pred.device)
    if backend != "cpu" and value_checks_on(pred):  # the C++ CPU kernel checks in its own pass
        kept = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        note = f" (ignore_index = {ignore_index})" if ignore_index is not None else ""
        for t, name in ((target, "target"), (pred, "pred")):
            bad = kept & ((t < 0) | (t >= C))
            if bool(bad.any()):
                raise ValueError(f"{name} holds ids outside [0, num_classes = {C}){note}: "
                                 f"{t[bad].unique()[:8].tolist()}")
    if backend == "torch":
        return reference.confusion_matrix(pred, target, C, ignore_index)
    pred, target = (t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32) for t in (pred, target))
    op = _ops.op("confusion_matrix", backend)
    if backend != "cpu" or torch.compiler.is_compiling():
        return op(pred, target, C, ignore_index)
    try:
        return op(pred, target, C, ignore_index)
    except RuntimeError as e:  # ids out of range, found by the kernel's single pass: the API's error type
        if "outside [0, num_classes" in str(e):
            raise ValueError(str(e)) from None
        raise


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (scikit-learn's zero_division=0)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _mean_over(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(x[mask].sum() / n) if n else 0.0


@dataclasses.dataclass(frozen=True)
class ClassificationReport:
    """Scores of a C-class confusion matrix (rows = target, columns = prediction), on the CPU.

    Per class (float64 (C,) tensors, 0 where undefined): precision = tp / predicted, recall =
    tp / support, f1 = 2 tp / (support + predicted) (the harmonic mean of the two), iou (Jaccard) =
    tp / (support + predicted - tp), dice = 2 tp / (support + predicted) (equal to f1 for hard
    labels; kept under its segmentation name). support: int64 (C,) row sums.
    accuracy = trace / total. macro_* and miou average over the classes present in target or
    prediction (support + predicted > 0; scikit-learn's labels=None); weighted_f1 weighs f1 by support.
    Every scalar is 0.0 when the matrix is empty.
    """

    confusion: torch.Tensor
    support: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    iou: torch.Tensor
    dice: torch.Tensor
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    miou: float
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @classmethod
    def from_confusion(cls, cm: torch.Tensor, class_names: Sequence[str] | None = None) -> ClassificationReport:
        """The report of an integer confusion matrix cm (C, C) (rows = target), e.g. the sum of
        confusion_matrix over batches or ranks. Copies cm to the CPU (one host transfer)."""
        if not isinstance(cm, torch.Tensor):
            raise TypeError(f"cm must be a torch.Tensor, got {type(cm).__name__}")
        if cm.dim() != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
            raise ValueError(f"cm must be a square (C, C) matrix with C >= 1, got shape {tuple(cm.shape)}")
        if cm.is_floating_point() or cm.is_complex() or cm.dtype == torch.bool:
            raise ValueError(f"cm must hold integer counts, got dtype {cm.dtype}")
        cm = cm.detach().to("cpu", torch.int64)
        if bool((cm < 0).any()):
            raise ValueError("cm must hold counts >= 0")
        C = cm.shape[0]
        names = _class_names(class_names, C)
        support = cm.sum(1)
        predicted = cm.sum(0)
        tp = cm.diagonal().double()
        s, p = support.double(), predicted.double()
        precision, recall = _div(tp, p), _div(tp, s)
        f1 = _div(2 * tp, s + p)
        iou = _div(tp, s + p - tp)
        present = (support + predicted) > 0
        total = int(support.sum())
        return cls(
            confusion=cm, support=support, precision=precision, recall=recall, f1=f1, iou=iou, dice=f1.clone(),
            accuracy=float(tp.sum() / total) if total else 0.0,
            macro_precision=_mean_over(precision, present), macro_recall=_mean_over(recall, present),
            macro_f1=_mean_over(f1, present), weighted_f1=float((f1 * s).sum() / total) if total else 0.0,
            miou=_mean_over(iou, present), class_names=names)

    def to_dict(self) -> dict:
        """JSON-serialisable: the scalars, per-class scores keyed by class name, the matrix as lists."""
        per_class = {
            name: {"precision": float(self.precision[c]), "recall": float(self.recall[c]), "f1": float(self.f1[c]),
                   "iou": float(self.iou[c]), "dice": float(self.dice[c]), "support": int(self.support[c])}
            for c, name in enumerate(self.class_names)}
        return {
            "num_classes": self.num_classes, "class_names": list(self.class_names), "accuracy": self.accuracy,
            "macro_precision": self.macro_precision, "macro_recall": self.macro_recall, "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1, "miou": self.miou, "support": int(self.support.sum()),
            "per_class": per_class, "confusion": self.confusion.tolist()}

    def __str__(self) -> str:
        width = max(len("weighted avg"), *(len(n) for n in self.class_names))
        head = f"{'':>{width}}  precision    recall  f1-score       iou   support"
        lines = [head, ""]
        for c, name in enumerate(self.class_names):
            lines.append(f"{name:>{width}}  {self.precision[c]:9.4f} {self.recall[c]:9.4f} {self.f1[c]:9.4f} "
                         f"{self.iou[c]:9.4f} {int(self.support[c]):9d}")
        total = int(self.support.sum())
        s = self.support.double()
        weighted = [float((x * s).sum() / total) if total else 0.0 for x in (self.precision, self.recall)]
        macro = f"{self.macro_precision:9.4f} {self.macro_recall:9.4f} {self.macro_f1:9.4f} {self.miou:9.4f}"
        weighted = f"{weighted[0]:9.4f} {weighted[1]:9.4f} {self.weighted_f1:9.4f} {'':9}"
        lines += ["",
                  f"{'accuracy':>{width}}  {'':9} {'':9} {self.accuracy:9.4f} {'':9} {total:9d}",
                  f"{'macro avg':>{width}}  {macro} {total:9d}",
                  f"{'weighted avg':>{width}}  {weighted} {total:9d}"]
        return "\n".join(lines)


def _class_names(class_names, C: int) -> tuple[str, ...]:
    if class_names is None:
        return tuple(str(c) for c in range(C))
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a sequence of {C} strings, got {type(class_names).__name__}")
    names = tuple(str(n) for n in class_names)
    if len(names) != C:
        raise ValueError(f"class_names must name each of the {C} classes, got {len(names)} names")
    return names


def classification_report(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                          class_names: Sequence[str] | None = None, ignore_index: int | None = None, *,
                          backend: str = "auto") -> ClassificationReport:
    """ClassificationReport.from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))."""
    if class_names is not None:
        _class_names(class_names, _num_classes(num_classes))  # before any kernel runs
    cm = confusion_matrix(pred, target, num_classes, ignore_index, backend=backend)
    return ClassificationReport.from_confusion(cm, class_names)

