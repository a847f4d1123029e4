"""What every step of the demo shares: the splits, the device, fit's settings, histories and timings."""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import Subset

from .. import data as fd
from ..train import fit

__all__ = ["LABEL_NAMES", "NUM_LABELS", "STAGE_NAMES", "Run", "blocks_of", "labels_of", "stage_target"]

NUM_LABELS = fd.NUM_MAIN_CLASSES
LABEL_NAMES = list(fd.LABEL_NAMES[:NUM_LABELS])
# the demo's data has no 4-way partitions: RECT is HORZ | VERT
STAGE_NAMES = {k: list(v[:2] if k == "rect" else v) for k, v in fd.STAGE_CLASS_NAMES.items()}


def stage_target(name: str):
    """labels -> the targets of stage `name` (IGNORE_INDEX where a row does not belong to it)."""
    return lambda labels: fd.stage_targets(labels)[name]


def labels_of(ds) -> torch.Tensor:
    return ds.dataset.labels[torch.as_tensor(ds.indices)] if isinstance(ds, Subset) else ds.labels


def blocks_of(ds) -> torch.Tensor:
    """The blocks of a split as float (N, 1, 16, 16) in [0, 1]."""
    b = ds.dataset.blocks[torch.as_tensor(ds.indices)] if isinstance(ds, Subset) else ds.blocks
    return b.float() / 255 if b.dtype == torch.uint8 else b.float()


@dataclass
class Run:
    """One demo run: its arguments and splits, and what its steps record (histories, timings, rows trained on)."""

    args: object
    train: object
    val: object
    test: object
    device: torch.device
    backbone: str
    epochs: int
    amp: torch.dtype | None
    quick: bool
    work: pathlib.Path
    histories: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # training rows seen per model
    warnings: list = field(default_factory=list)  # fit's diagnostics, one entry per warning, with its model
    calibration: dict = field(default_factory=dict)  # Stage-1 model -> temperature, ECE on test before and after

    def fit(self, key: str, model, loss_fn, target: str | None, seed: int, *, train=None, val=None, **kw):
        """fastcascade.fit on the train split (or `train`, e.g. cached features), selected on val; records the
        history, the time and the rows trained on under `key`; returns the model at its best epoch."""
        train = self.train if train is None else train
        val = self.val if val is None else val
        t = time.perf_counter()
        names = (STAGE_NAMES[target] if target in STAGE_NAMES else LABEL_NAMES) if target else LABEL_NAMES
        hist, best = fit(model, loss_fn, train, val, kw.pop("epochs", self.epochs), seed=seed,
                         target_fn=stage_target(target) if target else None, class_names=names,
                         out_dir=self.work / "checkpoints" / key, name=key, device=self.device, amp_dtype=self.amp,
                         progress=self.args.progress, batch_size=kw.pop("batch_size", self.args.batch_size), **kw)
        self.timing[f"train_{key}_s"] = time.perf_counter() - t
        self.histories[key] = hist
        y = labels_of(train) if not isinstance(train, torch.utils.data.TensorDataset) else train.tensors[1]
        n = int((stage_target(target)(y) != fd.IGNORE_INDEX).sum()) if target else len(y)
        self.rows[key] = n * len(hist)
        best_epoch = max(range(len(hist)), key=lambda i: hist[i]["val"]["macro_f1"])
        print(f"  {key}: {len(hist)} epochs in {self.timing[f'train_{key}_s']:.1f} s, best epoch {best_epoch + 1} "
              f"(val macro F1 {hist[best_epoch]['val']['macro_f1']:.4f}) -> {best.relative_to(self.work)}")
        for w in (w for h in hist for w in h.get("warnings", [])):  # fit's diagnostics (printed here even
            self.warnings.append({"model": key, **w})  # without progress bars)
            print(f"    warning ({w['kind']}): {w['message']}")
        return model
