"""Checkpoints: save_checkpoint writes model (optimizer, scheduler) state atomically and verifies it by
reloading it into a fresh copy of the model; load_checkpoint checks the architecture before it changes
anything."""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from collections.abc import Mapping

import torch
from torch import nn

from .._checks import bitwise_equal, few
from .._io import save_torch

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "read_checkpoint", "save_checkpoint", "unwrap"]

CHECKPOINT_FORMAT = "fastcascade.checkpoint/1"


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _tensor_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype)] for k, v in sd.items() if isinstance(v, torch.Tensor)}




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
    differ = [k for k in mine if not bitwise_equal(mine[k], theirs[k])]
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
    bad = [k for k in ref if not bitwise_equal(ref[k], got[k])]
    if bad:
        k = bad[0]
        diff = (ref[k].double() - got[k].double()).abs().nan_to_num(float("inf")).max().item() \
            if ref[k].shape == got[k].shape else "shape"
        raise RuntimeError(f"save_checkpoint: the reloaded model's {k} on the probe batch differs from the "
                           f"in-memory model's (max abs difference {diff}): the model has state that "
                           f"state_dict does not capture; no checkpoint was written")


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
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd = model.state_dict()
    obj = {"format": CHECKPOINT_FORMAT, "model": sd, "architecture": _tensor_layout(sd),
           "model_class": type(model).__name__,
           "optimizer": optimizer.state_dict() if optimizer is not None else None,
           "scheduler": scheduler.state_dict() if scheduler is not None else None,
           "epoch": epoch, "extra": dict(extra) if extra is not None else {}}
    save_torch(obj, path, (lambda tmp: _verify_reload(tmp, model, probe)) if verify else None)
    return path


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
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


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, map_location="cpu") -> dict:
    """Load a save_checkpoint file into model (and optimizer, scheduler); returns the checkpoint dict
    (its "epoch" and "extra" entries included).

    Raises FileNotFoundError for a missing file and ValueError, before changing anything, for a file
    that is not a fastcascade checkpoint or one saved from another architecture (the first missing,
    unexpected and differently shaped entries are named), or when an optimizer / scheduler is passed but
    the checkpoint has none.
    """
    ckpt = read_checkpoint(path, map_location)
    model = unwrap(model)
    mine = _tensor_layout(model.state_dict())
    saved = ckpt["architecture"]
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [f"{k} {saved[k][0]} vs {mine[k][0]}" for k in mine if k in saved and saved[k] != mine[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} entries of the model are not in the checkpoint ({few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint entries are not in the model ({few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} entries differ in shape or dtype, checkpoint vs model "
                         f"({few(shapes)})")
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
