"""What fit keeps from epoch to epoch: the history, the best epoch and its weights, early stopping's count
of epochs without improvement (RunState), and the progress it prints."""

from __future__ import annotations

import dataclasses
import uuid

from torch import nn

__all__ = ["LOSS_MONITORS", "MONITORS", "REPORT_MONITORS", "RunState", "progress_bar", "progress_write"]

REPORT_MONITORS = ("macro_f1", "weighted_f1", "accuracy")  # maximised
LOSS_MONITORS = ("val_loss",)  # minimised
MONITORS = REPORT_MONITORS + LOSS_MONITORS


def _weights_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class RunState:
    """What fit carries from epoch to epoch (and saves in its checkpoints for resume)."""

    trainable_at_start: set
    history: list = dataclasses.field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    start: int = 0
    best_state: dict | None = None
    run_id: str | None = None  # one id per run, kept by resume: names which files belong to it

    @classmethod
    def fresh(cls, model: nn.Module) -> RunState:
        """A new run of model: its trainable parameters and weights as they are now, a new run id."""
        return cls(trainable_at_start={n for n, p in model.named_parameters() if p.requires_grad},
                   best_state=_weights_of(model), run_id=uuid.uuid4().hex)

    def keep_current_weights(self, model: nn.Module) -> None:
        self.best_state = _weights_of(model)

    def update(self, record: dict, monitor: str, model: nn.Module) -> tuple[float, bool]:
        """Appends the epoch's record; returns (the monitored value, whether it improves on the best so
        far). The best value, epoch and weights are kept; bad_epochs counts the epochs since."""
        self.history.append(record)
        minimise = monitor in LOSS_MONITORS
        value = record["val_loss"] if minimise else record["val"][monitor]
        best = self.best_value
        improved = best is None or (value < best if minimise else value > best)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, record["epoch"], 0
            self.best_state = _weights_of(model)
        else:
            self.bad_epochs += 1
        return value, improved

    def should_stop(self, patience: int | None) -> bool:
        """Early stopping: `patience` epochs in a row without improvement (never when patience is None)."""
        return patience is not None and self.bad_epochs >= patience


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar of `total` steps, or None when not enabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def progress_write(msg: str) -> None:
    """Print a line without breaking an open tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(msg)
