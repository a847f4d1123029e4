"""Device-side routing for early-exit cascades: decisions, a stable partition, row gather / scatter, votes.

A cascade level routes a batch without boolean-mask indexing (whose nonzero() waits on the device):

    branch = route_threshold(stage1_logits, threshold=0.4)         # int32 (N,), on the device
    order, counts, offsets = partition(branch, 2)                  # stable counting sort, no host sync
    x_sorted = gather_rows(x, order)                               # rows grouped by branch
    # run each child on x_sorted[offsets[b]:offsets[b + 1]] (the counts reach the host in one transfer,
    # or children run on fixed-size buffers), then put the results back in the original order:
    y = scatter_rows(y_sorted, order, num_rows=N)

Every function validates its arguments before any kernel runs (ValueError naming the argument) and
takes backend="auto" | "cpu" | "cuda" | "triton" | "torch" (the pure-PyTorch reference,
fastcascade.reference, which defines the semantics). Decisions are int32, so they feed partition
directly; gather_rows and scatter_rows are differentiable (each is the other's backward), so a cascade
trains end to end through its routing.

Values that only the device knows (branch ids, row indices) are checked only where that needs no
host sync: on the CPU they always raise; on CUDA the kernels stay memory-safe (documented per
function) and FASTCASCADE_CHECK=1 makes the API raise instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _ops, reference
from ._checks import int_arg, tensor_arg, value_checks_on

__all__ = [
    "Partition",
    "gather_rows",
    "partition",
    "route_argmax",
    "route_confident",
    "route_threshold",
    "scatter_rows",
    "vote",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


class Partition(NamedTuple):
    """partition's result: rows of branch b are order[offsets[b]:offsets[b + 1]], counts[b] of them."""

    order: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def _float_logits(logits, name: str = "logits") -> torch.Tensor:
    tensor_arg(logits, name)
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    return logits


def _logits_2d(logits) -> torch.Tensor:
    _float_logits(logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be (N, C) with C >= 1, got shape {tuple(logits.shape)}")
    return logits


def _temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _index(index, x: torch.Tensor, xn: str) -> torch.Tensor:
    tensor_arg(index, "index")
    if index.dtype not in _INDEX_DTYPES or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int32 or int64 tensor, got dtype {index.dtype} and shape "
                         f"{tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"{xn} and index must be on the same device, got {x.device} and {index.device}")
    return index


# ---------------------------------------------------------------------------------------------
# decisions


def route_threshold(logits: torch.Tensor, threshold: float = 0.5, temperature: float = 1.0, *,
                    backend: str = "auto") -> torch.Tensor:
    """Binary decision: int32 (N,), 1 where sigmoid(logits / temperature) > threshold, else 0.

    Computed without a sigmoid as the exact comparison logits > temperature * log(t / (1 - t)), the
    cut evaluated in float64 (reference.logit_threshold); every backend decides bitwise alike, and
    thresholds near 0 or 1 keep their meaning where an fp32 sigmoid would round to 0 or 1.
    threshold 0 sends every row to 1 (but -inf logits), threshold 1 every row to 0; NaN logits go to 0.

    Args:
        logits: (N,) or (N, 1), float16/bfloat16/float32/float64.
        threshold: in [0, 1].
        temperature: > 0.
    """
    _float_logits(logits)
    if not (logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)):
        raise ValueError(f"logits must be (N,) or (N, 1), got shape {tuple(logits.shape)}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    temperature = _temperature(temperature)
    backend = _ops.resolve_backend(backend, logits.device)
    logits = logits.detach()
    if backend == "torch":
        return reference.route_threshold(logits, threshold, temperature)
    cut = reference.logit_threshold(float(threshold), temperature)
    return _ops.op("route_threshold", backend)(logits, cut)


def route_argmax(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Multi-way decision: int32 (N,), the first maximum of each row of logits (N, C) (torch.argmax:
    ties go to the lowest class, NaN counts as the maximum)."""
    _logits_2d(logits)
    backend = _ops.resolve_backend(backend, logits.device)
    logits = logits.detach()
    if backend == "torch":
        return reference.route_argmax(logits)
    return _ops.op("route_argmax", backend)(logits)


def route_confident(logits: torch.Tensor, tau: float, temperature: float = 1.0, *,
                    backend: str = "auto") -> torch.Tensor:
    """Early exit: int32 (N,), 1 ("exit") where max_c softmax(logits / temperature)_c >= tau, else 0
    ("continue").

    Evaluated in float64 as S = sum_c exp((x_c - max x) / T) <= 1 / tau, the sum in class order, so it
    stays meaningful for tau within ~1e-15 of 1. Backends agree except where the maximum probability
    lies within float64 rounding of tau (their exp functions differ in the last bit). tau = 0 exits
    every row, tau = 1 only rows whose other probabilities underflow; rows with NaN or +inf continue.

    Args:
        logits: (N, C), C >= 1, float16/bfloat16/float32/float64.
        tau: in [0, 1].
        temperature: > 0.
    """
    _logits_2d(logits)
    if not (isinstance(tau, (int, float)) and 0 <= tau <= 1):
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
    temperature = _temperature(temperature)
    backend = _ops.resolve_backend(backend, logits.device)
    logits = logits.detach()
    if backend == "torch":
        return reference.route_confident(logits, tau, temperature)
    return _ops.op("route_confident", backend)(logits, temperature, math.inf if tau == 0 else 1.0 / tau)


# ---------------------------------------------------------------------------------------------
# partition, gather, scatter


def partition(branch: torch.Tensor, num_branches: int, *, backend: str = "auto") -> Partition:
    """Stable counting sort of branch ids on the device, no host sync.

    Returns Partition(order, counts, offsets), int64 of static shapes (N,), (B,), (B + 1,) with
    B = num_branches: order lists the rows of branch 0, then branch 1, ..., each branch's rows in
    increasing index order (deterministic); counts[b] rows have id b; offsets = [0, cumsum(counts)].

    Args:
        branch: (N,) int32 or int64 ids in [0, num_branches) (route_* output, or argmax ids).
        num_branches: >= 1.
    An id outside [0, num_branches) raises on the CPU. On CUDA (no sync) its row is counted in no
    branch and placed after offsets[-1] (order stays a permutation); FASTCASCADE_CHECK=1 raises.
    """
    tensor_arg(branch, "branch")
    if branch.dtype not in _INDEX_DTYPES or branch.dim() != 1:
        raise ValueError(f"branch must be a 1-D int32 or int64 tensor, got dtype {branch.dtype} and shape "
                         f"{tuple(branch.shape)}")
    num_branches = int_arg(num_branches, "num_branches", 1)
    backend = _ops.resolve_backend(backend, branch.device)
    if value_checks_on(branch) and not _within(branch, num_branches):
        bad = (branch < 0) | (branch >= num_branches)
        raise ValueError(f"branch holds ids outside [0, num_branches = {num_branches}): "
                         f"{branch[bad].unique()[:8].tolist()}")
    if backend == "torch":
        return Partition(*reference.partition(branch, num_branches))
    return Partition(*_ops.op("partition", backend)(branch, num_branches))


def _within(ids: torch.Tensor, stop: int) -> bool:
    """Whether every value of ids lies in [0, stop): one pass (aminmax), where the comparisons, their
    `|` and any() would be four, each a parallel region on the CPU; the offenders are found only when
    there are some."""
    if ids.numel() == 0:
        return True
    lo, hi = torch.aminmax(ids)
    return bool(lo >= 0) and bool(hi < stop)


def _check_index_values(index: torch.Tensor, rows: int, what: str, injective: bool) -> None:
    if not value_checks_on(index):
        return
    if not _within(index, rows):
        bad = (index < 0) | (index >= rows)
        raise ValueError(f"index holds rows outside [0, {rows}) ({what}): {index[bad].unique()[:8].tolist()}")
    if injective and index.numel() and bool(torch.bincount(index, minlength=rows).max() > 1):
        raise ValueError("index holds a row twice: scatter_rows needs distinct indices (a permutation or "
                         "injection, as partition's order)")


def gather_rows(x: torch.Tensor, index: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x[index] along dim 0: out[i] = x[index[i]], shape (len(index), *x.shape[1:]), any dtype and layout.

    Differentiable in x: the backward is scatter_rows(grad, index, len(x)), which needs index free of
    duplicates (true of partition's order; the CPU raises otherwise). Rows are copied as whole 16-byte
    words where their length and alignment allow.
    Args:
        x: (R, ...) with R >= 0 rows.
        index: (M,) int32 or int64 in [0, R). Out of range: the CPU raises; on CUDA (no sync) the row
            reads as zeros; FASTCASCADE_CHECK=1 raises.
    """
    tensor_arg(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (rows), got a 0-dim tensor")
    _index(index, x, "x")
    backend = _ops.resolve_backend(backend, x.device)
    _check_index_values(index, x.shape[0], "x's rows", injective=False)
    if backend == "torch":
        return reference.gather_rows(x, index)
    return _ops.op("gather_rows", backend)(x, index)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, num_rows: int, *, backend: str = "auto") -> torch.Tensor:
    """The inverse of gather_rows: out (num_rows, *src.shape[1:]) with out[index[i]] = src[i], zeros in rows
    no index names. Differentiable in src (the backward is gather_rows(grad, index)).

    Args:
        src: (M, ...), any dtype and layout.
        index: (M,) int32 or int64, distinct values in [0, num_rows) (a permutation or injection, as
            partition's order). Duplicates are not supported: the CPU raises; on CUDA one of the rows
            lands, unspecified which. Out of range: the CPU raises; on CUDA the row is skipped.
            FASTCASCADE_CHECK=1 raises on both.
        num_rows: rows of the output, >= 0.
    """
    tensor_arg(src, "src")
    if src.dim() < 1:
        raise ValueError("src must have at least one dimension (rows), got a 0-dim tensor")
    _index(index, src, "src")
    num_rows = int_arg(num_rows, "num_rows", 0)
    if index.shape[0] != src.shape[0]:
        raise ValueError(f"index must have one entry per row of src ({src.shape[0]}), got {index.shape[0]}")
    backend = _ops.resolve_backend(backend, src.device)
    _check_index_values(index, num_rows, "num_rows", injective=True)
    if backend == "torch":
        return reference.scatter_rows(src, index, num_rows)
    return _ops.op("scatter_rows", backend)(src, index, num_rows)


# ---------------------------------------------------------------------------------------------
# ensembles


def vote(member_logits: torch.Tensor | Sequence[torch.Tensor], mode: str = "hard", *, return_probs: bool = False,
         backend: str = "auto"):
    """Ensemble decision over K members: int64 labels (N,).

    With P = sum_k softmax(member_k) (classes, accumulated in member order, fp32; fp64 for fp64 logits):
    "hard": each member votes for its argmax; among the classes with the most votes the one with the
    largest P wins, then the lowest class id. "soft": the first class with the largest P.

    Args:
        member_logits: (K, N, C), or a sequence of K tensors (N, C) of one dtype and device; K, C >= 1.
        mode: "hard" | "soft".
        return_probs: also return the mean probabilities P / K, (N, C) fp32 (fp64 for fp64 logits),
            not differentiable.
    Returns labels, or (labels, probs).
    """
    if mode not in _ops.VOTE_MODES:
        raise ValueError(f"mode must be one of {tuple(_ops.VOTE_MODES)}, got {mode!r}")
    if not isinstance(member_logits, torch.Tensor):
        members = list(member_logits) if isinstance(member_logits, Sequence) else None
        if not members or not all(isinstance(m, torch.Tensor) for m in members):
            raise ValueError("member_logits must be a (K, N, C) tensor or a non-empty sequence of (N, C) tensors")
        first = members[0]
        for k, m in enumerate(members):
            if m.dim() != 2 or m.shape != first.shape or m.dtype != first.dtype or m.device != first.device:
                raise ValueError(f"member_logits[{k}] must be (N, C) with the shape, dtype and device of member 0 "
                                 f"({tuple(first.shape)}, {first.dtype}, {first.device}), got {tuple(m.shape)}, "
                                 f"{m.dtype}, {m.device}")
        member_logits = torch.stack([m.detach() for m in members])
    _float_logits(member_logits, "member_logits")
    if member_logits.dim() != 3 or member_logits.shape[0] < 1 or member_logits.shape[2] < 1:
        raise ValueError(f"member_logits must be (K, N, C) with K, C >= 1, got shape {tuple(member_logits.shape)}")
    backend = _ops.resolve_backend(backend, member_logits.device)
    x = member_logits.detach()
    if backend == "torch":
        return reference.vote(x, mode, return_probs)
    labels, probs = _ops.op("vote", backend)(x, _ops.VOTE_MODES[mode], bool(return_probs))
    return (labels, probs) if return_probs else labels
