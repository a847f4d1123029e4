"""A rate-distortion proxy that labels 16x16 luma blocks with an AV1 partition type.

This is **not** an encoder: no intra-prediction modes, no neighbours, no entropy coder, no recursion
below 8x8. It is a cheap, deterministic stand-in that picks, per block, the partition that a simple
rate-distortion model favours, so that labels follow the block's structure the way an encoder's
decisions roughly do (flat → NONE, one edge across → HORZ/VERT, detail in one half → an AB type, ...).

For every candidate partition (libaom geometry, see ``labels.PARTITION_RECTS``) and every sub-block:

* prediction: the block's mean (rounded), the same for every sub-block: a stand-in for a DC
  predictor, so a sub-block whose mean differs from the block's pays for it in its DC coefficient;
* transform: a 2-D DCT of the sub-block's shape (16x16, 16x8, 8x16, 8x8, 16x4, 4x16);
* quantisation: uniform, step ``2 ** ((qp - 4) / 6)`` (the H.264/HEVC QP scale, 0..51; not AV1's
  qindex), rounding to nearest;
* distortion D: squared error of the quantised coefficients (= pixel-domain SSE, the DCT being
  orthonormal up to the rounding of its integer form);
* rate R (bits): per non-zero level ``2 + 2 * floor(log2 |level|)`` (sign + an Exp-Golomb length);
  per sub-block a 1-bit "coded" flag and, when coded, an end-of-block position of
  ``1 + 2 * floor(log2(d + 1))`` bits, d = i + j the last significant anti-diagonal (1 bit for DC
  only); plus a per-partition signalling cost (``PARTITION_BITS``);
* J = D + lambda * R with lambda = ``LAMBDA_SCALE * step ** 2`` (encoders tie lambda to step^2).

The block gets the partition of least J.

**Exact symmetry.** A transposed block gets the transposed label, a flipped block the flipped label
(``labels.*_LABELS``), bit for bit. Every cost is computed in exact integer arithmetic: the DCT
matrices are integers (``round(512 * DCT)``, built with exact mirror symmetry), the transforms of
integer residuals are exact (float64 products of integers below 2**53, so the summation order cannot
matter), and D and R are exact integer sums. A flip only changes coefficient signs and a transpose only
transposes them, so every candidate's cost is *exactly* the cost of its mirrored candidate on the
mirrored block. Ties are broken by a rule that commutes with the symmetries: least J, then the
first of the symmetry classes NONE, HORZ/VERT, HORZ_4/VERT_4, AB types, SPLIT; a tie that remains is
between mirror images, which no rule can order without breaking symmetry, so it goes to NONE or SPLIT
(whichever has the lower J, NONE on equality), the two labels every symmetry leaves alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .labels import (
    BLOCK_SIZE,
    HORZ,
    HORZ_4,
    HORZ_A,
    HORZ_B,
    NONE,
    NUM_CLASSES,
    NUM_MAIN_CLASSES,
    PARTITION_RECTS,
    SPLIT,
    VERT,
    VERT_4,
    VERT_A,
    VERT_B,
)

#: Bump when the labeller's output can change for the same input and parameters (it keys the cache).
LABELLER_VERSION = 1
DEFAULT_QP = 32
#: lambda = LAMBDA_SCALE * step^2 (in the orthonormal-DCT / 8-bit-pixel domain).
LAMBDA_SCALE = 0.1
#: Signalling bits per partition type (a flat context-free stand-in for AV1's partition CDFs).
PARTITION_BITS = {NONE: 1.0, HORZ: 3.0, VERT: 3.0, SPLIT: 3.0, HORZ_A: 4.0, HORZ_B: 4.0,
                  VERT_A: 4.0, VERT_B: 4.0, HORZ_4: 5.0, VERT_4: 5.0}
# Tie-break rank: constant on each symmetry orbit, so it commutes with flips and transposes.
_RANK = {NONE: 0, HORZ: 1, VERT: 1, HORZ_4: 2, VERT_4: 2, HORZ_A: 3, HORZ_B: 3, VERT_A: 3, VERT_B: 3,
         SPLIT: 4}

_SCALE = 512          # integer DCT = round(_SCALE * orthonormal DCT); _SCALE**2 stays exact below
_RATE_UNIT = 8        # rates are counted in 1/8 bit, so every cost is an integer
_CHUNK = 4096         # blocks per batch (bounds memory: ~8 MB per float64 plane of the batch)


def qp_to_step(qp: float) -> float:
    """Quantiser step of a QP on the H.264/HEVC scale: doubles every 6, 1.0 at QP 4."""
    return 2.0 ** ((qp - 4) / 6.0)


def _int_dct(n: int) -> np.ndarray:
    """round(_SCALE * orthonormal DCT-II) of size n, with row k exactly (anti)symmetric: M[k, n-1-j] =
    (-1)^k M[k, j]. Built from the first half so floating-point cos() cannot break that."""
    half = np.empty((n, n // 2))
    for k in range(n):
        a = math.sqrt((1.0 if k == 0 else 2.0) / n)
        for j in range(n // 2):
            half[k, j] = np.round(_SCALE * a * math.cos(math.pi * (2 * j + 1) * k / (2 * n)))
    sign = np.array([(-1.0) ** k for k in range(n)])[:, None]
    return np.concatenate([half, sign * half[:, ::-1]], axis=1)


_DCT = {n: torch.from_numpy(_int_dct(n)) for n in (4, 8, 16)}
# Anti-diagonal index i + j of each coefficient, per sub-block shape.
_DIAG = {(h, w): torch.arange(h)[:, None] + torch.arange(w)[None, :]
         for h, w in ((16, 16), (8, 16), (16, 8), (8, 8), (4, 16), (16, 4))}


def _params(qp: float, include_4way: bool) -> dict:
    return {"version": LABELLER_VERSION, "qp": float(qp), "include_4way": bool(include_4way),
            "lambda_scale": LAMBDA_SCALE, "partition_bits": [PARTITION_BITS[k] for k in range(NUM_CLASSES)]}


def labeller_params(qp: float = DEFAULT_QP, include_4way: bool = False) -> dict:
    """Everything that determines the labeller's output (the dataset cache is keyed by it)."""
    return _params(qp, include_4way)


def _to_pixels(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16, 16) uint8 or float in [0, 1] -> (N, 16, 16) int64 pixels in 0..255."""
    if not isinstance(blocks, torch.Tensor):
        raise ValueError(f"blocks: expected a torch.Tensor, got {type(blocks).__name__}")
    if blocks.dim() != 4 or tuple(blocks.shape[1:]) != (1, BLOCK_SIZE, BLOCK_SIZE):
        raise ValueError(f"blocks: expected shape (N, 1, {BLOCK_SIZE}, {BLOCK_SIZE}), "
                         f"got {tuple(blocks.shape)}")
    if blocks.dtype == torch.uint8:
        return blocks[:, 0].to(device="cpu", dtype=torch.int64)
    if blocks.is_floating_point():
        x = blocks[:, 0].detach().to(device="cpu", dtype=torch.float64)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError("blocks: float blocks must be finite and in [0, 1] (8-bit pixels / 255); got "
                             f"range [{x.min().item():.4g}, {x.max().item():.4g}]")
        return torch.round(x * 255).to(torch.int64)
    raise ValueError(f"blocks: expected uint8 or a floating dtype, got {blocks.dtype}")


def _candidate_costs(pix: torch.Tensor, qs: int, lam: int, candidates: list) -> torch.Tensor:
    """(N, 16, 16) int64 pixels -> (N, len(candidates)) int64 costs J (units: _SCALE^4 * squared pixel).

    Exactness: the transform, the quantisation and the per-coefficient error and bits are float64
    values that are exact integers below 2**53 (|M| <= 362, |resid| <= 255, 16-term sums; levels and
    errors are then exact too), so they do not depend on summation order; the distortion, whose sum
    can pass 2**53, is summed in int64."""
    n = pix.shape[0]
    mean = (pix.sum(dim=(1, 2)) + 128) // 256                 # rounded block mean, symmetric by construction
    resid = (pix - mean[:, None, None]).to(torch.float64)
    rects = sorted({rect for label in candidates for rect in PARTITION_RECTS[label]})
    rect_cost = {}
    for h, w in sorted({(h, w) for _, _, h, w in rects}):    # all sub-blocks of one shape in one batch
        group = [rect for rect in rects if rect[2:] == (h, w)]
        sub = torch.stack([resid[:, r:r + h, c:c + w] for r, c, _, _ in group], dim=1)  # (N, k, h, w)
        coef = (_DCT[h] @ sub @ _DCT[w].T).abs()
        level = torch.floor((coef + qs // 2) / qs)             # round to nearest
        err = coef - level * qs
        dist = (err * err).to(torch.int64).sum(dim=(2, 3))
        nz = level > 0
        # Per non-zero level 2 + 2 floor(log2 level) bits = 2 * frexp exponent (level = m 2^e, m in [.5, 1)).
        bits = torch.where(nz, 2 * torch.frexp(level).exponent, 0).sum(dim=(2, 3))
        # End of block: the last significant anti-diagonal d = i + j, 1 + 2 floor(log2(d + 1)) bits
        # (1 bit for DC only). i + j is unchanged by a transpose, so the cost keeps the symmetry.
        diag = torch.where(nz, _DIAG[(h, w)], -1).amax(dim=(2, 3))
        eob = 2 * torch.frexp((diag + 1).to(torch.float64)).exponent - 1
        bits = bits.to(torch.int64) + 1 + torch.where(diag >= 0, eob, 0)   # + 1: the "coded" flag
        cost = dist + lam * _RATE_UNIT * bits
        for i, rect in enumerate(group):
            rect_cost[rect] = cost[:, i]
    costs = torch.zeros(n, len(candidates), dtype=torch.int64)
    for i, label in enumerate(candidates):
        for rect in PARTITION_RECTS[label]:
            costs[:, i] += rect_cost[rect]
        costs[:, i] += lam * round(_RATE_UNIT * PARTITION_BITS[label])
    return costs


def _choose(costs: torch.Tensor, candidates: list) -> torch.Tensor:
    """Least cost, then least rank; a remaining tie (mirror images) goes to NONE or SPLIT."""
    best = costs.min(dim=1, keepdim=True).values
    tied = costs == best
    rank = torch.tensor([_RANK[k] for k in candidates])
    tied_rank = torch.where(tied, rank, 99)
    chosen = tied & (tied_rank == tied_rank.min(dim=1, keepdim=True).values)
    label_of = torch.tensor(candidates)
    first = label_of[chosen.to(torch.int8).argmax(dim=1)]
    i_none, i_split = candidates.index(NONE), candidates.index(SPLIT)
    fallback = torch.where(costs[:, i_none] <= costs[:, i_split], NONE, SPLIT)
    return torch.where(chosen.sum(dim=1) == 1, first, fallback)


def label_blocks(blocks: torch.Tensor, qp: float = DEFAULT_QP, include_4way: bool = False,
                 return_costs: bool = False):
    """Label 16x16 luma blocks with the AV1 partition type a rate-distortion proxy prefers.

    Args:
        blocks: (N, 1, 16, 16) uint8 pixels, or floating pixels in [0, 1] (rounded to 8 bits).
        qp: quantiser parameter on the H.264/HEVC scale, 0..51 (step doubles every 6). Higher QP →
            coarser quantisation → larger partitions (more NONE).
        include_4way: also consider HORZ_4 (four 16x4) and VERT_4 (four 4x16).
        return_costs: also return the (N, C) int64 costs J of the candidates, C = 8 or 10 in label order.

    Returns:
        int64 (N,) labels in libaom order (see ``fastcascade.data.labels``), on ``blocks.device``;
        with ``return_costs``, ``(labels, costs)``.

    The model (see the module docstring) is a proxy for an encoder's choice, not libaom's decision.
    It is exactly symmetric: ``label_blocks(b.transpose(-1, -2)) == TRANSPOSE_LABELS[label_blocks(b)]``, and
    likewise for flips.
    """
    if not 0 <= float(qp) <= 51:
        raise ValueError(f"qp: expected a number in [0, 51], got {qp}")
    pix = _to_pixels(blocks)
    step = qp_to_step(float(qp))
    qs = 2 * max(1, round(step * _SCALE * _SCALE / 2))       # step in integer-DCT units (even)
    lam = max(1, round(LAMBDA_SCALE * step * step * _SCALE ** 4 / _RATE_UNIT))
    candidates = list(range(NUM_CLASSES if include_4way else NUM_MAIN_CLASSES))
    labels, costs = [], []
    for start in range(0, pix.shape[0], _CHUNK):
        c = _candidate_costs(pix[start:start + _CHUNK], qs, lam, candidates)
        labels.append(_choose(c, candidates))
        costs.append(c)
    n_cand = len(candidates)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    costs = torch.cat(costs) if costs else torch.zeros(0, n_cand, dtype=torch.int64)
    labels = labels.to(blocks.device)
    return (labels, costs.to(blocks.device)) if return_costs else labels


__all__ = ["DEFAULT_QP", "LABELLER_VERSION", "LAMBDA_SCALE", "PARTITION_BITS", "label_blocks",
           "labeller_params", "qp_to_step"]
