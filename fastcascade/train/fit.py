"""fit: one AdamW training loop over a map-style dataset, with validation, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import pathlib
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, WeightedRandomSampler

from .. import adapters
from .._checks import device_arg, file_in_the_way, number_arg
from .._io import lock_folder, write_bytes, write_json
from ..losses import class_balanced_weights
from .batches import kept_rows, labels_of, loader, num_output_classes, targets_of
from .checkpoint import apply_checkpoint, read_checkpoint, save_checkpoint
from .distributed import all_sum, as_count, setup_distributed
from .evaluate import validate
from .rng import augment_state, rng_state, set_augment_state, set_rng_state

__all__ = ["fit"]

SCHEDULES = ("cosine", "onecycle", None)
SAMPLERS = ("class_balanced", "oversample", None)
REPORT_MONITORS = ("macro_f1", "weighted_f1", "accuracy")  # maximised
LOSS_MONITORS = ("val_loss",)  # minimised


def _check_fit_args(model, loss_fn, train, val, epochs, lr, schedule, freeze_epochs, monitor, patience,
                    amp_dtype, grad_clip, sampler, batch_size, checkpoint_every, eval_batch_size, num_workers,
                    weight_decay, out_dir) -> None:
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
    ints = (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("freeze_epochs", freeze_epochs, 0),
            ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0))
    for name, v, lo in ints:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    try:
        number_arg(lr, "lr", 0.0, low_inclusive=False)
        number_arg(weight_decay, "weight_decay", 0.0)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if out_dir is not None:
        _check_out_dir(out_dir)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if monitor not in REPORT_MONITORS + LOSS_MONITORS:
        raise ValueError(f"monitor must be one of {REPORT_MONITORS + LOSS_MONITORS}, got {monitor!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
    if amp_dtype is torch.float16:
        raise ValueError("amp_dtype=torch.float16 needs loss scaling (torch.amp.GradScaler), which fit does "
                         "not do; use torch.bfloat16 (same exponent range as float32)")
    if amp_dtype not in (None, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None or torch.bfloat16, got {amp_dtype!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be None or > 0, got {grad_clip!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")


def _check_out_dir(out_dir) -> None:
    """out_dir must be a folder or creatable as one: not a file, not under a file."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(out_dir).__name__}")
    blocker = file_in_the_way(out_dir)
    if blocker is not None:
        itself = blocker == pathlib.Path(out_dir).expanduser()
        where = "is a file" if itself else f"is under {blocker}, which is a file"
        raise ValueError(f"out_dir={str(out_dir)!r} {where}; fit writes its checkpoints into a folder")


def _sampler_weights(targets: torch.Tensor, sampler: str, beta: float) -> torch.Tensor:
    """Per-row sampling weights: class_balanced = effective-number class weights (Cui et al. 2019,
    (1 - beta) / (1 - beta^n_c)); oversample = 1 / n_c (every class drawn equally often)."""
    if targets.is_floating_point() or targets.dim() != 1:
        raise ValueError(f"sampler={sampler!r} needs class-id targets (N,), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    counts = torch.bincount(targets)
    if sampler == "class_balanced":
        per_class = class_balanced_weights(counts, beta).double()
    else:
        per_class = torch.where(counts > 0, 1.0 / counts.clamp(min=1).double(),
                                torch.zeros((), dtype=torch.float64))
    return per_class[targets]


def _optimizer(model: nn.Module, lr: float, groups, weight_decay: float) -> torch.optim.Optimizer:
    if groups is None:
        groups = [{"name": "all", "params": list(model.parameters()), "lr": lr}]
    elif isinstance(groups, Mapping):
        groups = adapters.param_groups(model, lr=dict(groups), weight_decay=weight_decay)
    else:
        groups = list(groups)
        if not groups or not all(isinstance(g, Mapping) and "params" in g for g in groups):
            raise ValueError("param_groups must be None, a dict of learning rates by group name, or a list "
                             "of optimizer parameter groups (dicts with 'params'), e.g. "
                             "fastcascade.param_groups(model)")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _scheduler(optimizer, schedule, total_steps: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps)
    return None


def _set_frozen(model: nn.Module, frozen: bool, trainable_at_start: set[str]) -> None:
    """Frozen: freeze_backbone (adapters and heads train; frozen BatchNorm held in eval). Unfrozen: the
    requires_grad flags the model had when fit started (frozen BatchNorm layers are released by the next
    train() once their parameters train again)."""
    if frozen:
        adapters.freeze_backbone(model)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable_at_start)


def fit(model: nn.Module, loss_fn: Callable, train: Dataset, val: Dataset, epochs: int, *, lr: float = 1e-3,
        param_groups=None, weight_decay: float = 0.01, schedule: str | None = "cosine",
        freeze_epochs: int = 0, monitor: str = "macro_f1", patience: int | None = None,
        amp_dtype: torch.dtype | None = None, grad_clip: float | None = None, sampler: str | None = None,
        beta: float = 0.9999, batch_size: int = 256, eval_batch_size: int = 1024,
        target_fn: Callable | None = None, augment: Callable | None = None, device=None,
        out_dir: str | os.PathLike | None = None, seed: int = 0, progress: bool = True,
        resume: str | os.PathLike | None = None, num_classes: int | None = None,
        class_names: Sequence[str] | None = None, checkpoint_every: int | None = None, num_workers: int = 0,
        name: str = "fit") -> tuple[list[dict], pathlib.Path | None]:
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
            up by a stored path. out_dir/best.pt is made to hold the run's best epoch.
        num_classes, class_names: of the validation report (default: the model's output width, 2 for
            one logit).
        seed: seeds torch, numpy, python and the sampler: the same seed gives the same run, bitwise.
        batch_size, eval_batch_size: rows per training step (per rank) and per validation batch.
        num_workers: DataLoader workers (0: batches are read in this process, which for tensor-backed
            datasets is one indexing op per batch). name: the label of progress lines.

    Under torchrun (or an initialised process group) the model is wrapped in DistributedDataParallel,
    each rank trains on its shard of every epoch (DistributedSampler; the weighted samplers draw one
    global order and shard it), the validation confusion matrix and losses are all_reduced, so every
    rank returns the same history, and rank 0 writes the files.

    The history is a list of per-epoch dicts: epoch (1-based), train_loss, val_loss, lr (per group
    name, at the end of the epoch), val (ClassificationReport.to_dict(): per-class precision, recall,
    f1, support; accuracy, macro_f1, weighted_f1, confusion), frozen, seconds. After fit, model holds
    the weights of the best epoch, and the returned path (out_dir/best.pt) holds them too.

    Arguments are checked before the first step: ValueError naming the argument for, e.g., an out_dir
    that is a file, eval_batch_size=0, lr=inf or NaN, or a device torch does not know or this machine
    does not have.
    """
    _check_fit_args(model, loss_fn, train, val, epochs, lr, schedule, freeze_epochs, monitor, patience,
                    amp_dtype, grad_clip, sampler, batch_size, checkpoint_every, eval_batch_size, num_workers,
                    weight_decay, out_dir)
    if device is not None:
        device = device_arg(device)
    rank, world, device = setup_distributed(device)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else None
    # two runs writing one folder would interleave their checkpoints: the second one refuses
    lock = lock_folder(out_dir, f"fastcascade fit {name!r}") if out_dir is not None and rank == 0 \
        else contextlib.nullcontext()
    with lock:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        gen = torch.Generator().manual_seed(seed)

        # rows with a target; everything downstream indexes into these
        train_t = targets_of(labels_of(train), target_fn)
        train_idx = kept_rows(train_t).nonzero().flatten()
        val_t = targets_of(labels_of(val), target_fn)
        val_idx = kept_rows(val_t).nonzero().flatten()
        for split, idx in (("train", train_idx), ("val", val_idx)):
            if idx.numel() == 0:
                raise ValueError(f"{split}: target_fn leaves no rows (every target is IGNORE_INDEX)")
        weights = _sampler_weights(train_t[train_idx], sampler, beta) if sampler is not None else None

        model.to(device)
        run = _Run(trainable_at_start={n for n, p in model.named_parameters() if p.requires_grad})
        probe = next(iter(loader(val, val_idx[:32].tolist(), 32, 0)))[0].to(device)
        width = _output_width(model, probe)  # run once either way: a malformed output fails before training
        num_classes = num_classes or width
        optimizer = _optimizer(model, lr, param_groups, weight_decay)
        n_local = math.ceil(train_idx.numel() / world)
        steps_per_epoch = math.ceil(n_local / batch_size)
        scheduler = _scheduler(optimizer, schedule, steps_per_epoch * epochs)
        group_names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]
        if resume is not None:
            _resume(run, resume, model, optimizer, scheduler, epochs, gen, augment, out_dir if rank == 0 else None,
                    probe, checkpoint_every)
            model.to(device)
        else:
            run.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            run.run_id = uuid.uuid4().hex
        step_args = dict(augment=augment, target_fn=target_fn, device=device, amp_dtype=amp_dtype, grad_clip=grad_clip,
                         optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, model=model)

        wrapped, frozen = None, None
        for epoch in range(run.start, epochs):
            t0 = time.perf_counter()
            if frozen != (epoch < freeze_epochs):
                frozen = epoch < freeze_epochs
                _set_frozen(model, frozen, run.trainable_at_start)
                # DDP registers the parameters that require grad when it is built: rebuild it per phase
                ids = [device.index] if device.type == "cuda" else None
                wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
            order = _epoch_order(weights, n_local, world, rank, train_idx.numel(), seed, epoch, gen)
            bar = _progress_bar(progress and rank == 0, steps_per_epoch, f"{name} {epoch + 1}/{epochs}")
            batches = loader(train, train_idx[order].tolist(), batch_size, num_workers)
            train_loss = _train_epoch(wrapped, batches, bar, world, **step_args)
            val_loss, report = validate(model, loss_fn, val, val_idx[rank::world].tolist(), target_fn,
                                        eval_batch_size, device, amp_dtype, num_classes, class_names, world)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                      "lr": {n: g["lr"] for n, g in zip(group_names, optimizer.param_groups)},
                      "val": report.to_dict(), "frozen": frozen, "seconds": time.perf_counter() - t0}
            value = val_loss if monitor in LOSS_MONITORS else record["val"][monitor]
            improved = run.update(record, value, minimise=monitor in LOSS_MONITORS, model=model)
            stop = patience is not None and run.bad_epochs >= patience
            record["stopped_early"] = stop
            if progress and rank == 0:
                _progress_write(f"{name} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} val_loss "
                                f"{val_loss:.4f} {monitor} {value:.4f}" + (" *" if improved else ""))
            if out_dir is not None:
                _save_epoch(run, out_dir, epoch + 1, improved, rank, world, checkpoint_every, model, optimizer,
                            scheduler, probe, gen, augment, monitor)
            if stop:
                break
        model.load_state_dict(run.best_state)
        return run.history, (out_dir / "best.pt" if out_dir is not None else None)


@dataclasses.dataclass
class _Run:
    """What fit carries from epoch to epoch (and saves in its checkpoints for resume)."""

    trainable_at_start: set
    history: list = dataclasses.field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    start: int = 0
    best_state: dict | None = None
    run_id: str | None = None  # one id per run, kept by resume: names which files belong to it

    def update(self, record: dict, value: float, minimise: bool, model: nn.Module) -> bool:
        """Appends the epoch's record; True when `value` improves on the best so far (then kept)."""
        self.history.append(record)
        improved = self.best_value is None or (value < self.best_value if minimise else value > self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, record["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return improved


@torch.no_grad()
def _output_width(model: nn.Module, probe: torch.Tensor) -> int:
    """Classes of the model's output on probe (2 for one logit per row), computed in eval mode."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return num_output_classes(model(probe))
    finally:
        for m, mode in was.items():
            m.training = mode


def _resume(run: _Run, resume, model, optimizer, scheduler, epochs: int, gen: torch.Generator, augment,
            out_dir: pathlib.Path | None, probe, checkpoint_every) -> None:
    """Restores model, optimizer, scheduler, the RNG states and run from a checkpoint written by fit, and
    makes out_dir/best.pt hold the run's best epoch (and out_dir/epoch-NNNN.pt the checkpoint's epoch,
    when checkpoint_every asks for it: a kill may have come before it was written).

    The best weights come from the checkpoint itself (its own weights when its epoch is the best one,
    else the copy it carries); only checkpoints of older fastcascade versions send us to a best.pt,
    looked up next to the checkpoint, never through a stored path: the folder may have moved, and a
    relative path would resolve against another cwd."""
    path = pathlib.Path(resume)
    ckpt = read_checkpoint(path)
    state = ckpt["extra"].get("fit")
    if not isinstance(state, Mapping):
        raise ValueError(f"resume={str(resume)!r}: the checkpoint was not written by fit (no training state)")
    needed = ("history", "best_value", "best_epoch", "bad_epochs", "trainable_at_start", "rng",
              "sampler_generator", "augment")
    missing = [k for k in needed if k not in state]
    if missing:
        what = (f"lacks the training state entries {missing}" if not state.get("weights_only") else
                "holds the best weights only (written after a resume); resume from last.pt or an epoch-NNNN.pt")
        raise ValueError(f"resume={str(resume)!r}: the checkpoint {what}")
    if ckpt["epoch"] >= epochs:
        raise ValueError(f"resume={str(resume)!r} is at epoch {ckpt['epoch']}: nothing left of epochs={epochs}")
    epoch, best_epoch = ckpt["epoch"], state["best_epoch"]
    best = None
    if best_epoch != epoch:
        best = state.get("best_model")
        if best is None:
            best = _old_best_weights(path, state, best_epoch)
        layout = {k: (v.shape, v.dtype) for k, v in best.items() if isinstance(v, torch.Tensor)}
        if layout != {k: (v.shape, v.dtype) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}:
            raise ValueError(f"resume={str(resume)!r}: the best weights it carries (epoch {best_epoch}) do not fit "
                             f"its own model's entries; the checkpoint is damaged")
    apply_checkpoint(ckpt, path, model, optimizer, scheduler)
    run.history, run.best_value, run.best_epoch = list(state["history"]), state["best_value"], best_epoch
    run.bad_epochs, run.start = state["bad_epochs"], epoch
    run.trainable_at_start = set(state["trainable_at_start"])
    run.run_id = state.get("run_id") or uuid.uuid4().hex
    set_rng_state(state["rng"])
    gen.set_state(state["sampler_generator"])
    set_augment_state(augment, state["augment"])
    run.best_state = ({k: v.detach().clone() for k, v in model.state_dict().items()} if best is None
                      else dict(best))
    if out_dir is not None:
        _restore_best_file(run, out_dir, path, epoch, model, probe)
        archive = out_dir / f"epoch-{epoch:04d}.pt"
        if checkpoint_every is not None and epoch % checkpoint_every == 0 and archive != path \
                and not _holds(archive, run.run_id, epoch):
            write_bytes(path.read_bytes(), archive)


def _old_best_weights(path: pathlib.Path, state: Mapping, best_epoch: int) -> dict:
    """The best weights of a checkpoint written before fit stored them in its checkpoints: best.pt next to
    it, if it holds that epoch of that run (same history up to it)."""
    best_file = path.parent / "best.pt"
    why = f"{best_file} does not exist"
    if best_file.is_file():
        other = read_checkpoint(best_file)
        theirs = (other["extra"].get("fit") or {}).get("history", [])
        if other["epoch"] == best_epoch and list(theirs) == list(state["history"][:best_epoch]):
            return other["model"]
        why = f"{best_file} holds epoch {other['epoch']}" + ("" if other["epoch"] != best_epoch else
                                                             " of another run")
    raise ValueError(f"resume={str(path)!r}: its best epoch is {best_epoch}, whose weights this checkpoint (from "
                     f"an older fastcascade) does not carry, and {why}; resume from the checkpoint of epoch "
                     f"{best_epoch} or one written since")


def _holds(path: pathlib.Path, run_id: str, epoch: int) -> bool:
    """Whether path is an intact checkpoint of epoch `epoch` of run `run_id`."""
    if not path.is_file():
        return False
    try:
        ckpt = read_checkpoint(path)
    except ValueError:
        return False
    fit_state = ckpt["extra"].get("fit")
    return ckpt["epoch"] == epoch and isinstance(fit_state, Mapping) and fit_state.get("run_id") == run_id


def _restore_best_file(run: _Run, out_dir: pathlib.Path, source: pathlib.Path, epoch: int, model,
                       probe) -> None:
    """Make out_dir/best.pt hold the run's best epoch. It may not: the run was killed between last.pt and
    best.pt, or resumes into another folder, or from an older checkpoint after best.pt moved on. A file that
    holds that epoch (the resumed checkpoint itself, or best.pt / epoch-NNNN.pt next to it) is copied as it
    is; otherwise best.pt is written from the best weights alone (no optimizer or RNG state)."""
    target = out_dir / "best.pt"
    if _holds(target, run.run_id, run.best_epoch):
        return
    candidates = [source] if epoch == run.best_epoch else []
    candidates += [source.parent / "best.pt", source.parent / f"epoch-{run.best_epoch:04d}.pt"]
    for c in candidates:
        if c != target and _holds(c, run.run_id, run.best_epoch):
            write_bytes(c.read_bytes(), target)
            return
    best_model = copy.deepcopy(model)
    best_model.load_state_dict(run.best_state)
    state = {"run_id": run.run_id, "best_epoch": run.best_epoch, "best_value": run.best_value,
             "history": run.history[:run.best_epoch], "weights_only": True}
    save_checkpoint(target, best_model, epoch=run.best_epoch, extra={"fit": state}, probe=probe)


def _epoch_order(weights, n_local: int, world: int, rank: int, n_rows: int, seed: int, epoch: int,
                 gen: torch.Generator) -> torch.Tensor:
    """This epoch's rows for this rank, as positions into the kept training rows."""
    if weights is not None:
        drawn = torch.tensor(list(WeightedRandomSampler(weights, n_local * world, replacement=True, generator=gen)),
                             dtype=torch.int64)
        return drawn[rank::world]
    if world > 1:
        ds_sampler = DistributedSampler(range(n_rows), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        ds_sampler.set_epoch(epoch)
        return torch.tensor(list(ds_sampler), dtype=torch.int64)
    return torch.tensor(list(RandomSampler(range(n_rows), generator=gen)), dtype=torch.int64)


def _train_epoch(wrapped, batches, bar, world: int, *, model, loss_fn, optimizer, scheduler, augment, target_fn,
                 device, amp_dtype, grad_clip) -> float:
    """One pass over batches: the mean training loss over rows, summed over ranks."""
    wrapped.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rows = 0
    for step, (x, y) in enumerate(batches):
        if augment is not None:
            x, y = augment(x, y)
        t = y if (y.is_floating_point() and y.dim() == 2) else targets_of(y, target_fn)
        keep = kept_rows(t)
        if not bool(keep.all()):  # an augmentation moved a row out of this stage
            x, t = x[keep], t[keep]
        x, t = x.to(device, non_blocking=True), t.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(wrapped(x), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().double() * t.shape[0]
        rows += t.shape[0]
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    totals = all_sum(torch.stack([loss_sum, as_count(rows, device)]), world, device)
    return (totals[0] / totals[1]).item()


def _save_epoch(run: _Run, out_dir: pathlib.Path, epoch: int, improved: bool, rank: int, world: int,
                checkpoint_every, model, optimizer, scheduler, probe, gen, augment, monitor) -> None:
    """Rank 0 writes last.pt, then best.pt when the epoch improved and epoch-NNNN.pt every checkpoint_every
    epochs (byte copies of last.pt), then history.json; every rank waits until they exist.

    last.pt is the commit point, and it is self-contained: it carries the best weights (unless its own
    epoch is the best one), so resuming from it never depends on best.pt. A kill before its rename
    leaves the previous epoch's consistent set; a kill after it leaves files that resume rewrites (best.pt
    is made to hold the best epoch again, history.json is written every epoch)."""
    state = {"run_id": run.run_id, "history": run.history, "best_value": run.best_value,
             "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs,
             "best_model": None if run.best_epoch == epoch else run.best_state,
             "trainable_at_start": sorted(run.trainable_at_start), "rng": rng_state(),
             "sampler_generator": gen.get_state(), "augment": augment_state(augment), "monitor": monitor}
    if rank == 0:
        last = save_checkpoint(out_dir / "last.pt", model, optimizer, scheduler, epoch, {"fit": state},
                               probe=probe)
        copies = [out_dir / "best.pt"] if improved else []
        if checkpoint_every is not None and epoch % checkpoint_every == 0:
            copies.append(out_dir / f"epoch-{epoch:04d}.pt")
        if copies:
            data = last.read_bytes()
            for path in copies:
                write_bytes(data, path)
        write_json(run.history, out_dir / "history.json")
    if world > 1:
        dist.barrier()  # the files exist for every rank once fit moves on


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _progress_write(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)
