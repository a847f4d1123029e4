"""Checkpoints: save_checkpoint writes model (optimizer, scheduler) state atomically with a checksum and
verifies it by reloading it into a fresh copy of the model; read_checkpoint checks the checksum;
load_checkpoint checks the architecture, the optimizer and the scheduler before it changes anything."""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .._checks import bitwise_equal, few, listed
from .._io import check_loadable, checksum, checksum_problem, save_torch

__all__ = ["CHECKPOINT_FORMAT", "apply_checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "unwrap"]

#: /2 adds "checksum" (of every other entry), "optimizer_class" and "scheduler_class"; /1 files still load
#: (with a warning: their integrity cannot be checked).
CHECKPOINT_FORMAT = "fastcascade.checkpoint/2"
OLD_FORMATS = ("fastcascade.checkpoint/1",)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _tensor_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype)] for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _without_checksum(ckpt: Mapping) -> dict:
    return {k: v for k, v in ckpt.items() if k != "checksum"}


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
    problem = checksum_problem(_without_checksum(state), state.get("checksum"))
    if problem:
        raise RuntimeError(f"save_checkpoint: the file read back differs from what was written ({problem}); "
                           f"no checkpoint was written")
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
    """Write model (and optimizer, scheduler) state atomically, with a checksum, verified.

    The file is ``torch.save({"format", "model", "architecture", "model_class", "optimizer",
    "optimizer_class", "scheduler", "scheduler_class", "epoch", "extra", "checksum"})``, readable with
    ``torch.load(weights_only=True)``: `extra` may hold tensors, numbers, strings, bytes, lists, tuples,
    sets and dicts of them; anything else (a numpy array or scalar, a path) raises TypeError naming the
    entry before anything is written. "checksum" is fastcascade._io.checksum of every other entry
    (sha256 over keys, types, values and raw tensor bytes): read_checkpoint and load_checkpoint refuse a
    file that does not match it. The file is written to a temporary file in the same folder and, with
    verify=True, reloaded into a fresh copy of model (a deep copy whose parameters and buffers are all
    overwritten first): the checksum, every parameter and buffer, and the outputs on `probe` (the model's
    input, or a tuple of inputs, in eval mode) when given, must equal the in-memory model's bitwise. Only
    then is it renamed to `path`; otherwise RuntimeError, and no file is left behind. A write that fails
    (disk full) raises OSError naming `path`. Returns the path.
    """
    path = pathlib.Path(path)
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    extra = dict(extra) if extra is not None else {}
    check_loadable(extra, "extra")
    sd = model.state_dict()
    obj = {"format": CHECKPOINT_FORMAT, "model": sd, "architecture": _tensor_layout(sd),
           "model_class": type(model).__name__,
           "optimizer": optimizer.state_dict() if optimizer is not None else None,
           "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
           "scheduler": scheduler.state_dict() if scheduler is not None else None,
           "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
           "epoch": epoch, "extra": extra}
    obj["checksum"] = checksum(obj, "checkpoint")
    save_torch(obj, path, (lambda tmp: _verify_reload(tmp, model, probe)) if verify else None)
    return path


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict of a save_checkpoint file, its checksum checked. FileNotFoundError for a missing
    file; ValueError for a file that is not a fastcascade checkpoint or does not match its checksum
    (damaged). Files of the older format without a checksum load with a warning."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path}: not a readable torch.save file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it may be damaged or "
                         f"truncated") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if fmt not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise ValueError(f"checkpoint {path}: not a fastcascade checkpoint (format {fmt!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}; save_checkpoint writes one); for a plain state_dict use "
                         f"model.load_state_dict(torch.load(...))")
    if fmt in OLD_FORMATS:
        warnings.warn(f"checkpoint {path}: format {fmt!r} has no checksum, so damage to it cannot be detected; "
                      f"save it again with save_checkpoint to add one", stacklevel=2)
    else:
        problem = checksum_problem(_without_checksum(ckpt), ckpt.get("checksum"))
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}. Use another copy; nothing was loaded")
    missing = [k for k in ("model", "architecture", "epoch", "extra") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} is damaged: it lacks the entries {missing}")
    return ckpt


def _optimizer_problem(ckpt: Mapping, optimizer) -> str | None:
    """Why the checkpoint's optimizer state does not fit optimizer (torch's load_state_dict would raise, or
    load state of the wrong shape), or None."""
    saved_class = ckpt.get("optimizer_class")
    if saved_class is not None and saved_class != type(optimizer).__name__:
        return (f"its optimizer state was saved from {saved_class}, the optimizer given is "
                f"{type(optimizer).__name__}")
    saved = ckpt["optimizer"]
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), Mapping):
        return "its optimizer entry is not an optimizer state_dict"
    groups, mine = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(mine):
        return f"its optimizer has {len(groups)} parameter group(s), the optimizer given {len(mine)}"
    sizes, my_sizes = [len(g.get("params", ())) for g in groups], [len(g["params"]) for g in mine]
    if sizes != my_sizes:
        return f"its optimizer's groups hold {sizes} parameters, those of the optimizer given {my_sizes}"
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in mine for p in g["params"]]
    for pos, (i, p) in enumerate(zip(ids, params)):
        for k, v in (saved["state"].get(i) or {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                return (f"its optimizer state {k!r} of parameter {pos} has shape {list(v.shape)}, that "
                        f"parameter of the optimizer given {list(p.shape)}")
    return None


def _scheduler_problem(ckpt: Mapping, scheduler) -> str | None:
    saved_class = ckpt.get("scheduler_class")
    if saved_class is not None and saved_class != type(scheduler).__name__:
        return (f"its scheduler state was saved from {saved_class}, the scheduler given is "
                f"{type(scheduler).__name__}")
    saved = ckpt["scheduler"]
    if not isinstance(saved, Mapping):
        return "its scheduler entry is not a scheduler state_dict"
    mine = scheduler.state_dict()
    missing = sorted(set(mine) - set(saved))
    if missing:
        return f"its scheduler state lacks {few(missing, as_list=True)}"
    lrs, my_lrs = saved.get("base_lrs"), mine.get("base_lrs")
    if isinstance(lrs, list) and isinstance(my_lrs, list) and len(lrs) != len(my_lrs):
        return f"its scheduler drives {len(lrs)} parameter group(s), the scheduler given {len(my_lrs)}"
    return None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, map_location="cpu", check_folder: bool = True) -> dict:
    """Load a save_checkpoint file into model (and optimizer, scheduler); returns the checkpoint dict
    (its "epoch" and "extra" entries included).

    Raises FileNotFoundError for a missing file and ValueError, before changing anything, for a file
    that is not a fastcascade checkpoint, does not match its checksum (damaged), was saved from another
    architecture (the first missing, unexpected and differently shaped entries are named), or whose
    optimizer / scheduler state does not fit the one passed (none saved, another class, other parameter
    groups or shapes).

    With check_folder=True (the default), a fit run's best.pt is checked against the last.pt beside it:
    when last.pt names another best epoch, or belongs to another run, best.pt is stale (fit was killed
    after committing last.pt and before copying it to best.pt) and ValueError says how to repair the
    folder (resume the run from that last.pt with its own arguments; a finished run trains nothing).
    check_folder=False loads the file as it is.
    """
    ckpt = read_checkpoint(path, map_location)
    if check_folder:
        problem = _stale_best_problem(ckpt, pathlib.Path(path))
        if problem:
            raise ValueError(problem)
    return apply_checkpoint(ckpt, path, model, optimizer, scheduler)


def _stale_best_problem(ckpt: Mapping, path: pathlib.Path) -> str | None:
    """Why a fit run's best.pt does not hold the best epoch that the last.pt next to it names, or None
    (not a best.pt of fit, no readable last.pt beside it, or the two agree)."""
    last_path = path.parent / "last.pt"
    mine = ckpt["extra"].get("fit")
    if path.name != "best.pt" or not isinstance(mine, Mapping) or not last_path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an old format's "no checksum" is about the sibling, not path
            last = read_checkpoint(last_path)
    except ValueError:
        return None  # a damaged last.pt says nothing about best.pt; resuming from it raises on its own
    theirs = last["extra"].get("fit")
    if not isinstance(theirs, Mapping) or theirs.get("best_epoch") is None:
        return None
    my_run, their_run = mine.get("run_id"), theirs.get("run_id")
    other_run = my_run is not None and their_run is not None and my_run != their_run
    if not other_run and theirs["best_epoch"] == ckpt["epoch"]:
        return None
    what = ("belongs to another run" if other_run else f"says the run's best epoch is {theirs['best_epoch']}")
    return (f"checkpoint {path} holds epoch {ckpt['epoch']}, but {last_path} next to it {what} (epoch "
            f"{last['epoch']}): fit was killed after writing last.pt and before copying it to best.pt, so "
            f"best.pt is stale. Repair the folder by resuming that run with its own arguments: fit(..., "
            f"resume={str(last_path)!r}, out_dir={str(path.parent)!r}) (a finished run trains nothing; its "
            f"best.pt and history.json are rewritten); or pass check_folder=False to load this file as it is")


def apply_checkpoint(ckpt: Mapping, path, model: nn.Module, optimizer=None, scheduler=None) -> Mapping:
    """Load a dict from read_checkpoint (read from `path`, for messages) into model, optimizer, scheduler:
    everything is checked first, so a ValueError leaves all three as they were."""
    model = unwrap(model)
    mine = _tensor_layout(model.state_dict())
    saved = ckpt["architecture"]
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [f"{k} {saved[k][0]} vs {mine[k][0]}" for k in mine if k in saved and saved[k] != mine[k]]
    if missing or unexpected or shapes:
        parts = listed(((f"{len(missing)} entries of the model are not in the checkpoint", missing),
                        (f"{len(unexpected)} checkpoint entries are not in the model", unexpected),
                        (f"{len(shapes)} entries differ in shape or dtype, checkpoint vs model", shapes)), 5)
        raise ValueError(f"checkpoint {path} was saved from another architecture ({ckpt.get('model_class')}, "
                         f"{len(saved)} entries) than this {type(model).__name__} ({len(mine)} entries): "
                         + parts)
    for name, obj, check in (("optimizer", optimizer, _optimizer_problem),
                             ("scheduler", scheduler, _scheduler_problem)):
        if obj is None:
            continue
        if ckpt.get(name) is None:
            raise ValueError(f"checkpoint {path} holds no {name} state, but {name}= was given")
        problem = check(ckpt, obj)
        if problem:
            raise ValueError(f"checkpoint {path} does not fit the {name} given: {problem}; nothing was loaded")
    # the model last: optimizer and scheduler can be put back from their own state_dicts if a later step
    # fails, the model's parameters are overwritten in place
    undo = []
    try:
        if optimizer is not None:
            before = optimizer.state_dict()
            optimizer.load_state_dict(ckpt["optimizer"])
            undo.append(lambda: optimizer.load_state_dict(before))
        if scheduler is not None:
            before_s = copy.deepcopy(scheduler.state_dict())
            scheduler.load_state_dict(ckpt["scheduler"])
            undo.append(lambda: scheduler.load_state_dict(before_s))
        model.load_state_dict(ckpt["model"])
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return ckpt
