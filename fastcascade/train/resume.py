"""fit's checkpoint glue: the Checkpointing settings, what each epoch writes into out_dir (last.pt, best.pt,
epoch-NNNN.pt, history.json) and how a run resumes from them. The checkpoint files themselves are
checkpoint.py's (save_checkpoint, read_checkpoint)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import numbers
import os
import pathlib
import uuid
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from .._checks import file_in_the_way
from .._io import lock_folder, write_bytes, write_json
from .checkpoint import apply_checkpoint, read_checkpoint, save_checkpoint
from .history import RunState
from .rng import augment_state, rng_state, set_augment_state, set_rng_state

__all__ = ["Checkpointing", "RunFiles"]

#: the entries of a checkpoint's extra["fit"] that resume needs
_RESUME_ENTRIES = ("history", "best_value", "best_epoch", "bad_epochs", "trainable_at_start", "rng",
                   "sampler_generator", "augment")


def _path_arg(name: str, value) -> pathlib.Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    return pathlib.Path(value)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where fit writes its checkpoints and what it resumes from; fit builds one from its keywords of the
    same names.

    Attributes:
        out_dir: None (no files) or a folder, created if missing, where rank 0 writes, every epoch,
            last.pt, then best.pt when the epoch improved and epoch-NNNN.pt every checkpoint_every
            epochs (byte copies of last.pt), then history.json. Stored as a pathlib.Path.
        checkpoint_every: None or an int >= 1.
        resume: None or a checkpoint written by fit (last.pt or epoch-NNNN.pt), in any folder.
    Raises: TypeError for an out_dir or resume that is not a path; ValueError for an out_dir that is a
        file or under one, or a checkpoint_every that is not None or an int >= 1.
    """

    out_dir: pathlib.Path | None = None
    checkpoint_every: int | None = None
    resume: pathlib.Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "out_dir", _path_arg("out_dir", self.out_dir))
        object.__setattr__(self, "resume", _path_arg("resume", self.resume))
        blocker = file_in_the_way(self.out_dir) if self.out_dir is not None else None
        if blocker is not None:
            itself = blocker == self.out_dir.expanduser()
            where = "is a file" if itself else f"is under {blocker}, which is a file"
            raise ValueError(f"out_dir={str(self.out_dir)!r} {where}; fit writes its checkpoints into a "
                             f"folder")
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral)
                                  or every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {every!r}")

    @property
    def best_path(self) -> pathlib.Path | None:
        return self.out_dir / "best.pt" if self.out_dir is not None else None

    def archives(self, epoch: int) -> bool:
        """Whether epoch (1-based) gets an epoch-NNNN.pt."""
        return self.checkpoint_every is not None and epoch % self.checkpoint_every == 0

    def lock(self, purpose: str, rank: int):
        """Rank 0's lock on out_dir for the run (two runs writing one folder would interleave their
        checkpoints: the second one raises RuntimeError); a no-op elsewhere or without out_dir."""
        if self.out_dir is None or rank != 0:
            return contextlib.nullcontext()
        return lock_folder(self.out_dir, purpose)


@dataclasses.dataclass
class RunFiles:
    """The checkpoint glue of one fit run: the settings and the live objects a checkpoint of fit saves
    besides its RunState (model, optimizer, scheduler, the sampler's generator, the augmentation's state),
    the probe batch save_checkpoint verifies on, and the ranks."""

    settings: Checkpointing
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    probe: torch.Tensor
    gen: torch.Generator
    augment: object
    monitor: str
    rank: int
    world: int

    def save_epoch(self, run: RunState, epoch: int, improved: bool) -> None:
        """Rank 0 writes last.pt, then best.pt when the epoch improved and epoch-NNNN.pt when archived
        (byte copies of last.pt), then history.json; every rank waits until they exist.

        last.pt is the commit point, and it is self-contained: it carries the best weights (unless its own
        epoch is the best one), so resuming from it never depends on best.pt. A kill before its rename
        leaves the previous epoch's consistent set; a kill after it leaves files that resume rewrites
        (best.pt is made to hold the best epoch again, history.json is written every epoch)."""
        out_dir = self.settings.out_dir
        state = {"run_id": run.run_id, "history": run.history, "best_value": run.best_value,
                 "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs,
                 "best_model": None if run.best_epoch == epoch else run.best_state,
                 "trainable_at_start": sorted(run.trainable_at_start), "rng": rng_state(),
                 "sampler_generator": self.gen.get_state(), "augment": augment_state(self.augment),
                 "monitor": self.monitor}
        if self.rank == 0:
            last = save_checkpoint(out_dir / "last.pt", self.model, self.optimizer, self.scheduler, epoch,
                                   {"fit": state}, probe=self.probe)
            copies = [out_dir / "best.pt"] if improved else []
            if self.settings.archives(epoch):
                copies.append(out_dir / f"epoch-{epoch:04d}.pt")
            if copies:
                data = last.read_bytes()
                for path in copies:
                    write_bytes(data, path)
            write_json(run.history, out_dir / "history.json")
        if self.world > 1:
            dist.barrier()  # the files exist for every rank once fit moves on

    def resume(self, epochs: int) -> RunState:
        """Restores model, optimizer, scheduler and the RNG states from settings.resume, a checkpoint
        written by fit; returns the run's state. Rank 0 makes out_dir/best.pt hold the run's best epoch
        (and out_dir/epoch-NNNN.pt the checkpoint's epoch when it is archived: a kill may have come
        before it was written). ValueError for a checkpoint fit did not write, one written after a
        resume with the best weights only, one past `epochs`, or one whose best weights do not fit.

        A finished run (the checkpoint is at `epochs`, or its last epoch stopped early) has nothing left
        to train: its state is returned with start = epochs, and rank 0 also rewrites out_dir/history.json
        when it is not the checkpoint's history. A kill in the final epoch, after last.pt and before
        best.pt, leaves exactly that folder; when anything was rewritten a UserWarning says what.

        The best weights come from the checkpoint itself (its own weights when its epoch is the best one,
        else the copy it carries); only checkpoints of older fastcascade versions send us to a best.pt,
        looked up next to the checkpoint, never through a stored path: the folder may have moved, and a
        relative path would resolve against another cwd."""
        path = self.settings.resume
        ckpt = read_checkpoint(path)
        state = _fit_state(ckpt, path, epochs)
        epoch, best = ckpt["epoch"], _best_weights(ckpt, state, path)
        apply_checkpoint(ckpt, path, self.model, self.optimizer, self.scheduler)
        run = RunState(trainable_at_start=set(state["trainable_at_start"]), history=list(state["history"]),
                       best_value=state["best_value"], best_epoch=state["best_epoch"],
                       bad_epochs=state["bad_epochs"], start=epoch,
                       run_id=state.get("run_id") or uuid.uuid4().hex)  # older checkpoints have none
        set_rng_state(state["rng"])
        self.gen.set_state(state["sampler_generator"])
        set_augment_state(self.augment, state["augment"])
        if best is None:
            run.keep_current_weights(self.model)
        else:
            run.best_state = dict(best)
        finished = epoch == epochs or bool(run.history and run.history[-1].get("stopped_early"))
        if finished:
            run.start = epochs
        out_dir = self.settings.out_dir
        if out_dir is not None and self.rank == 0:
            repaired = self._restore_best_file(run, path, epoch)
            archive = out_dir / f"epoch-{epoch:04d}.pt"
            if self.settings.archives(epoch) and archive != path and not _holds(archive, run.run_id, epoch):
                write_bytes(path.read_bytes(), archive)
            if finished:
                history_file = out_dir / "history.json"
                if _json_of(history_file) != json.loads(json.dumps(run.history)):
                    write_json(run.history, history_file)
                    repaired.append(f"history.json now holds its {len(run.history)} epochs")
                if repaired:
                    warnings.warn(f"resume={str(path)!r}: the run had finished (epoch {epoch}, best epoch "
                                  f"{run.best_epoch}), so nothing was trained; the folder {str(out_dir)!r} was "
                                  f"brought in line with the checkpoint: " + "; ".join(repaired),
                                  UserWarning, stacklevel=3)
        return run

    def _restore_best_file(self, run: RunState, source: pathlib.Path, epoch: int) -> list[str]:
        """Make out_dir/best.pt hold the run's best epoch; returns what was rewritten, for a message ([]
        when best.pt was right). It may not be: the run was killed between last.pt and best.pt, or resumes
        into another folder, or from an older checkpoint after best.pt moved on. A file that holds that
        epoch (the resumed checkpoint itself, or best.pt / epoch-NNNN.pt next to it) is copied as it is;
        otherwise best.pt is written from the best weights alone (no optimizer or RNG state)."""
        target = self.settings.out_dir / "best.pt"
        if _holds(target, run.run_id, run.best_epoch):
            return []
        before = _epoch_held(target, run.run_id)
        done = [f"best.pt now holds epoch {run.best_epoch} (it held {before})"]
        candidates = [source] if epoch == run.best_epoch else []
        candidates += [source.parent / "best.pt", source.parent / f"epoch-{run.best_epoch:04d}.pt"]
        for c in candidates:
            if c != target and _holds(c, run.run_id, run.best_epoch):
                write_bytes(c.read_bytes(), target)
                return done
        best_model = copy.deepcopy(self.model)
        best_model.load_state_dict(run.best_state)
        state = {"run_id": run.run_id, "best_epoch": run.best_epoch, "best_value": run.best_value,
                 "history": run.history[:run.best_epoch], "weights_only": True}
        save_checkpoint(target, best_model, epoch=run.best_epoch, extra={"fit": state}, probe=self.probe)
        return done


def _fit_state(ckpt: Mapping, path: pathlib.Path, epochs: int) -> Mapping:
    """The checkpoint's training state (extra["fit"]), checked to hold what resume needs."""
    state = ckpt["extra"].get("fit")
    if not isinstance(state, Mapping):
        raise ValueError(f"resume={str(path)!r}: the checkpoint was not written by fit (no training state)")
    missing = [k for k in _RESUME_ENTRIES if k not in state]
    if missing:
        what = (f"lacks the training state entries {missing}" if not state.get("weights_only") else
                "holds the best weights only (written after a resume); resume from last.pt or an epoch-NNNN.pt")
        raise ValueError(f"resume={str(path)!r}: the checkpoint {what}")
    if ckpt["epoch"] > epochs:
        raise ValueError(f"resume={str(path)!r} is at epoch {ckpt['epoch']}, past epochs={epochs}: pass the "
                         f"run's own epochs (resuming a finished run trains nothing and repairs its folder)")
    return state


def _best_weights(ckpt: Mapping, state: Mapping, path: pathlib.Path) -> dict | None:
    """The weights of the run's best epoch, or None when it is the checkpoint's own epoch."""
    best_epoch = state["best_epoch"]
    if best_epoch == ckpt["epoch"]:
        return None
    best = state.get("best_model")
    if best is None:
        best = _old_best_weights(path, state, best_epoch)
    layout = {k: (v.shape, v.dtype) for k, v in best.items() if isinstance(v, torch.Tensor)}
    if layout != {k: (v.shape, v.dtype) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}:
        raise ValueError(f"resume={str(path)!r}: the best weights it carries (epoch {best_epoch}) do not fit "
                         f"its own model's entries; the checkpoint is damaged")
    return best


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


def _json_of(path: pathlib.Path):
    """The JSON value in path, or None when it is missing or unreadable (a kill mid-write leaves the old one)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _epoch_held(path: pathlib.Path, run_id: str) -> str:
    """What a best.pt holds, in words: "epoch 3", "epoch 1 of another run", "no file", "a damaged file"."""
    if not path.is_file():
        return "no file"
    try:
        ckpt = read_checkpoint(path)
    except ValueError:
        return "a damaged file"
    fit_state = ckpt["extra"].get("fit")
    other = isinstance(fit_state, Mapping) and fit_state.get("run_id") not in (None, run_id)
    return f"epoch {ckpt['epoch']}" + (" of another run" if other else "")


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
