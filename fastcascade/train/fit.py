"""fit: one AdamW training loop over a map-style dataset, with validation, checkpoints and exact resume.

The loop reads top to bottom here; each of its steps lives in one module: sampling.py (which rows each
epoch draws, in which order), step.py (optimizer, schedule, freeze phase, one epoch of training steps),
evaluate.validate (the validation pass), history.py (the best epoch, early stopping, progress lines) and
resume.py (the checkpoint files of each epoch, and resuming from them).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .._checks import device_arg, number_arg
from .batches import kept_rows, labels_of, loader, targets_of
from .diagnostics import Diagnostics, end_of_run_warnings, epoch_warnings
from .distributed import setup_distributed
from .evaluate import validate
from .history import MONITORS, RunState, progress_bar, progress_write
from .resume import Checkpointing, RunFiles
from .sampling import Sampling
from .step import SCHEDULES, make_optimizer, make_scheduler, output_width, set_phase, train_epoch

__all__ = ["fit"]


def fit(model: nn.Module, loss_fn: Callable, train: Dataset, val: Dataset, epochs: int, *, lr: float = 1e-3,
        param_groups=None, weight_decay: float = 0.01, schedule: str | None = "cosine",
        freeze_epochs: int = 0, monitor: str = "macro_f1", patience: int | None = None,
        amp_dtype: torch.dtype | None = None, grad_clip: float | None = None, sampler: str | None = None,
        beta: float = 0.9999, class_factors=None, batch_size: int = 256, eval_batch_size: int = 1024,
        target_fn: Callable | None = None, augment: Callable | None = None, device=None,
        out_dir: str | os.PathLike | None = None, seed: int = 0, progress: bool = True,
        resume: str | os.PathLike | None = None, num_classes: int | None = None,
        class_names: Sequence[str] | None = None, checkpoint_every: int | None = None, num_workers: int = 0,
        name: str = "fit", diagnostics=None) -> tuple[list[dict], pathlib.Path | None]:
    """Train model with AdamW; returns (history, path of the best checkpoint or None without out_dir).

    Each step: a batch of (inputs, labels) from `train`; ``augment(inputs, labels)`` (e.g.
    fastcascade.data.RandomDihedral; labels are still dataset labels); ``targets = target_fn(labels)``
    (e.g. ``lambda y: fastcascade.data.stage_targets(y)["rect"]``); ``loss_fn(model(inputs), targets)``.
    Rows whose target is IGNORE_INDEX (-100) are dropped before sampling, so a stage trains on the rows
    that reach it. When augment returns floating 2-D labels (soft targets, e.g. mixup) they go to
    loss_fn as they are. Predictions: argmax of the logits, or logit > 0 for one logit per row.

    Args:
        lr: learning rate of the single group (param_groups=None), and AdamW's default.
        param_groups: None (all parameters, lr), a dict {"adapter", "head", "backbone"} -> lr (passed to
            fastcascade.param_groups with weight_decay), or a list of optimizer groups.
        schedule: "cosine" (per-step CosineAnnealingLR to 0), "onecycle" (per-step OneCycleLR peaking at each
            group's lr) or None.
        freeze_epochs: the first freeze_epochs epochs run with fastcascade.freeze_backbone(model) (adapters
            and heads train); then the requires_grad flags the model came with are restored.
        monitor: "macro_f1", "weighted_f1", "accuracy" (maximised) or "val_loss" (minimised); picks the
            best checkpoint and drives early stopping after `patience` epochs without improvement.
        amp_dtype: None or torch.bfloat16: forward and loss under torch.autocast (bf16 needs no loss scaling).
        grad_clip: max global gradient norm (torch.nn.utils.clip_grad_norm_), or None.
        sampler: None (a seeded shuffle), "class_balanced" (rows weighted by the effective-number class
            weight with `beta`) or "oversample" (1 / class count): torch WeightedRandomSampler, with
            replacement, one epoch = as many rows as the training set, from a generator seeded by `seed`.
        class_factors: per-class factors multiplying each training row's sampling weight (the sampler's,
            or 1 per row when sampler is None, which then draws with replacement too): a mapping {class
            name or index: factor} (names resolve through class_names; unnamed classes keep 1), or a (C,)
            tensor, C = num_classes or the model's output width. E.g. ``{"HORZ_B": 5, "VERT_A": 5,
            "HORZ_A": 3, "VERT_B": 3}`` with class_names. Finite and >= 0 (0 leaves a class out, not all
            0); ValueError naming class_factors otherwise, for an unknown name or an index out of range.
        out_dir: a folder (created if missing) where rank 0 writes, every epoch, last.pt with
            save_checkpoint (checksummed, verified on a fixed batch of val inputs), then copies of it as
            best.pt when the epoch improved and epoch-NNNN.pt every checkpoint_every epochs, then
            history.json, each atomically. last.pt is the commit point and carries the best weights, so
            a run killed at any moment resumes from last.pt with the right best weights. While fit runs
            it holds a lock on the folder (.fastcascade.lock; released when the process ends in any
            way): a second fit on the same folder raises RuntimeError instead of interleaving files.
        resume: a checkpoint written by fit (last.pt or epoch-NNNN.pt): continues with the epoch after
            it, exactly as the uninterrupted run (model, optimizer, schedule, history, early-stopping
            state, the best weights so far and the RNG states of torch, numpy, python, the sampler and
            the augmentation's generator are restored). Pass the same arguments as the original run.
            It may lie in another folder than out_dir, or in a folder that was moved: nothing is looked
            up by a stored path. out_dir/best.pt is made to hold the run's best epoch. Resuming a
            finished run (its checkpoint at `epochs`, or stopped early) trains nothing: it brings
            out_dir's best.pt and history.json in line with the checkpoint (a UserWarning says what it
            rewrote) and returns the run's history, the model at its best epoch. This is the repair of a
            run killed in its final epoch between last.pt and best.pt.
        num_classes, class_names: of the validation report (default: the model's output width, 2 for
            one logit).
        seed: seeds torch, numpy, python and the sampler: the same seed gives the same run, bitwise.
        batch_size, eval_batch_size: rows per training step (per rank) and per validation batch.
        num_workers: DataLoader workers (0: batches are read in this process, which for tensor-backed
            datasets is one indexing op per batch). name: the label of progress lines.
        diagnostics: the thresholds of the training diagnostics, a fastcascade.train.Diagnostics or a dict
            of its fields (None: the defaults; False: none). fit warns when one class takes more than
            collapse_share (0.9) of an epoch's val predictions ("collapse"), when the best epoch of a run
            of several is the first ("best_epoch_first", at the last epoch), and when the first epoch after
            freeze_epochs is worse than the last frozen one by more than unfreeze_drop (0.05, in the
            monitored value's units; "drop_after_unfreeze"). Each warning is a dict (kind, epoch, message
            and its figures) in the "warnings" list of that epoch's history record (so in history.json,
            and kept by resume), and a printed line unless progress is False.

    Under torchrun (or an initialised process group) the model is wrapped in DistributedDataParallel,
    each rank trains on its shard of every epoch (DistributedSampler; the weighted samplers draw one
    global order and shard it), the validation confusion matrix and losses are all_reduced, so every
    rank returns the same history, and rank 0 writes the files.

    The history is a list of per-epoch dicts: epoch (1-based), train_loss, val_loss, lr (per group
    name, at the end of the epoch), val (ClassificationReport.to_dict(): per-class precision, recall,
    f1, support; accuracy, macro_f1, weighted_f1, confusion), frozen, seconds, stopped_early, warnings
    (the diagnostics' warnings of that epoch, see `diagnostics`). After fit, model holds
    the weights of the best epoch, and the returned path (out_dir/best.pt) holds them too.

    Arguments are checked before the first step: ValueError naming the argument for, e.g., an out_dir
    that is a file, eval_batch_size=0, lr=inf or NaN, or a device torch does not know or this machine
    does not have. The sampling keywords (sampler, beta, batch_size, num_workers, seed, class_factors) are
    checked and carried as a fastcascade.train.Sampling, the checkpoint keywords (out_dir, checkpoint_every,
    resume) as a fastcascade.train.Checkpointing.
    """
    _check_fit_args(model, loss_fn, train, val, epochs, lr, weight_decay, schedule, freeze_epochs, monitor,
                    patience, amp_dtype, grad_clip, eval_batch_size)
    sampling = Sampling(sampler, beta, batch_size, num_workers, seed, class_factors)
    diag = Diagnostics.of(diagnostics)
    files = Checkpointing(out_dir, checkpoint_every, resume)
    rank, world, device = setup_distributed(device_arg(device) if device is not None else None)
    with files.lock(f"fastcascade fit {name!r}", rank):
        gen = sampling.seed_all()
        # rows with a target; everything downstream indexes into these
        train_targets, train_idx = _rows_with_targets(train, target_fn, "train")
        _, val_idx = _rows_with_targets(val, target_fn, "val")
        model.to(device)
        run = RunState.fresh(model)
        probe = next(iter(loader(val, val_idx[:32].tolist(), 32, 0)))[0].to(device)
        width = output_width(model, probe)  # run once either way: a malformed output fails before training
        weights = sampling.row_weights(train_targets[train_idx], num_classes or width, class_names)
        optimizer = make_optimizer(model, lr, param_groups, weight_decay)
        steps = sampling.steps_per_epoch(train_idx.numel(), world)
        scheduler = make_scheduler(optimizer, schedule, steps * epochs)
        saver = RunFiles(files, model, optimizer, scheduler, probe, gen, augment, monitor, rank, world)
        if resume is not None:
            run = saver.resume(epochs)
            model.to(device)
            if run.start >= epochs and progress and rank == 0:
                progress_write(f"{name}: resumed a finished run (epoch {len(run.history)}, best epoch "
                               f"{run.best_epoch}); nothing to train")
        loop = _Loop(model=model, loss_fn=loss_fn, train=train, val=val, train_idx=train_idx, val_idx=val_idx,
                     weights=weights, sampling=sampling, gen=gen, optimizer=optimizer, scheduler=scheduler,
                     target_fn=target_fn, augment=augment, device=device, amp_dtype=amp_dtype,
                     grad_clip=grad_clip, eval_batch_size=eval_batch_size, num_classes=num_classes or width,
                     class_names=class_names, epochs=epochs, freeze_epochs=freeze_epochs, monitor=monitor,
                     patience=patience, rank=rank, world=world, progress=progress, name=name,
                     diagnostics=diag)
        loop.run(run, saver if files.out_dir is not None else None)
        model.load_state_dict(run.best_state)
        return run.history, files.best_path


def _check_fit_args(model, loss_fn, train, val, epochs, lr, weight_decay, schedule, freeze_epochs, monitor,
                    patience, amp_dtype, grad_clip, eval_batch_size) -> None:
    """The arguments no settings group (Sampling, Checkpointing) checks; ValueError naming the argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logits, targets) -> loss, got {type(loss_fn).__name__}")
    for name, ds in (("train", train), ("val", val)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise TypeError(f"{name} must be a map-style dataset of (input, label) items, got "
                            f"{type(ds).__name__}")
        if len(ds) == 0:
            raise ValueError(f"{name} is empty")
    for name, v, lo in (("epochs", epochs, 1), ("freeze_epochs", freeze_epochs, 0),
                        ("eval_batch_size", eval_batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    try:
        number_arg(lr, "lr", 0.0, low_inclusive=False)
        number_arg(weight_decay, "weight_decay", 0.0)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
    if amp_dtype is torch.float16:
        raise ValueError("amp_dtype=torch.float16 needs loss scaling (torch.amp.GradScaler), which fit does "
                         "not do; use torch.bfloat16 (same exponent range as float32)")
    if amp_dtype not in (None, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None or torch.bfloat16, got {amp_dtype!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be None or > 0, got {grad_clip!r}")


def _rows_with_targets(ds: Dataset, target_fn, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets of every row, int64 positions of the rows with a target); ValueError when none has one."""
    targets = targets_of(labels_of(ds), target_fn)
    rows = kept_rows(targets).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError(f"{split}: target_fn leaves no rows (every target is IGNORE_INDEX)")
    return targets, rows


@dataclasses.dataclass
class _Loop:
    """What the epoch loop reads, set up once by fit."""

    model: nn.Module
    loss_fn: Callable
    train: Dataset
    val: Dataset
    train_idx: torch.Tensor  # the rows with a target
    val_idx: torch.Tensor
    weights: torch.Tensor | None  # per kept training row, for the weighted samplers
    sampling: Sampling
    gen: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: object
    target_fn: Callable | None
    augment: Callable | None
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float | None
    eval_batch_size: int
    num_classes: int
    class_names: Sequence[str] | None
    epochs: int
    freeze_epochs: int
    monitor: str
    patience: int | None
    rank: int
    world: int
    progress: bool
    name: str
    diagnostics: Diagnostics

    def run(self, run: RunState, saver: RunFiles | None) -> None:
        """Epochs run.start .. epochs - 1, or until early stopping; each one is recorded in run (and saved
        by saver when there is one)."""
        wrapped, frozen = None, None
        for epoch in range(run.start, self.epochs):
            t0 = time.perf_counter()
            if frozen != (epoch < self.freeze_epochs):
                frozen = epoch < self.freeze_epochs
                wrapped = set_phase(self.model, frozen, run.trainable_at_start, self.device, self.world)
            train_loss = self._train(wrapped, epoch)
            val_loss, report = self._validate()
            names = [g.get("name", str(i)) for i, g in enumerate(self.optimizer.param_groups)]
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                      "lr": {n: g["lr"] for n, g in zip(names, self.optimizer.param_groups)},
                      "val": report.to_dict(), "frozen": frozen, "seconds": time.perf_counter() - t0}
            value, improved = run.update(record, self.monitor, self.model)
            stop = record["stopped_early"] = run.should_stop(self.patience)
            found = epoch_warnings(self.diagnostics, run.history, self.monitor)
            if stop or epoch + 1 == self.epochs:
                found += end_of_run_warnings(self.diagnostics, run.history, run.best_epoch, self.monitor)
            record["warnings"] = found
            if self.progress and self.rank == 0:
                progress_write(f"{self.name} epoch {epoch + 1}/{self.epochs}: train_loss {train_loss:.4f} "
                               f"val_loss {val_loss:.4f} {self.monitor} {value:.4f}" + (" *" if improved else ""))
                for w in found:
                    progress_write(f"{self.name} warning ({w['kind']}): {w['message']}")
            if saver is not None:
                saver.save_epoch(run, epoch + 1, improved)
            if stop:
                break

    def _train(self, wrapped: nn.Module, epoch: int) -> float:
        """One epoch of training steps on this rank's share of the epoch's rows; the mean loss over ranks."""
        n_rows = self.train_idx.numel()
        order = self.sampling.epoch_order(self.weights, n_rows, self.world, self.rank, epoch, self.gen)
        steps = self.sampling.steps_per_epoch(n_rows, self.world)
        bar = progress_bar(self.progress and self.rank == 0, steps, f"{self.name} {epoch + 1}/{self.epochs}")
        batches = self.sampling.batches(self.train, self.train_idx[order].tolist())
        return train_epoch(wrapped, batches, bar, self.world, model=self.model, loss_fn=self.loss_fn,
                           optimizer=self.optimizer, scheduler=self.scheduler, augment=self.augment,
                           target_fn=self.target_fn, device=self.device, amp_dtype=self.amp_dtype,
                           grad_clip=self.grad_clip)

    def _validate(self):
        """(val loss, ClassificationReport) of the model on the validation rows, summed over ranks."""
        rows = self.val_idx[self.rank::self.world].tolist()  # this rank's share
        return validate(self.model, self.loss_fn, self.val, rows, self.target_fn, self.eval_batch_size,
                        self.device, self.amp_dtype, self.num_classes, self.class_names, self.world)
