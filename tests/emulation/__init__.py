"""Build and call the CUDA emulation (cuda_emulation.h + emulated_ops.cpp) from the tests.

build(mutation) compiles the kernels of csrc/*/*_kernels.cuh for the host, once: the shared library is
cached under build/emulation/ keyed by a hash of every source it reads, the flags, the compiler and
torch, so a rerun with unchanged sources loads it without compiling. Mutation builds (-DFC_MUTATE_<name>=1)
are narrowed to the metrics and focal kernels in float32 / int64 to keep their compile short.

The op functions mirror the CUDA ops' host code after their checks: the caller's tensors are the op's
buffers, exactly as large as the op allocates them; outputs start poisoned (NaN, or the op's zeros
where the op zero-fills), so an element the kernels never write shows."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CSRC = REPO / "csrc"
CACHE = REPO / "build" / "emulation"

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
# DeviceLimits (csrc/common/launch.h) of the launch shapes the emulated runs take
H100 = (132, 227 * 1024)
SMALL_GPU = (2, 48 * 1024)
DEVICES = {"h100": H100, "small": SMALL_GPU}

# The mutants the kernels carry under FC_MUTATION(name) (csrc/common/device_shared.cuh).
MUTATIONS = ("BLOCK_SUM_SECOND_SYNC", "TAIL_OFF_BY_ONE", "SHUFFLE_OFFSET", "HIST_NOT_ZEROED")

SOURCES = ("emulated_ops.cpp", "runtime_checks.cpp")

_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.uint8: 4, torch.bool: 5,
          torch.int32: 6, torch.int64: 7}


class EmulationError(RuntimeError):
    """A fault the emulation caught: a deadlock, a lane missing from a warp operation, a shared index out
    of range, shared memory beyond the launch configuration's count."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("the CUDA emulation needs a C++ compiler (g++); set CXX")
    return cxx


def _flags(mutation: str | None) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-Wno-unknown-pragmas", "-DFASTCASCADE_EMULATION"]
    if mutation is not None:
        if mutation not in MUTATIONS:
            raise ValueError(f"mutation must be one of {MUTATIONS}, got {mutation!r}")
        flags += [f"-DFC_MUTATE_{mutation}=1", "-DFC_EMU_NARROW"]
    flags += [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}", f"-I{HERE}"]
    return flags


def _key(cxx: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh"), *HERE.glob("*.h"), *HERE.glob("*.cpp")]):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join(flags).encode() + version.encode() + torch.__version__.encode())
    return h.hexdigest()[:16]


_LOADED: dict = {}


def _target(mutation: str | None) -> tuple[Path, list[str]]:
    """The cached library of this variant, and the command that builds it (its output path last but the links)."""
    cxx, flags = _compiler(), _flags(mutation)
    lib_dir = Path(torch.__file__).parent / "lib"
    so = CACHE / f"emulated_{(mutation or 'kernels').lower()}_{_key(cxx, flags)}.so"
    sources = SOURCES if mutation is None else SOURCES[:1]  # mutants: the kernels only
    cmd = [cxx, *flags, *(str(HERE / f) for f in sources), "-o", "{out}", f"-L{lib_dir}", "-lc10",
           f"-Wl,-rpath,{lib_dir}"]
    return so, cmd


def prebuild(mutations) -> None:
    """Compile the variants not cached yet, all at once (a compile is one process: they use the cores in
    parallel)."""
    jobs = []
    for m in mutations:
        so, cmd = _target(m)
        if so.exists():
            continue
        CACHE.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE)
        os.close(fd)
        cmd = [tmp if c == "{out}" else c for c in cmd]
        jobs.append((so, tmp, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    errors = []
    for so, tmp, cmd, proc in jobs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            os.unlink(tmp)
            errors.append(f"{' '.join(cmd)}\n{err[-6000:]}")
        else:
            os.replace(tmp, so)  # atomic: a concurrent build of the same key writes the same bytes
    if errors:
        raise RuntimeError("building the CUDA emulation failed:\n" + "\n".join(errors))


def build(mutation: str | None = None) -> "Emulated":
    """The emulated kernels (with one mutant switched on, or none), compiled once and cached."""
    if mutation not in _LOADED:
        prebuild([mutation])
        _LOADED[mutation] = Emulated(ctypes.CDLL(str(_target(mutation)[0])))
    return _LOADED[mutation]


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else None)


_PAGE = os.sysconf("SC_PAGE_SIZE")
_POISON = 0xA5


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class _Guarded:
    """A copy of the contiguous tensor t that ends where a page no access is allowed to begins (within
    the 15 bytes that keep t's address modulo 16, so the kernels take the same vector paths): a read or
    write past the end faults. The bytes around the copy are poisoned and checked after the call.
    Faults kill the process: run guarded calls in a subprocess."""

    def __init__(self, libc, t: torch.Tensor):
        self.libc, self.t = libc, t
        self.nbytes = t.numel() * t.element_size()
        self.span = (self.nbytes + 16 + _PAGE - 1) // _PAGE * _PAGE
        self.base = libc.mmap(None, self.span + _PAGE, 3, 0x22, -1, 0)  # PROT_READ | PROT_WRITE, MAP_PRIVATE | ANON
        if self.base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of a guarded buffer failed")
        if libc.mprotect(self.base + self.span, _PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        end = self.base + self.span
        self.start = ((end - self.nbytes) & ~15) | (t.data_ptr() % 16)
        if self.start + self.nbytes > end:
            self.start -= 16
        ctypes.memset(self.base, _POISON, self.span)
        self.raw = torch.frombuffer((ctypes.c_char * self.span).from_address(self.base), dtype=torch.uint8)
        self.off = self.start - self.base
        self.raw[self.off: self.off + self.nbytes].copy_(self._bytes())

    def _bytes(self) -> torch.Tensor:
        return self.t.as_strided((self.t.numel(),), (1,)).view(torch.uint8)  # memory order (channels_last too)

    def release(self) -> str | None:
        """Copies the buffer back into t; returns what went wrong around it, if anything."""
        self._bytes().copy_(self.raw[self.off: self.off + self.nbytes])
        around = torch.cat([self.raw[: self.off], self.raw[self.off + self.nbytes:]])
        bad = None if bool((around == _POISON).all()) else f"a write outside a buffer of {self.nbytes} bytes"
        del self.raw
        self.libc.munmap(self.base, self.span + _PAGE)
        return bad


def _i64(v: int):
    return ctypes.c_int64(int(v))


class Emulated:
    """The CUDA ops under the emulation. Every call takes device=(sms, opt-in shared bytes), a schedule
    name and a seed (random schedule); inputs are CPU tensors in the layout the op's .cu passes to its
    kernels (contiguous)."""

    def __init__(self, lib: ctypes.CDLL, guard: bool = False):
        self.lib, self.guard = lib, guard
        lib.fc_emu_error.restype = ctypes.c_char_p
        self._live: list = []
        self._libc = _libc() if guard else None

    def guarded(self) -> "Emulated":
        """The same kernels, every buffer they get copied next to a guard page (see _Guarded): run in a
        subprocess, since an access out of bounds kills the process."""
        return Emulated(self.lib, guard=True)

    def _p(self, t: torch.Tensor | None):
        if not self.guard or t is None or t.numel() == 0:
            return _ptr(t)
        g = _Guarded(self._libc, t)
        self._live.append(g)
        return ctypes.c_void_p(g.start)

    def _check(self, rc: int):
        faults = [f for f in (g.release() for g in self._live) if f]
        self._live.clear()
        if rc != 0:
            raise EmulationError(self.lib.fc_emu_error().decode())
        if faults:
            raise EmulationError("; ".join(faults))

    def runtime_check(self, which: int, schedule: str = "forward", seed: int = 0, out=None, out2=None, out3=None):
        """One of runtime_checks.cpp's toy kernels (see fc_emu_runtime_check); raises EmulationError with
        the fault the runtime reports."""
        self.lib.fc_emu_runtime_error.restype = ctypes.c_char_p
        rc = self.lib.fc_emu_runtime_check(ctypes.c_int(which), ctypes.c_int(SCHEDULES[schedule]),
                                           ctypes.c_uint64(seed), self._p(out), self._p(out2), self._p(out3))
        faults = [f for f in (g.release() for g in self._live) if f]
        self._live.clear()
        if rc != 0:
            raise EmulationError(self.lib.fc_emu_runtime_error().decode())
        if faults:
            raise EmulationError("; ".join(faults))

    def confusion_matrix(self, pred, target, num_classes, ignore_index=None, *, device=H100, schedule="forward",
                         seed=0):
        pred, target = pred.contiguous(), target.contiguous()
        out = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # the op allocates zeros
        self._check(self.lib.fc_emu_confusion(
            _CODES[pred.dtype], self._p(pred), _CODES[target.dtype], self._p(target), _i64(pred.numel()),
            _i64(num_classes), ctypes.c_int(ignore_index is not None), _i64(ignore_index or 0), _i64(device[0]),
            _i64(device[1]), ctypes.c_int(SCHEDULES[schedule]), ctypes.c_uint64(seed), self._p(out)))
        return out

    def sigmoid_focal(self, logits, targets, alpha, gamma, label_smoothing, reduction, need_grad, *, device=H100,
                      schedule="forward", seed=0):
        """(loss, grad, grad_scale) as the sigmoid_focal op returns them; reduction 0 none, 1 mean, 2 sum.
        Alignment is the caller's: a view at an odd offset takes the scalar path, as on the device."""
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss = torch.full(logits.shape if reduction == 0 else (), float("nan"), dtype=logits.dtype)
        grad = torch.full(logits.shape if need_grad else (0,), float("nan"), dtype=logits.dtype)
        grad_scale = torch.full((), float("nan"), dtype=acc)
        self._check(self.lib.fc_emu_sigmoid_focal(
            _CODES[logits.dtype], self._p(logits), _CODES[targets.dtype], self._p(targets), _i64(logits.numel()),
            ctypes.c_double(alpha), ctypes.c_double(gamma), ctypes.c_double(label_smoothing), ctypes.c_int(reduction),
            ctypes.c_int(need_grad), _i64(device[0]), _i64(device[1]), ctypes.c_int(SCHEDULES[schedule]),
            ctypes.c_uint64(seed), self._p(loss), self._p(grad), self._p(grad_scale)))
        return loss, grad, grad_scale

    def softmax_focal(self, logits, target, weight, gamma, label_smoothing, ignore_index, reduction, need_grad, *,
                      device=H100, schedule="forward", seed=0):
        """(loss, grad, grad_scale) of the softmax_focal op on (N, C) or (N, C, S) logits."""
        logits, target = logits.contiguous(), target.contiguous()
        N, C = logits.shape[0], logits.shape[1]
        S = logits.shape[2] if logits.dim() == 3 else 1
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(acc).contiguous()
        loss = torch.full(target.shape if reduction == 0 else (), float("nan"), dtype=logits.dtype)
        grad = torch.full(logits.shape if need_grad else (0,), float("nan"), dtype=logits.dtype)
        grad_scale = torch.full((), float("nan"), dtype=acc)
        self._check(self.lib.fc_emu_softmax_focal(
            _CODES[logits.dtype], self._p(logits), self._p(target), self._p(w), _i64(N), _i64(C), _i64(S),
            ctypes.c_double(gamma), ctypes.c_double(label_smoothing), _i64(ignore_index), ctypes.c_int(reduction),
            ctypes.c_int(need_grad), _i64(device[0]), _i64(device[1]), ctypes.c_int(SCHEDULES[schedule]),
            ctypes.c_uint64(seed), self._p(loss), self._p(grad), self._p(grad_scale)))
        return loss, grad, grad_scale

    def softmax_focal_prob(self, logits, probs, weight, gamma, label_smoothing, reduction, need_grad, *, device=H100,
                           schedule="forward", seed=0):
        """(loss, grad, grad_scale) of the softmax_focal op with class-probability targets (the logits' shape,
        (N, C) or (N, C, S)), converted as focal_cuda.cu does: kept in the logits' dtype or float32."""
        from fastcascade import reference

        tol = reference.probability_tolerance(probs.dtype)
        if probs.dtype != logits.dtype:
            probs = probs.float()
        logits, probs = logits.contiguous(), probs.contiguous()
        N, C = logits.shape[0], logits.shape[1]
        S = logits.shape[2] if logits.dim() == 3 else 1
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(acc).contiguous()
        loss = torch.full((N, S) if logits.dim() == 3 and reduction == 0 else ((N,) if reduction == 0 else ()),
                          float("nan"), dtype=logits.dtype)
        grad = torch.full(logits.shape if need_grad else (0,), float("nan"), dtype=logits.dtype)
        grad_scale = torch.full((), float("nan"), dtype=acc)
        self._check(self.lib.fc_emu_softmax_focal_prob(
            _CODES[logits.dtype], self._p(logits), _CODES[probs.dtype], self._p(probs), self._p(w), _i64(N), _i64(C),
            _i64(S), ctypes.c_double(gamma), ctypes.c_double(label_smoothing), ctypes.c_double(tol),
            ctypes.c_int(reduction), ctypes.c_int(need_grad), _i64(device[0]), _i64(device[1]),
            ctypes.c_int(SCHEDULES[schedule]), ctypes.c_uint64(seed), self._p(loss), self._p(grad),
            self._p(grad_scale)))
        return loss, grad, grad_scale

    # routing

    def _rows_args(self, device, schedule, seed):
        return (_i64(device[0]), _i64(device[1]), ctypes.c_int(SCHEDULES[schedule]), ctypes.c_uint64(seed))

    def route_threshold(self, logits, logit_threshold, *, device=H100, schedule="forward", seed=0):
        x = logits.reshape(logits.shape[0]).contiguous()
        out = torch.full((x.shape[0],), -7, dtype=torch.int32)
        self._check(self.lib.fc_emu_route_threshold(_CODES[x.dtype], self._p(x), _i64(x.shape[0]),
                                                    ctypes.c_double(logit_threshold),
                                                    *self._rows_args(device, schedule, seed), self._p(out)))
        return out

    def route_rows(self, logits, temperature=0.0, max_sum=0.0, *, device=H100, schedule="forward", seed=0):
        """route_argmax (temperature 0) or route_confident (temperature > 0, max_sum = 1 / tau)."""
        x = logits.contiguous()
        out = torch.full((x.shape[0],), -7, dtype=torch.int32)
        self._check(self.lib.fc_emu_route_rows(_CODES[x.dtype], self._p(x), _i64(x.shape[0]), _i64(x.shape[1]),
                                               ctypes.c_double(temperature), ctypes.c_double(max_sum),
                                               *self._rows_args(device, schedule, seed), self._p(out)))
        return out

    def partition(self, branch, num_branches, *, device=H100, schedule="forward", seed=0):
        b = branch.contiguous()
        N, B = b.shape[0], num_branches
        if N == 0:
            return torch.empty(0, dtype=torch.int64), torch.zeros(B, dtype=torch.int64), torch.zeros(B + 1, dtype=torch.int64)
        order, counts, offsets = (torch.full((n,), -7, dtype=torch.int64) for n in (N, B, B + 1))
        self._check(self.lib.fc_emu_partition(_CODES[b.dtype], self._p(b), _i64(N), _i64(B),
                                              *self._rows_args(device, schedule, seed), self._p(order), self._p(counts),
                                              self._p(offsets)))
        return order, counts, offsets

    def gather_rows(self, x, index, *, device=H100, schedule="forward", seed=0):
        x, index = x.contiguous(), index.contiguous()
        out = torch.empty((index.shape[0], *x.shape[1:]), dtype=x.dtype)
        if out.numel():
            out.view(torch.uint8).fill_(0xA5)  # poison: a row the kernel skips shows
        row_bytes = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        self._check(self.lib.fc_emu_copy_rows(_CODES[index.dtype], self._p(x), _i64(x.shape[0]), self._p(index), self._p(out),
                                              _i64(out.shape[0]), self._p(None), _i64(index.shape[0]), _i64(row_bytes),
                                              *self._rows_args(device, schedule, seed)))
        return out

    def scatter_rows(self, src, index, num_rows, *, device=H100, schedule="forward", seed=0):
        src, index = src.contiguous(), index.contiguous()
        out = torch.zeros((num_rows, *src.shape[1:]), dtype=src.dtype)  # the op allocates zeros
        row_bytes = src[0].numel() * src.element_size() if src.dim() > 1 else src.element_size()
        self._check(self.lib.fc_emu_copy_rows(_CODES[index.dtype], self._p(src), _i64(src.shape[0]), self._p(None),
                                              self._p(out), _i64(num_rows), self._p(index), _i64(index.shape[0]),
                                              _i64(row_bytes), *self._rows_args(device, schedule, seed)))
        return out

    def vote(self, member_logits, mode, need_probs, *, device=H100, schedule="forward", seed=0):
        """(labels, mean probabilities or sums) of vote_cuda; mode 0 hard, 1 soft."""
        x = member_logits.contiguous()
        K, N, C = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        labels = torch.full((N,), -7, dtype=torch.int64)
        sums = torch.full((N, C), float("nan"), dtype=acc)
        votes = torch.full((N if mode == 0 else 0, C), -7, dtype=torch.int32)
        self._check(self.lib.fc_emu_vote(_CODES[x.dtype], self._p(x), _i64(K), _i64(N), _i64(C), ctypes.c_int(need_probs),
                                         *self._rows_args(device, schedule, seed), self._p(sums),
                                         self._p(votes) if mode == 0 else self._p(None), self._p(labels)))
        return labels, sums

    # dice_focal

    def dice_focal_forward(self, logits, target, weight, gamma, ignore_index, *, device=H100, schedule="forward",
                           seed=0):
        """The sums (B, 2C + 2) of dice_focal_cuda's forward and chunk kernels: per image [focal sum,
        normaliser, inter (C), card (C)]."""
        x, t = logits.contiguous(), target.contiguous()
        B, C = x.shape[0], x.shape[1]
        S = x[0, 0].numel() if B and C else int(torch.tensor(x.shape[2:]).prod())
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(acc).contiguous()
        sums = torch.zeros(B, 2 * C + 2, dtype=acc)  # the op allocates zeros
        self._check(self.lib.fc_emu_dice_focal_forward(
            _CODES[x.dtype], self._p(x), self._p(t), self._p(w), _i64(B), _i64(C), _i64(S), ctypes.c_double(gamma),
            _i64(ignore_index), *self._rows_args(device, schedule, seed), self._p(sums)))
        return sums

    def dice_focal_backward(self, logits, target, weight, coef, focal_scale, gamma, ignore_index, *, device=H100,
                            schedule="forward", seed=0):
        """dice_focal_backward_cuda's kernel: the logits' gradient given coef (B, 2C) and focal_scale ()."""
        x, t = logits.contiguous(), target.contiguous()
        B, C = x.shape[0], x.shape[1]
        S = x[0, 0].numel() if B and C else 0
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(acc).contiguous()
        grad = torch.full_like(x, float("nan"))
        self._check(self.lib.fc_emu_dice_focal_backward(
            _CODES[x.dtype], self._p(x), self._p(t), self._p(w), self._p(coef.to(acc).contiguous()),
            self._p(focal_scale.to(acc).reshape(())), _i64(B), _i64(C), _i64(S), ctypes.c_double(gamma),
            _i64(ignore_index), *self._rows_args(device, schedule, seed), self._p(grad)))
        return grad

    # pooled_adapter

    ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2}

    @staticmethod
    def _adapter_layout(x):
        cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return (x if cl else x.contiguous()), cl

    def pooled_adapter_forward(self, x, down_w, down_b, up_w, up_b, activation, scale, dropout, drop_seed, *,
                               device=H100, schedule="forward", seed=0):
        """(y, pooled, hidden) of pooled_adapter_cuda; x (B, C, H, W) contiguous or channels_last."""
        x, cl = self._adapter_layout(x)
        B, C, H, W = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        wd, bd, wu, bu = (t.to(acc).contiguous() for t in (down_w, down_b, up_w, up_b))
        s = None if scale is None else scale.to(acc).reshape(())
        y = torch.full_like(x, float("nan"))  # keeps x's memory format, like empty_like
        pooled = torch.full((B, C), float("nan"), dtype=acc)
        hidden = torch.full((B, wd.shape[0]), float("nan"), dtype=acc)
        self._check(self.lib.fc_emu_pooled_adapter_forward(
            _CODES[x.dtype], self._p(x), self._p(wd), self._p(bd), self._p(wu), self._p(bu), self._p(s), _i64(B),
            _i64(C), _i64(H * W), _i64(wd.shape[0]), ctypes.c_int(cl), _i64(self.ACTIVATIONS[activation]),
            ctypes.c_double(dropout), _i64(drop_seed), *self._rows_args(device, schedule, seed), self._p(y),
            self._p(pooled), self._p(hidden)))
        return y, pooled, hidden

    def pooled_adapter_backward(self, grad_y, hidden, down_w, up_w, up_b, activation, scale, dropout, drop_seed, *,
                                device=H100, schedule="forward", seed=0):
        """(gx, gu, gh, a, gs_part) of pooled_adapter_backward_cuda's kernel."""
        gy, cl = self._adapter_layout(grad_y)
        B, C, H, W = gy.shape
        acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
        wd, wu, bu, hd = (t.to(acc).contiguous() for t in (down_w, up_w, up_b, hidden))
        s = None if scale is None else scale.to(acc).reshape(())
        r = wd.shape[0]
        gx = torch.full_like(gy, float("nan"))
        gu = torch.full((B, C), float("nan"), dtype=acc)
        gh, a = (torch.full((B, r), float("nan"), dtype=acc) for _ in range(2))
        gs = torch.full((B if scale is not None else 0,), float("nan"), dtype=torch.float64)
        self._check(self.lib.fc_emu_pooled_adapter_backward(
            _CODES[gy.dtype], self._p(gy), self._p(hd), self._p(wd), self._p(wu), self._p(bu), self._p(s), _i64(B),
            _i64(C), _i64(H * W), _i64(r), ctypes.c_int(cl), _i64(self.ACTIVATIONS[activation]),
            ctypes.c_double(dropout), _i64(drop_seed), *self._rows_args(device, schedule, seed), self._p(gx),
            self._p(gu), self._p(gh), self._p(a), self._p(gs)))
        return gx, gu, gh, a, gs

    # pixel_adapter

    @staticmethod
    def _pixel_shape(x):
        """(B, C, HW, channels_last) of the op's layout: (B, C, H, W) either format, or (T, C) tokens."""
        if x.dim() == 2:
            return 1, x.shape[1], x.shape[0], True
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return x.shape[0], x.shape[1], x.shape[2] * x.shape[3], cl

    def pixel_adapter_forward(self, x, down_w, down_b, up_w, up_b, activation, scale, dropout, drop_seed, *,
                              device=H100, schedule="forward", seed=0):
        B, C, HW, cl = self._pixel_shape(x)
        x = x if cl and x.dim() == 4 else x.contiguous()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        wdT, wuT = down_w.t().to(acc).contiguous(), up_w.t().to(acc).contiguous()
        bd, bu = down_b.to(acc).contiguous(), up_b.to(acc).contiguous()
        s = None if scale is None else scale.to(acc).reshape(())
        y = torch.full_like(x, float("nan"))
        self._check(self.lib.fc_emu_pixel_adapter_forward(
            _CODES[x.dtype], self._p(x), self._p(wdT), self._p(bd), self._p(wuT), self._p(bu), self._p(s), _i64(B),
            _i64(C), _i64(HW), _i64(down_w.shape[0]), ctypes.c_int(cl), _i64(self.ACTIVATIONS[activation]),
            ctypes.c_double(dropout), _i64(drop_seed), *self._rows_args(device, schedule, seed), self._p(y)))
        return y

    def pixel_adapter_backward(self, grad_y, x, down_w, down_b, up_w, activation, scale, dropout, drop_seed, *,
                               device=H100, schedule="forward", seed=0):
        """(gx, gh, a, gs_part) of pixel_adapter_backward_cuda's kernel."""
        B, C, HW, cl = self._pixel_shape(x)
        x = x if cl and x.dim() == 4 else x.contiguous()
        gy = grad_y if cl and grad_y.dim() == 4 else grad_y.contiguous()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = down_w.shape[0]
        wd, wdT, wu = down_w.to(acc).contiguous(), down_w.t().to(acc).contiguous(), up_w.to(acc).contiguous()
        bd = down_b.to(acc).contiguous()
        s = None if scale is None else scale.to(acc).reshape(())
        self.lib.fc_emu_pixel_adapter_grid.restype = ctypes.c_int64
        grid = self.lib.fc_emu_pixel_adapter_grid(_i64(B * HW), _i64(r), _i64(acc.itemsize), _i64(device[0]),
                                                  _i64(device[1]))
        gx = torch.full_like(x, float("nan"))
        gh, a = (torch.full((B * HW, r), float("nan"), dtype=acc) for _ in range(2))
        gs = torch.zeros(grid if scale is not None else 0, dtype=torch.float64)  # the op's zeros
        self._check(self.lib.fc_emu_pixel_adapter_backward(
            _CODES[x.dtype], self._p(gy), self._p(x), self._p(wdT), self._p(bd), self._p(wd), self._p(wu), self._p(s),
            _i64(B), _i64(C), _i64(HW), _i64(r), ctypes.c_int(cl), _i64(self.ACTIVATIONS[activation]),
            ctypes.c_double(dropout), _i64(drop_seed), *self._rows_args(device, schedule, seed), self._p(gx),
            self._p(gh), self._p(a), self._p(gs)))
        return gx, gh, a, gs


if __name__ == "__main__":  # python tests/emulation [MUTATION]: build, print the cached library
    print(build(sys.argv[1] if len(sys.argv) > 1 else None).lib._name)
