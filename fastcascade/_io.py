"""Files the package writes and reads back: atomic writes (a reader sees the old file or the complete new
one), the checksum stored in them and checked on load, the check that a value can be read back with
``torch.load(weights_only=True)``, and the lock that keeps two training runs out of one folder.

Temporary files are named ``.<name>.<random>.<pid>@<host>.tmp`` next to their target; a writer killed
before its rename leaves one behind, and the next write into that folder removes the temporary files of
writers that are no longer running on this host (a temporary file of a live writer, or of another host,
is never touched).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import pickle
import re
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock (see lock_folder)
    fcntl = None

CHECKSUM_ALGORITHM = "sha256"

# ---------------------------------------------------------------------------------------------------------
# what torch.load(weights_only=True) reads back (checked by experiment on torch 2.8 - 2.14): other types
# (numpy arrays and scalars, pathlib paths, defaultdict, frozenset, ...) are refused at load time


_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device,
           torch.layout)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, torch.Size)

_HINTS = {"numpy": "convert it with torch.from_numpy(x) (arrays) or x.item() (numpy scalars)",
          "pathlib": "store str(path)"}


def _refused(where: str, v) -> TypeError:
    kind = type(v)
    hint = _HINTS.get(kind.__module__.split(".")[0], "store tensors, Python numbers, str, bytes, lists, "
                                                        "tuples, sets or dicts of them")
    return TypeError(f"{where}: a {kind.__module__}.{kind.__qualname__} cannot be read back with "
                     f"torch.load(weights_only=True), which fastcascade's loaders use; {hint}")


def _user_safe(v) -> bool:
    """An instance of a class the user allowed with torch.serialization.add_safe_globals."""
    safe = torch.serialization.get_safe_globals()
    classes = (g[0] if isinstance(g, tuple) else g for g in safe)
    return any(isinstance(c, type) and type(v) is c for c in classes)


def _feed(h, obj, where: str) -> None:
    """Hash obj in a canonical form (type tags, keys, shapes, dtypes and raw tensor bytes) into h; TypeError
    naming `where` for a value that torch.load(weights_only=True) would refuse."""
    t = type(obj)
    if isinstance(obj, torch.Tensor):
        if t not in (torch.Tensor, torch.nn.Parameter):
            raise _refused(where, obj)
        x = obj.detach()
        if x.is_sparse:
            x = x.to_dense()
        elif x.is_quantized:
            x = x.dequantize()
        h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
        if x.numel() and x.device.type != "meta":
            h.update(x.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif t in _MAPPINGS:
        # order-free, as dict equality is: a dict rebuilt in another order has the same checksum
        digests = []
        for k, v in obj.items():
            sub = hashlib.new(CHECKSUM_ALGORITHM)
            _feed(sub, k, f"{where} key {k!r}")
            _feed(sub, v, f"{where}[{k!r}]")
            digests.append(sub.digest())
        h.update(f"D{len(obj)}".encode() + b"".join(sorted(digests)))
    elif t in _SEQUENCES:
        h.update(f"{t.__name__}{len(obj)}".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif t is set:
        # set order changes between processes (str hashing is salted): hash the sorted element digests
        digests = []
        for v in obj:
            sub = hashlib.new(CHECKSUM_ALGORITHM)
            _feed(sub, v, f"{where} element {v!r}")
            digests.append(sub.digest())
        h.update(f"S{len(obj)}".encode() + b"".join(sorted(digests)))
    elif t in _LEAVES:
        h.update(f"{t.__name__}:{obj!r};".encode())
    elif _user_safe(obj):
        h.update(f"{t.__module__}.{t.__qualname__}:".encode() + pickle.dumps(obj))
    else:
        raise _refused(where, obj)


def check_loadable(obj, where: str) -> None:
    """TypeError naming the first entry of obj (e.g. "extra['a']") that torch.load(weights_only=True) cannot
    read back; fastcascade refuses such values when it writes a file instead of writing one it then refuses."""
    _feed(_NullHash(), obj, where)


class _NullHash:
    def update(self, _data) -> None:
        pass


def checksum(obj, where: str = "the object") -> str:
    """"sha256:<hex>" of obj's content in a canonical form: every tensor's dtype, shape and raw bytes, every
    other value's type and repr, every key; lists and tuples in order, dicts and sets in any order. One
    flipped bit in any tensor changes it. Values torch.load(weights_only=True) cannot read raise TypeError
    (see check_loadable)."""
    h = hashlib.new(CHECKSUM_ALGORITHM)
    _feed(h, obj, where)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def checksum_problem(obj, stored) -> str | None:
    """Why obj does not match its stored checksum (a sentence), or None when it does."""
    if not isinstance(stored, str) or not stored.startswith(f"{CHECKSUM_ALGORITHM}:"):
        return f"its checksum entry is not a {CHECKSUM_ALGORITHM} checksum ({str(stored)[:40]!r})"
    try:
        now = checksum(obj)
    except TypeError as e:
        return f"it holds a value fastcascade does not write ({e})"
    if now != stored:
        return (f"its content does not match the checksum stored when it was written ({stored[:19]}..., now "
                f"{now[:19]}...): the file was damaged (disk, transfer, truncation) or edited")
    return None


# ---------------------------------------------------------------------------------------------------------
# atomic writes


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: alive
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Remove the temporary files in folder that writers on this host left when they were killed (their pid
    is no longer running); returns the removed paths."""
    folder, host, removed = pathlib.Path(folder), _host(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m and m["host"] == host and not _pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):  # another writer removed it first
                os.unlink(folder / name)
                removed.append(folder / name)
    return removed


class _Sink:
    """A binary file object over a raw fd that remembers the first OSError of a write: torch.save turns it
    into "[enforce fail at inline_container.cc] unexpected pos", atomic_write re-raises the real one."""

    def __init__(self, fd: int, chunk: int = 1 << 20):
        self.fd, self.chunk, self.buf, self.error = fd, chunk, bytearray(), None

    def write(self, data) -> int:
        view = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
        n = view.nbytes
        if len(self.buf) + n >= self.chunk:
            self.flush()
        if n >= self.chunk:
            self._write_all(view)  # large tensor data goes out without a copy
        else:
            self.buf += view
        return n

    def flush(self) -> None:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self._write_all(memoryview(data))

    def _write_all(self, view: memoryview) -> None:
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.error = self.error or e
            raise


def _write_error(path: pathlib.Path, e: OSError) -> OSError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "no space left on the device (disk or quota full)"
    elif e.errno == errno.EFBIG:
        what = "the file is larger than this process may write (ulimit -f) or the file system allows"
    else:
        what = e.strerror or str(e)
    err = OSError(e.errno, f"{path}: could not be written: {what}; the previous file, if any, is unchanged "
                           f"and nothing else was left behind")
    err.filename = str(path)
    return err


def fsync_folder(folder: pathlib.Path) -> None:
    """fsync a folder, so that a rename into it survives a power loss (no-op where folders cannot be opened)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb",
                 verify: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """write(file) into a temporary file in path's folder, fsynced, verify(temp path) when given, then
    os.replace onto path and fsync the folder. On any failure the temporary file is removed and path is
    untouched; a failed write (disk full, quota, ulimit) raises OSError with its errno, naming path. The
    file gets the permissions of a new file under the process's umask. mode "w" passes str writes as
    UTF-8. Stale temporary files of killed writers in the folder are removed first."""
    path = pathlib.Path(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{path}: cannot create its folder {path.parent}: a file is in the "
                                 f"way") from None
    remove_stale_temps(path.parent)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.{os.getpid()}@{_host()}.tmp"
        try:
            # 0o666 under the umask, as open() would give a new file (mkstemp would give 0600)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    sink = _Sink(fd)
    try:
        try:
            try:
                write(sink)
                sink.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _write_error(path, e) from None
        except Exception:
            if sink.error is not None:  # torch.save's RuntimeError hides the write's OSError
                raise _write_error(path, sink.error) from None
            raise
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)
    return path


def save_torch(obj, path: str | os.PathLike, verify: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """torch.save(obj) to path atomically (see atomic_write), after checking that
    torch.load(weights_only=True) can read every value back (TypeError naming the entry otherwise)."""
    check_loadable(obj, "the saved object")
    return atomic_write(path, lambda f: torch.save(obj, f), "wb", verify)


def write_bytes(data: bytes, path: str | os.PathLike) -> pathlib.Path:
    """data to path atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(data), "wb")


def write_json(obj, path: str | os.PathLike, default: Callable | None = None) -> pathlib.Path:
    """json.dump(obj, indent=1, default=default) and a final newline, to path atomically (see atomic_write)."""
    def write(f):
        f.write(json.dumps(obj, indent=1, default=default) + "\n")
    return atomic_write(path, write, "w")


# ---------------------------------------------------------------------------------------------------------
# the folder lock


LOCK_NAME = ".fastcascade.lock"


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike, purpose: str) -> Iterator[pathlib.Path]:
    """Hold an exclusive lock on folder (the file folder/.fastcascade.lock) for the duration of the block;
    RuntimeError naming the holder (pid, host, start time, purpose) when another process, or another open
    lock in this one, holds it.

    The lock is flock(2) on that file: the kernel releases it when its holder exits in any way (SIGKILL
    included), so a lock file left by a dead process never blocks. Without fcntl (not POSIX) nothing is
    locked. A folder the lock created is removed again if it is empty at the end (a run that failed
    before writing anything leaves nothing behind)."""
    folder = pathlib.Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if fcntl is None:
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = json.loads(path.read_text())
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, {holder.get('purpose')}, since "
                       f"{holder.get('started')}")
            except (OSError, ValueError, AttributeError):
                who = "a process that has not written its name yet"
            raise RuntimeError(f"{folder} is in use by another run ({who}); wait for it to finish, or pass "
                               f"another folder. The lock ({path}) is released when that process exits, "
                               f"however it ends") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    try:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote its files
                folder.rmdir()
