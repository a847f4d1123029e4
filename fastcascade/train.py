"""Training and evaluation: :func:`fit`, verified checkpoints, :func:`evaluate`; plain PyTorch underneath.

``fit`` is one AdamW loop over a map-style dataset of ``(input, label)`` items (a
:class:`fastcascade.data.PartitionDataset`, a ``TensorDataset`` or any dataset of that shape):
discriminative learning rates (fastcascade.param_groups), a per-step cosine or one-cycle schedule,
freeze-then-unfreeze, bf16 autocast, gradient clipping, class-balanced / oversampling samplers, early
stopping on a validation metric, tqdm progress, checkpoints that are verified on save, and exact
resume. Under ``torchrun`` it runs unchanged as DDP (gloo on the CPU, NCCL on CUDA): each rank trains
on its shard, validation confusion matrices and losses are summed over ranks, rank 0 writes files.

Validation metrics come from fastcascade.metrics (confusion_matrix, ClassificationReport).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from . import adapters as _adapters
from .cascade import Cascade
from .data.dataset import PartitionDataset
from .data.labels import IGNORE_INDEX, STAGE_CLASS_NAMES
from .losses import class_balanced_weights
from .metrics import ClassificationReport, EvaluationReport, confusion_matrix

__all__ = ["evaluate", "fit", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "fastcascade.checkpoint/1"
SCHEDULES = ("cosine", "onecycle", None)
SAMPLERS = ("class_balanced", "oversample", None)
REPORT_MONITORS = ("macro_f1", "weighted_f1", "accuracy")  # maximised
LOSS_MONITORS = ("val_loss",)  # minimised


# ---------------------------------------------------------------------------------------------
# checkpoints


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _architecture(sd: Mapping[str, torch.Tensor]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype)] for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN payloads included; torch.equal says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                       b.detach().reshape(-1).contiguous().view(torch.uint8))


def _leaves(out, prefix: str = "output"):
    """(name, tensor) pairs of a model output: a tensor, or tuples / lists / dicts / dataclasses of them."""
    if isinstance(out, torch.Tensor):
        yield prefix, out
    elif isinstance(out, Mapping):
        for k, v in out.items():
            yield from _leaves(v, f"{prefix}[{k!r}]")
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from _leaves(v, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            yield from _leaves(getattr(out, f.name), f"{prefix}.{f.name}")


def _poisoned_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose every parameter and buffer (persistent or not) is overwritten: whatever the
    checkpoint does not restore then shows up as a difference instead of being copied over silently."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*fresh.parameters(), *fresh.buffers()]:
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.add_(1)
    return fresh


def _verify_reload(path: pathlib.Path, model: nn.Module, probe) -> None:
    """Reload `path` into a fresh copy of model; raise unless its tensors and its outputs on `probe` (eval
    mode, no grad) are bitwise the in-memory model's."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh = _poisoned_copy(model)
    fresh.load_state_dict(state["model"])
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    theirs = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
    differ = [k for k in mine if not _bitwise_equal(mine[k], theirs[k])]
    if differ:
        raise RuntimeError(f"save_checkpoint: after reloading, {len(differ)} tensor(s) differ from the "
                           f"in-memory model, e.g. {differ[:5]}: they are not in state_dict() "
                           f"(non-persistent buffers?) or load_state_dict does not restore them; no "
                           f"checkpoint was written")
    if probe is None:
        return
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        fresh.eval()
        args = probe if isinstance(probe, tuple) else (probe,)
        with torch.no_grad():
            ref, got = dict(_leaves(model(*args))), dict(_leaves(fresh(*args)))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if ref.keys() != got.keys():
        raise RuntimeError(f"save_checkpoint: the reloaded model returns {sorted(got)} on the probe batch, "
                           f"the in-memory one {sorted(ref)}; no checkpoint was written")
    bad = [k for k in ref if not _bitwise_equal(ref[k], got[k])]
    if bad:
        k = bad[0]
        diff = (ref[k].double() - got[k].double()).abs().nan_to_num(float("inf")).max().item() \
            if ref[k].shape == got[k].shape else "shape"
        raise RuntimeError(f"save_checkpoint: the reloaded model's {k} on the probe batch differs from the "
                           f"in-memory model's (max abs difference {diff}): the model has state that "
                           f"state_dict does not capture; no checkpoint was written")


def _atomic_save(obj, path: pathlib.Path, verify: Callable[[pathlib.Path], None] | None = None) -> None:
    """torch.save to a temporary file in path's folder, verify it, then os.replace: readers see the old
    file or the complete new one; on any failure the temporary file is removed and path is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(pathlib.Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, epoch: int | None = None, extra: Mapping | None = None, *,
                    probe: torch.Tensor | tuple | None = None, verify: bool = True) -> pathlib.Path:
    """Write model (and optimizer, scheduler) state atomically, verified.

    The file is ``torch.save({"format", "model", "architecture", "model_class", "optimizer", "scheduler",
    "epoch", "extra"})``, readable with ``torch.load(weights_only=True)`` (so `extra` may hold tensors,
    numbers, strings, lists and dicts). It is written to a temporary file in the same folder and, with
    verify=True, reloaded into a fresh copy of model (a deep copy whose parameters and buffers are all
    overwritten first): every parameter and buffer, and the outputs on `probe` (the model's input, or a
    tuple of inputs, in eval mode) when given, must equal the in-memory model's bitwise. Only then is it
    renamed to `path`; otherwise RuntimeError, and no file is left behind. Returns the path.
    """
    path = pathlib.Path(path)
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd = model.state_dict()
    obj = {"format": CHECKPOINT_FORMAT, "model": sd, "architecture": _architecture(sd),
           "model_class": type(model).__name__,
           "optimizer": optimizer.state_dict() if optimizer is not None else None,
           "scheduler": scheduler.state_dict() if scheduler is not None else None,
           "epoch": epoch, "extra": dict(extra) if extra is not None else {}}
    _atomic_save(obj, path, (lambda tmp: _verify_reload(tmp, model, probe)) if verify else None)
    return path


def _read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path}: not a readable torch.save file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path}: not a fastcascade checkpoint (format {fmt!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}; save_checkpoint writes one); for a plain state_dict use "
                         f"model.load_state_dict(torch.load(...))")
    return ckpt


def _few(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, map_location="cpu") -> dict:
    """Load a save_checkpoint file into model (and optimizer, scheduler); returns the checkpoint dict
    (its "epoch" and "extra" entries included).

    Raises FileNotFoundError for a missing file and ValueError, before changing anything, for a file
    that is not a fastcascade checkpoint or one saved from another architecture (the first missing,
    unexpected and differently shaped entries are named), or when an optimizer / scheduler is passed but
    the checkpoint has none.
    """
    ckpt = _read_checkpoint(path, map_location)
    model = _unwrap(model)
    mine = _architecture(model.state_dict())
    saved = ckpt["architecture"]
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [f"{k} {saved[k][0]} vs {mine[k][0]}" for k in mine if k in saved and saved[k] != mine[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} entries of the model are not in the checkpoint ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint entries are not in the model ({_few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} entries differ in shape or dtype, checkpoint vs model "
                         f"({_few(shapes)})")
        raise ValueError(f"checkpoint {path} was saved from another architecture ({ckpt.get('model_class')}, "
                         f"{len(saved)} entries) than this {type(model).__name__} ({len(mine)} entries): "
                         + "; ".join(parts))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and ckpt.get(name) is None:
            raise ValueError(f"checkpoint {path} holds no {name} state, but {name}= was given")
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


# ---------------------------------------------------------------------------------------------
# random state (saved in fit's checkpoints so a resumed run draws what the uninterrupted one drew)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's and python's states as tensors / ints, so the file loads with weights_only=True
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(s: Mapping) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _augment_state(augment) -> torch.Tensor | dict | None:
    """The random state of an augmentation: its state_dict(), or its .generator's state (RandomDihedral)."""
    if augment is None:
        return None
    if hasattr(augment, "state_dict"):
        return augment.state_dict()
    gen = getattr(augment, "generator", None)
    return gen.get_state() if isinstance(gen, torch.Generator) else None


def _set_augment_state(augment, state) -> None:
    if state is None or augment is None:
        return
    if hasattr(augment, "load_state_dict"):
        augment.load_state_dict(state)
    elif isinstance(getattr(augment, "generator", None), torch.Generator):
        augment.generator.set_state(state)


# ---------------------------------------------------------------------------------------------
# data plumbing


def _labels_of(ds: Dataset) -> torch.Tensor:
    """int64 (N,) labels of a dataset of (input, label) items, without touching the inputs when it can."""
    if isinstance(ds, PartitionDataset):
        return ds.labels
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset):
        return _labels_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.int64)]
    return torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])


def _batched(ds: Dataset) -> bool:
    """Whether ds[list of indices] returns a whole batch (one indexing op instead of N items + collate)."""
    if isinstance(ds, Subset):
        return _batched(ds.dataset)
    return isinstance(ds, (PartitionDataset, TensorDataset))


def _loader(ds: Dataset, order: Sequence[int], batch_size: int, num_workers: int) -> DataLoader:
    if _batched(ds):
        if isinstance(ds, Subset):
            base = torch.as_tensor(ds.indices, dtype=torch.int64)
            ds, order = ds.dataset, base[torch.as_tensor(order, dtype=torch.int64)].tolist()
        return DataLoader(ds, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                          num_workers=num_workers)
    return DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=num_workers)


def _targets(labels: torch.Tensor, target_fn) -> torch.Tensor:
    if target_fn is None:
        return labels
    t = target_fn(labels)
    if not isinstance(t, torch.Tensor) or t.shape[:1] != labels.shape[:1]:
        raise ValueError(f"target_fn must return a tensor with one row per label ({labels.shape[0]}), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t


def _kept(targets: torch.Tensor) -> torch.Tensor:
    """Bool (N,): rows with a target (class-id targets equal to IGNORE_INDEX are dropped)."""
    if targets.is_floating_point() or targets.dim() != 1:
        return torch.ones(targets.shape[0], dtype=torch.bool)
    return targets != IGNORE_INDEX


def _predict(out: torch.Tensor) -> torch.Tensor:
    """Class ids from logits: one logit per row is binary (class 1 where the logit > 0), else argmax."""
    if out.dim() == 1 or out.shape[1] == 1:
        return (out.reshape(-1) > 0).long()
    return out.argmax(1)


def _num_outputs_classes(out: torch.Tensor) -> int:
    return 2 if out.dim() == 1 or out.shape[1] == 1 else out.shape[1]


# ---------------------------------------------------------------------------------------------
# distributed


def _dist_setup(device) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) with no process group yet, one is
    started: NCCL when the device is CUDA, else gloo."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = (device is None and torch.cuda.is_available()) or (device is not None
                                                                      and torch.device(device).type == "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
    return rank, world, device


def _as_tensor(rows: int, device) -> torch.Tensor:
    return torch.tensor(float(rows), dtype=torch.float64, device=device)


def _all_sum(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    if world == 1:
        return t
    # NCCL reduces CUDA tensors only; gloo takes CPU ones
    backend_dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(backend_dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


# ---------------------------------------------------------------------------------------------
# fit


def _check_fit_args(model, loss_fn, train, val, epochs, lr, schedule, freeze_epochs, monitor, patience,
                    amp_dtype, grad_clip, sampler, batch_size) -> None:
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
    ints = (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("freeze_epochs", freeze_epochs, 0))
    for name, v, lo in ints:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
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
        groups = _adapters.param_groups(model, lr=dict(groups), weight_decay=weight_decay)
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
        _adapters.freeze_backbone(model)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable_at_start)


def _write_json(obj, path: pathlib.Path) -> None:
    """Atomically (temporary file + os.replace), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        out_dir: rank 0 writes last.pt, best.pt (and epoch-NNNN.pt every checkpoint_every epochs) with
            save_checkpoint (verified on a fixed batch of val inputs) and history.json, atomically.
        resume: a checkpoint written by fit: continues with the epoch after it, exactly as the
            uninterrupted run (model, optimizer, schedule, history, early-stopping state and the RNG
            states of torch, numpy, python, the sampler and the augmentation's generator are restored).
            Pass the same arguments as the original run.
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
    the weights of the best epoch.
    """
    _check_fit_args(model, loss_fn, train, val, epochs, lr, schedule, freeze_epochs, monitor, patience,
                    amp_dtype, grad_clip, sampler, batch_size)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
    rank, world, device = _dist_setup(device)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else None

    # rows with a target; everything downstream indexes into these
    train_t = _targets(_labels_of(train), target_fn)
    train_idx = _kept(train_t).nonzero().flatten()
    val_t = _targets(_labels_of(val), target_fn)
    val_idx = _kept(val_t).nonzero().flatten()
    for split, idx in (("train", train_idx), ("val", val_idx)):
        if idx.numel() == 0:
            raise ValueError(f"{split}: target_fn leaves no rows (every target is IGNORE_INDEX)")
    weights = _sampler_weights(train_t[train_idx], sampler, beta) if sampler is not None else None

    model.to(device)
    trainable_at_start = {n for n, p in model.named_parameters() if p.requires_grad}
    probe = next(iter(_loader(val, val_idx[:32].tolist(), 32, 0)))[0].to(device)
    with torch.no_grad():
        was = {m: m.training for m in model.modules()}
        model.eval()
        width = _num_outputs_classes(model(probe))
        for m, mode in was.items():
            m.training = mode
    num_classes = num_classes or width
    optimizer = _optimizer(model, lr, param_groups, weight_decay)
    n_local = math.ceil(train_idx.numel() / world)
    steps_per_epoch = math.ceil(n_local / batch_size)
    scheduler = _scheduler(optimizer, schedule, steps_per_epoch * epochs)
    group_names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]

    history: list[dict] = []
    best_value, best_epoch, bad_epochs, start = None, None, 0, 0
    if resume is not None:
        if not isinstance(_read_checkpoint(resume)["extra"].get("fit"), Mapping):
            raise ValueError(f"resume={str(resume)!r}: the checkpoint was not written by fit (no training "
                             f"state)")
        ckpt = load_checkpoint(resume, model, optimizer, scheduler, map_location="cpu")
        state = ckpt["extra"]["fit"]
        if ckpt["epoch"] >= epochs:
            raise ValueError(f"resume={str(resume)!r} is at epoch {ckpt['epoch']}: nothing left of "
                             f"epochs={epochs}")
        history, best_value, best_epoch = list(state["history"]), state["best_value"], state["best_epoch"]
        bad_epochs, start = state["bad_epochs"], ckpt["epoch"]
        trainable_at_start = set(state["trainable_at_start"])
        _set_rng_state(state["rng"])
        gen.set_state(state["sampler_generator"])
        _set_augment_state(augment, state["augment"])
        model.to(device)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume is not None and state.get("best_path") and pathlib.Path(state["best_path"]).is_file():
        best_state = _read_checkpoint(state["best_path"])["model"]
    best_path = pathlib.Path(state["best_path"]) if resume is not None and state.get("best_path") else None

    wrapped, frozen = None, None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if frozen != (epoch < freeze_epochs):
            frozen = epoch < freeze_epochs
            _set_frozen(model, frozen, trainable_at_start)
            # DDP registers the parameters that require grad when it is built: rebuild it per phase
            ids = [device.index] if device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
        # this epoch's rows for this rank
        if weights is not None:
            drawn = torch.tensor(list(WeightedRandomSampler(weights, n_local * world, replacement=True,
                                                            generator=gen)), dtype=torch.int64)
            order = drawn[rank::world]
        elif world > 1:
            ds_sampler = DistributedSampler(range(train_idx.numel()), num_replicas=world, rank=rank,
                                            shuffle=True, seed=seed)
            ds_sampler.set_epoch(epoch)
            order = torch.tensor(list(ds_sampler), dtype=torch.int64)
        else:
            order = torch.tensor(list(RandomSampler(range(train_idx.numel()), generator=gen)),
                                 dtype=torch.int64)
        wrapped.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        bar = _progress_bar(progress and rank == 0, steps_per_epoch, f"{name} {epoch + 1}/{epochs}")
        for step, (x, y) in enumerate(_loader(train, train_idx[order].tolist(), batch_size, num_workers)):
            if augment is not None:
                x, y = augment(x, y)
            t = y if (y.is_floating_point() and y.dim() == 2) else _targets(y, target_fn)
            keep = _kept(t)
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
        totals = _all_sum(torch.stack([loss_sum, _as_tensor(rows, device)]), world, device)
        train_loss = (totals[0] / totals[1]).item()
        val_loss, report = _validate(model, loss_fn, val, val_idx[rank::world].tolist(), target_fn,
                                     eval_batch_size, device, amp_dtype, num_classes, class_names, world)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                  "lr": {n: g["lr"] for n, g in zip(group_names, optimizer.param_groups)},
                  "val": report.to_dict(), "frozen": frozen, "seconds": time.perf_counter() - t0}
        history.append(record)
        value = val_loss if monitor in LOSS_MONITORS else record["val"][monitor]
        minimise = monitor in LOSS_MONITORS
        improved = best_value is None or (value < best_value if minimise else value > best_value)
        if improved:
            best_value, best_epoch, bad_epochs = value, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        stop = patience is not None and bad_epochs >= patience
        record["stopped_early"] = stop
        if progress and rank == 0:
            _progress_write(f"{name} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} val_loss "
                            f"{val_loss:.4f} {monitor} {value:.4f}" + (" *" if improved else ""))
        if out_dir is not None:
            if improved:
                best_path = out_dir / "best.pt"
            state = {"history": history, "best_value": best_value, "best_epoch": best_epoch,
                     "bad_epochs": bad_epochs, "best_path": str(best_path) if best_path is not None else None,
                     "trainable_at_start": sorted(trainable_at_start), "rng": _rng_state(),
                     "sampler_generator": gen.get_state(), "augment": _augment_state(augment),
                     "monitor": monitor}
            if rank == 0:
                extra = {"fit": state}
                paths = [out_dir / "last.pt"] + ([best_path] if improved else [])
                if checkpoint_every is not None and (epoch + 1) % checkpoint_every == 0:
                    paths.append(out_dir / f"epoch-{epoch + 1:04d}.pt")
                for path in paths:
                    save_checkpoint(path, model, optimizer, scheduler, epoch + 1, extra, probe=probe)
                _write_json(history, out_dir / "history.json")
            if world > 1:
                dist.barrier()  # the files exist for every rank once fit moves on
        if stop:
            break
    model.load_state_dict(best_state)
    return history, best_path


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _progress_write(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


@torch.no_grad()
def _validate(model, loss_fn, val, order, target_fn, batch_size, device, amp_dtype, num_classes, class_names,
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
            for x, y in _loader(val, order, batch_size, 0):
                t = _targets(y, target_fn)
                keep = _kept(t)
                x, t = x[keep].to(device), t[keep].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(x)
                    loss = loss_fn(out, t)
                loss_sum += loss.double() * t.shape[0]
                rows += t.shape[0]
                cm += confusion_matrix(_predict(out.float()), t, num_classes).to(device)
    finally:
        for m, mode in modes.items():
            m.training = mode
    totals = _all_sum(torch.stack([loss_sum, _as_tensor(rows, device)]), world, device)
    cm = _all_sum(cm, world, device)
    return (totals[0] / totals[1]).item(), ClassificationReport.from_confusion(cm.cpu(), class_names)


# ---------------------------------------------------------------------------------------------
# evaluate


def _tensors_of(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        idx = list(range(len(data)))
        xs, ys = zip(*_loader(data, idx, 4096, 0)) if idx else ((), ())
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
    Cascade.evaluate). Returns a fastcascade.metrics.EvaluationReport (accuracy, macro_f1,
    weighted_f1, confusion; .final is the ClassificationReport). Runs in eval mode (restored after),
    on `device` (default: the model's).
    """
    if not isinstance(model_or_cascade, nn.Module):
        raise TypeError(f"model_or_cascade must be an nn.Module or a fastcascade.Cascade, got "
                        f"{type(model_or_cascade).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    model = _unwrap(model_or_cascade)
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
        t = _targets(labels, target_fn)
        keep = _kept(t)
        x, t = x[keep], t[keep]
        starts = range(0, x.shape[0], batch_size)
        preds = [_predict(model(x[i:i + batch_size].to(device)).float()) for i in starts]
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
        if num_classes is None:
            num_classes = _num_outputs_classes(model(x[:1].to(device)))
        cm = confusion_matrix(pred.cpu(), t.cpu(), num_classes)
        return EvaluationReport(final=ClassificationReport.from_confusion(cm, class_names))
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
                            cascade_error=dict(ev["cascade_error"]))
