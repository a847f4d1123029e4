"""fit's training diagnostics: the silent failures a finished run can hide, found from its history and
recorded in it (each epoch's record holds a "warnings" list), so they are in history.json and survive
resume.

* "collapse": one class takes more than `collapse_share` of an epoch's val predictions (a model that
  predicts one class for almost every row);
* "best_epoch_first": at the end of a run of several epochs, its best epoch is the first (later epochs
  never improved on it: a learning rate too high, or overfitting from the start);
* "drop_after_unfreeze": in the first epoch after the frozen-backbone epochs, the monitored value got
  worse by more than `unfreeze_drop` (the backbone's learning rate destroys what the frozen phase built).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

from .history import LOSS_MONITORS

__all__ = ["Diagnostics", "end_of_run_warnings", "epoch_warnings"]


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """Thresholds of fit's training diagnostics (fit's `diagnostics` argument).

    Attributes:
        collapse_share: warn ("collapse") when one class takes more than this share of an epoch's val
            predictions; a number in (0, 1], or None for no check. Default 0.9. On a val set where one
            class truly holds more than this share, raise it (the warning states the class's true share).
        first_best: warn ("best_epoch_first") at the end of a run of more than one epoch whose best epoch
            is the first. Default True.
        unfreeze_drop: warn ("drop_after_unfreeze") when the first epoch after the frozen ones
            (freeze_epochs) is worse than the last frozen one by more than this margin, in the monitored
            value's units (a fall of macro_f1 / weighted_f1 / accuracy, a rise of val_loss); a number >= 0,
            or None for no check. Default 0.05.
    Raises: ValueError naming the field for a value outside these ranges.
    """

    collapse_share: float | None = 0.9
    first_best: bool = True
    unfreeze_drop: float | None = 0.05

    def __post_init__(self):
        share = self.collapse_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, numbers.Real)
                                  or not 0 < share <= 1):
            raise ValueError(f"diagnostics: collapse_share must be None or a number in (0, 1], got {share!r}")
        if not isinstance(self.first_best, bool):
            raise ValueError(f"diagnostics: first_best must be True or False, got {self.first_best!r}")
        drop = self.unfreeze_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, numbers.Real)
                                 or not math.isfinite(drop) or drop < 0):
            raise ValueError(f"diagnostics: unfreeze_drop must be None or a finite number >= 0, got {drop!r}")

    @classmethod
    def of(cls, value) -> Diagnostics:
        """fit's `diagnostics` argument as Diagnostics: None or True (the defaults), False (every check
        off), a Diagnostics, or a mapping of its fields. ValueError naming diagnostics otherwise."""
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(collapse_share=None, first_best=False, unfreeze_drop=None)
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(map(str, value)) - fields)
            if unknown:
                raise ValueError(f"diagnostics: unknown entries {unknown}; expected some of {sorted(fields)}")
            return cls(**value)
        raise ValueError(f"diagnostics must be None, True, False, a fastcascade.train.Diagnostics or a dict of "
                         f"its fields, got {type(value).__name__}")


def _value(record: Mapping, monitor: str) -> float:
    return record["val_loss"] if monitor in LOSS_MONITORS else record["val"][monitor]


def _collapse(diag: Diagnostics, record: Mapping) -> list[dict]:
    cm = record.get("val", {}).get("confusion")
    if diag.collapse_share is None or not cm:
        return []
    predicted = [sum(row[c] for row in cm) for c in range(len(cm))]  # rows: truth, columns: prediction
    total = sum(predicted)
    if total == 0:
        return []
    c = max(range(len(predicted)), key=lambda k: predicted[k])
    share = predicted[c] / total
    if share <= diag.collapse_share:
        return []
    names = record["val"].get("class_names") or [str(k) for k in range(len(cm))]
    true_share = sum(cm[c]) / total
    return [{"kind": "collapse", "epoch": record["epoch"], "class": names[c], "share": share,
             "true_share": true_share, "threshold": diag.collapse_share,
             "message": f"epoch {record['epoch']}: {share:.1%} of the val predictions are {names[c]!r} (its "
                        f"share of the val labels: {true_share:.1%}; threshold {diag.collapse_share:.0%}): the "
                        f"model may have collapsed to one class"}]


def _drop_after_unfreeze(diag: Diagnostics, record: Mapping, previous: Mapping | None, monitor: str) -> list[dict]:
    if diag.unfreeze_drop is None or previous is None or record.get("frozen") or not previous.get("frozen"):
        return []
    before, after = _value(previous, monitor), _value(record, monitor)
    worse = after - before if monitor in LOSS_MONITORS else before - after
    if not worse > diag.unfreeze_drop:
        return []
    verb = "rose" if monitor in LOSS_MONITORS else "dropped"
    return [{"kind": "drop_after_unfreeze", "epoch": record["epoch"], "monitor": monitor, "before": before,
             "after": after, "drop": worse, "threshold": diag.unfreeze_drop,
             "message": f"epoch {record['epoch']}, the first after unfreezing the backbone: val {monitor} {verb} "
                        f"from {before:.4f} to {after:.4f} (by more than {diag.unfreeze_drop:g}); the backbone's "
                        f"learning rate may be too high for the pretrained weights"}]


def epoch_warnings(diag: Diagnostics, history: list, monitor: str) -> list[dict]:
    """The warnings of the last record of history (the epoch just run): collapse, drop after unfreezing."""
    record = history[-1]
    previous = history[-2] if len(history) > 1 else None
    return _collapse(diag, record) + _drop_after_unfreeze(diag, record, previous, monitor)


def end_of_run_warnings(diag: Diagnostics, history: list, best_epoch: int | None, monitor: str) -> list[dict]:
    """The warnings about the run as a whole, at its last epoch: its best epoch is the first of several."""
    if not diag.first_best or len(history) < 2 or best_epoch != history[0]["epoch"]:
        return []
    n = len(history)
    return [{"kind": "best_epoch_first", "epoch": history[-1]["epoch"], "best_epoch": best_epoch, "epochs": n,
             "monitor": monitor,
             "message": f"the best epoch (val {monitor} {_value(history[0], monitor):.4f}) is the first of {n}: "
                        f"no later epoch improved on it (a learning rate too high, or overfitting from the "
                        f"start?)"}]
