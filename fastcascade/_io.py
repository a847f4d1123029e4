"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable

import torch


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb",
                 verify: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """write(file) into a temporary file in path's folder, flushed and fsynced, verify(temp path) when
    given, then os.replace onto path. On any failure the temporary file is removed and path is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(pathlib.Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_torch(obj, path: str | os.PathLike, verify: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """torch.save(obj) to path atomically (see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f), "wb", verify)


def write_json(obj, path: str | os.PathLike, default: Callable | None = None) -> pathlib.Path:
    """json.dump(obj, indent=1, default=default) and a final newline, to path atomically (see atomic_write)."""
    def write(f):
        json.dump(obj, f, indent=1, default=default)
        f.write("\n")
    return atomic_write(path, write, "w")
