"""fit's training steps: the AdamW optimizer and its per-step schedule, the freeze phase, and one epoch of
steps over a loader of batches."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .. import adapters
from .batches import kept_rows, num_output_classes, targets_of
from .distributed import all_sum, as_count

__all__ = ["SCHEDULES", "make_optimizer", "make_scheduler", "output_width", "set_phase", "train_epoch"]

SCHEDULES = ("cosine", "onecycle", None)


def make_optimizer(model: nn.Module, lr: float, groups, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over groups: None (every parameter at lr), a dict of learning rates by group name (passed to
    fastcascade.param_groups with weight_decay), or a list of optimizer groups. ValueError otherwise."""
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


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str | None, total_steps: int):
    """Per-step schedule: "cosine" (to 0 over total_steps), "onecycle" (peaking at each group's lr) or None."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps)
    return None


def set_phase(model: nn.Module, frozen: bool, trainable_at_start: set[str], device: torch.device,
              world: int) -> nn.Module:
    """Enter the frozen or the unfrozen phase; returns the module to train (DDP-wrapped when world > 1).

    Frozen: freeze_backbone (adapters and heads train; frozen BatchNorm held in eval). Unfrozen: the
    requires_grad flags the model had when fit started (frozen BatchNorm layers are released by the next
    train() once their parameters train again)."""
    if frozen:
        adapters.freeze_backbone(model)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable_at_start)
    if world == 1:
        return model
    # DDP registers the parameters that require grad when it is built: a new phase needs a new wrapper
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def output_width(model: nn.Module, probe: torch.Tensor) -> int:
    """Classes of the model's output on probe (2 for one logit per row), computed in eval mode."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return num_output_classes(model(probe))
    finally:
        for m, mode in was.items():
            m.training = mode


def train_epoch(wrapped, batches, bar, world: int, *, model, loss_fn, optimizer, scheduler, augment, target_fn,
                device, amp_dtype, grad_clip) -> float:
    """One pass over batches: per batch ``augment(x, y)``, targets (soft 2-D float labels as they are,
    else target_fn(labels) without IGNORE_INDEX rows), loss_fn(wrapped(x), targets) under autocast when
    amp_dtype is set, backward, clipping, optimizer and scheduler steps. Returns the mean training loss
    over rows, summed over ranks."""
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
