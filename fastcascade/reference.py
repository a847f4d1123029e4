"""Pure-PyTorch definitions of every fastcascade op: the semantics, and the test oracle.

Written for clarity, not speed. Every backend (C++ CPU, CUDA, Triton) is tested against these
functions; `backend="torch"` on the public API runs them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _xmul(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """c * v with 0 * anything = 0 in value and gradient (v may be infinite where c is 0)."""
    return c * torch.where(c == 0, torch.zeros_like(v), v)


class _LogSoftmax(torch.autograd.Function):
    """log_softmax over dim 1, also for infinite logits: x - max is taken as 0 where x is the max, so
    [inf, 0] gives [0, -inf] and [inf, inf, 0] gives [-log 2, -log 2, -inf] (the limits of large finite
    logits; torch.log_softmax gives NaN, from inf - inf). The gradient is log_softmax's,
    g - softmax * sum(g), which stays the limit's there too."""

    @staticmethod
    def forward(ctx, x):
        mx = x.amax(1, keepdim=True)
        d = torch.where(x == mx, torch.zeros_like(x), x - mx)
        logp = d - torch.logsumexp(d, 1, keepdim=True)
        ctx.save_for_backward(logp)
        return logp

    @staticmethod
    def backward(ctx, g):
        (logp,) = ctx.saved_tensors
        return g - logp.exp() * g.sum(1, keepdim=True)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    return _LogSoftmax.apply(x)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, with label smoothing t -> t (1 - eps) + eps / 2.

    p = sigmoid(x), ce = BCE-with-logits(x, t), p_t = p t + (1 - p)(1 - t),
    loss = alpha_t * ce * (1 - p_t)^gamma, alpha_t = alpha t + (1 - alpha)(1 - t)
    (no alpha term when alpha is None or negative).

    Numerics as the fused kernels': no NaN from saturated or infinite logits for any gamma >= 0. At an
    infinite logit ce is (1 - t) softplus(x) + t softplus(-x) with a zero coefficient giving 0 (BCE
    with logits is NaN there), so a right-side infinite logit gives 0 and a wrong-side one inf; 1 - p_t
    is clamped to the smallest normal number before the power, which keeps its gradient finite where
    p_t rounds to 1 (it changes the loss only by terms below that number).
    """
    t = targets.to(logits.dtype)
    t = t * (1 - label_smoothing) + 0.5 * label_smoothing
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    ce_inf = _xmul(1 - t, F.softplus(logits)) + _xmul(t, F.softplus(-logits))
    ce = torch.where(torch.isinf(logits), ce_inf, ce)
    p_t = p * t + (1 - p) * (1 - t)
    focal = (1 - p_t).clamp(min=torch.finfo(p_t.dtype).tiny) ** gamma
    # at an infinite logit the focal factor's derivative is exactly 0: keep inf * 0 out of the gradient
    loss = ce * torch.where(torch.isinf(logits), focal.detach(), focal)
    if alpha is not None and alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    # a target outside [0, 1] (or NaN) is invalid input: NaN loss and gradient for that element (checked
    # in the targets' own dtype: 1 + 1e-6 is outside even where the logits' dtype would round it to 1)
    loss = loss * _nan_where(~((targets >= 0) & (targets <= 1)), loss)
    return _reduce(loss, reduction)


def _nan_where(bad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A factor of 1 where `bad` is False and NaN where it is True: multiplying by it makes those
    entries' value and gradient NaN (torch.where would pass a clean gradient through)."""
    return torch.where(bad, torch.full_like(like, math.nan), torch.ones_like(like))


def probability_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a row of class probabilities (softmax_focal_loss's probability targets) may sum:
    1e-2 for float16 / bfloat16 targets (rounding each entry to 8 or 11 bits moves the sum by up to
    2^-8), 1e-3 for float32 / float64. The fused kernels use the same numbers."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class focal loss over dim 1 of logits (N, C) or (N, C, d1, ...).

    loss_i = -sum_c q_ic w_c (1 - p_ic)^gamma log p_ic, p = softmax(logits, 1), and, as in
    F.cross_entropy, target is either
      - class indices t (int64, logits' shape without dim 1): q_ic = (1 - eps)[c == t_i] + eps / C.
        Rows with t_i == ignore_index give 0 and are dropped from the normaliser; "mean" divides the
        sum by sum_i w_{t_i} over kept rows;
      - class probabilities r (floating, the logits' shape): q_ic = (1 - eps) r_ic + eps / C.
        ignore_index does not apply; "mean" divides the sum by the number of rows (not by a weight
        sum). A row that is not a distribution (an entry < 0 or NaN, or a sum further than
        probability_tolerance(r.dtype) from 1) gives a NaN loss and gradient.
    gamma = 0 is F.cross_entropy(logits, target, weight, ignore_index=..., label_smoothing=eps).

    Numerics as the fused kernels': the logits of ignored rows never reach the loss or the gradient
    (both exactly 0 there, however extreme the logits); an infinite logit has log p = 0 ([inf, 0] is
    p = [1, 0], not NaN); a term whose coefficient q_ic w_c (1 - p_ic)^gamma is 0 adds 0 even where
    log p_ic = -inf.
    """
    C = logits.shape[1]
    if target.is_floating_point():
        return _softmax_focal_probs(logits, target, gamma, weight, label_smoothing, reduction)
    keep = target != ignore_index
    logp = _log_softmax(torch.where(keep.unsqueeze(1), logits, torch.zeros_like(logits)))
    safe_t = torch.where(keep, target, torch.zeros_like(target))
    onehot = F.one_hot(safe_t, C).movedim(-1, 1).to(logp.dtype)
    q = (1 - label_smoothing) * onehot + label_smoothing / C
    w = torch.ones(C, dtype=logp.dtype, device=logp.device) if weight is None else weight.to(logp.dtype)
    w_b = w.view(1, C, *([1] * (logits.dim() - 2)))
    loss = -_xmul(q * w_b * _focal_factor(logp, gamma), logp).sum(1)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "mean":
        denom = torch.where(keep, w[safe_t], torch.zeros_like(loss)).sum()
        return loss.sum() / denom
    return _reduce(loss, reduction)


def _focal_factor(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p)^gamma from log p, for softmax_focal_loss."""
    # 1 - p as -expm1(log p); the clamp keeps (1 - p)^gamma's gradient finite where p rounds to 1
    focal = (-torch.expm1(logp)).clamp(min=torch.finfo(logp.dtype).tiny) ** gamma
    # where log p = -inf the focal factor's derivative is exactly 0: keep inf * 0 out of the gradient
    return torch.where(torch.isinf(logp), focal.detach(), focal)


def _softmax_focal_probs(logits, probs, gamma, weight, label_smoothing, reduction):
    """softmax_focal_loss with class-probability targets (the logits' shape)."""
    C = logits.shape[1]
    logp = _log_softmax(logits)
    r = probs.to(logp.dtype)
    q = (1 - label_smoothing) * r + label_smoothing / C
    w = torch.ones(C, dtype=logp.dtype, device=logp.device) if weight is None else weight.to(logp.dtype)
    w_b = w.view(1, C, *([1] * (logits.dim() - 2)))
    loss = -_xmul(q * w_b * _focal_factor(logp, gamma), logp).sum(1)
    # the row check sums in float32 at least (as the kernels do), whatever the logits' precision
    ra = probs.to(torch.promote_types(probs.dtype, torch.float32))
    bad = ~((ra >= 0).all(1) & ((ra.sum(1) - 1).abs() <= probability_tolerance(probs.dtype)))
    loss = loss * _nan_where(bad, loss)
    return _reduce(loss, reduction)


# ---------------------------------------------------------------------------------------------
# residual bottleneck adapters (Rebuffi et al. 2017; Houlsby et al. 2019)

ADAPTER_ACTIVATIONS = ("relu", "gelu", "silu")


def _adapter_act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ADAPTER_ACTIVATIONS}, got {activation!r}")


_M32 = 0xFFFFFFFF


def _mul32(v: torch.Tensor, c: int) -> torch.Tensor:
    """(v * c) mod 2^32 for v in [0, 2^32) held in int64, without overflowing int64."""
    return (v * (c & 0xFFFF) + (((v * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(v: torch.Tensor) -> torch.Tensor:
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def adapter_dropout_keep(seed: int, index: torch.Tensor, p: float) -> torch.Tensor:
    """The fused adapters' dropout mask: True where element `index` (int64, >= 0) of the hidden
    activations is kept. A counter-based hash of (seed, index) (lowbias32 mixing), compared with
    p * 2^32, so every backend and the backward pass redraw the same mask from the seed alone.
    For the pixel adapter, index = position * r + j with positions in (B, H, W) order (or the
    flattened token order); for the pooled adapter, index = b * r + j."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    lo, hi = index & _M32, index >> 32
    inner = _mix32((hi + (seed >> 32)) & _M32)
    h = _mix32(lo ^ _mix32((seed & _M32) ^ inner))
    return h >= min(int(p * 4294967296.0), _M32)


def _adapter_branch(z, down_w, down_b, up_w, up_b, activation, scale, dropout, seed=None):
    """scale * up(dropout(act(down(z)))) over the last dim of z (..., C), in z's dtype. With a seed,
    dropout uses the fused kernels' mask (adapter_dropout_keep over the rows of z in order)."""
    dt = z.dtype
    h = _adapter_act(F.linear(z, down_w.to(dt), down_b.to(dt)), activation)
    if dropout > 0 and seed is not None:
        index = torch.arange(h.numel(), device=h.device).view(h.shape)
        h = torch.where(adapter_dropout_keep(seed, index, dropout), h / (1 - dropout), torch.zeros_like(h))
    elif dropout > 0:
        h = F.dropout(h, dropout, training=True)
    d = F.linear(h, up_w.to(dt), up_b.to(dt))
    if scale is not None:
        d = d * (scale.to(dt) if isinstance(scale, torch.Tensor) else scale)
    return d


def _keep_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's memory format: channels_last when x is (only) channels_last, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def pooled_adapter(
    x: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    up_w: torch.Tensor,
    up_b: torch.Tensor,
    activation: str = "relu",
    scale: torch.Tensor | float | None = None,
    dropout: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Pooled residual adapter: one bottleneck per image, its output broadcast over H and W.

        m = mean_hw(x)                                   (B, C)
        y = x + scale * (drop(act(m down_w^T + down_b)) up_w^T + up_b)[:, :, None, None]

    x: (B, C, H, W), any memory format; down_w: (r, C), down_b: (r,), up_w: (C, r), up_b: (C,);
    scale: None (1), a float, or a 0-d tensor; activation: "relu" | "gelu" (erf) | "silu".
    Computed in x's dtype (weights cast to it, as nn.Linear under autocast; torch's mean and matmul
    accumulate half inputs in fp32). y has x's shape, dtype and memory format. dropout p with a seed:
    the fused ops' mask (adapter_dropout_keep over index b * r + j); without a seed, F.dropout's.
    """
    if x.dim() != 4:
        raise ValueError(f"pooled_adapter: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    d = _adapter_branch(x.mean(dim=(2, 3)), down_w, down_b, up_w, up_b, activation, scale, dropout, seed)
    return _keep_format(x + d[:, :, None, None], x)


def pixel_adapter(
    x: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    up_w: torch.Tensor,
    up_b: torch.Tensor,
    activation: str = "relu",
    scale: torch.Tensor | float | None = None,
    channel_dim: int = -1,
    dropout: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Pixel (token) residual adapter: a 1x1-conv bottleneck at every position.

        y = x + scale * (drop(act(x down_w^T + down_b)) up_w^T + up_b)     along the channel dim

    channel_dim=-1: x is tokens (..., C); channel_dim=1: x is (B, C, H, W), any memory format.
    Weights, scale, activation and dtype rules as in pooled_adapter. y has x's shape, dtype and
    memory format (channels_last in, channels_last out). dropout p with a seed: the fused ops' mask
    (adapter_dropout_keep), kept values scaled by 1 / (1 - p); without a seed, F.dropout's.
    """
    if channel_dim == 1:
        if x.dim() != 4:
            raise ValueError(f"pixel_adapter: channel_dim=1 needs x of shape (B, C, H, W), got "
                             f"{tuple(x.shape)}")
        d = _adapter_branch(x.movedim(1, -1), down_w, down_b, up_w, up_b, activation, scale, dropout, seed)
        d = d.movedim(-1, 1)
    elif channel_dim == -1:
        d = _adapter_branch(x, down_w, down_b, up_w, up_b, activation, scale, dropout, seed)
    else:
        raise ValueError(f"pixel_adapter: channel_dim must be 1 (B, C, H, W) or -1 (tokens (..., C)), got "
                         f"{channel_dim}")
    return _keep_format(x + d, x)


# ---------------------------------------------------------------------------------------------
# routing: decisions, partition, row gather / scatter, ensemble vote


def logit_threshold(threshold: float, temperature: float = 1.0) -> float:
    """The logit cut of route_threshold: sigmoid(x / T) > t  <=>  x > T log(t / (1 - t)), in float64
    (-inf for t = 0, +inf for t = 1)."""
    if threshold <= 0:
        return -math.inf
    if threshold >= 1:
        return math.inf
    return temperature * (math.log(threshold) - math.log1p(-threshold))


def route_threshold(logits: torch.Tensor, threshold: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """int32 (N,): 1 where sigmoid(logits / T) > threshold, else 0; logits (N,) or (N, 1).

    Evaluated without a sigmoid, as the exact comparison x > c with c = logit_threshold(threshold, T)
    (float64). Every float dtype compares exactly, so all backends agree bitwise: fp16/bf16/fp32
    kernels compare in fp32 against c rounded down to fp32, which decides every fp32 value as the
    float64 comparison does. An fp32 sigmoid would saturate (sigmoid(x) rounds to 1 for x > 17) and
    cannot separate thresholds near 1. threshold 0 sends every row but -inf to 1, threshold 1 sends
    every row to 0; NaN logits go to 0.
    """
    c = logit_threshold(threshold, temperature)
    return (logits.reshape(logits.shape[0]).to(torch.float64) > c).to(torch.int32)


def route_argmax(logits: torch.Tensor) -> torch.Tensor:
    """int32 (N,): the first maximum of each row of logits (N, C) (torch.argmax; NaN counts as the max)."""
    return torch.argmax(logits, dim=1).to(torch.int32)


def route_confident(logits: torch.Tensor, tau: float, temperature: float = 1.0) -> torch.Tensor:
    """int32 (N,): 1 ("exit") where max_c softmax(logits / T)_c >= tau, else 0 ("continue").

    Evaluated in float64 as S = sum_c exp((x_c - max x) / T), summed over c in class order, and
    1 / S >= tau  <=>  S <= 1 / tau (1 / tau in float64; +inf for tau = 0). tau = 0 exits every
    row without NaN; tau > 1 none. Rows holding NaN or +inf continue.
    """
    x = logits.to(torch.float64)
    d = (x - x.amax(dim=1, keepdim=True)) / temperature
    s = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for c in range(x.shape[1]):
        s = s + torch.exp(d[:, c])
    max_sum = math.inf if tau <= 0 else 1.0 / tau
    return (s <= max_sum).to(torch.int32)


def partition(branch: torch.Tensor, num_branches: int):
    """Stable counting sort of branch ids (N,) into num_branches bins.

    Returns (order, counts, offsets), int64 of shapes (N,), (B,), (B + 1,): order lists the row indices
    of bin 0, then bin 1, ..., each bin's rows in increasing index order; counts[b] rows have id b;
    offsets = [0, cumsum(counts)], so bin b's rows are order[offsets[b]:offsets[b + 1]]. Ids outside
    [0, B) belong to no bin: their rows follow offsets[B] in order (so order stays a permutation).
    """
    b = branch.to(torch.int64)
    key = torch.where((b >= 0) & (b < num_branches), b, torch.full_like(b, num_branches))
    order = torch.sort(key, stable=True).indices
    counts = (key[:, None] == torch.arange(num_branches, device=key.device)).sum(0)
    offsets = torch.cat([key.new_zeros(1), torch.cumsum(counts, 0)])
    return order, counts, offsets


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0: out[i] = x[index[i]], shape (len(index), *x.shape[1:]), any dtype."""
    return x[index.to(torch.int64)]


def scatter_rows(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out of shape (num_rows, *src.shape[1:]), zeros but out[index[i]] = src[i]; index injective."""
    out = src.new_zeros((num_rows,) + tuple(src.shape[1:]))
    out[index.to(torch.int64)] = src
    return out


def vote(member_logits, mode: str = "hard", return_probs: bool = False):
    """Ensemble decision over K members' logits (K, N, C) (or a list of K (N, C) tensors) -> int64 (N,).

    P = sum_k softmax(member_k) over classes, accumulated in member order in fp32 (fp64 for fp64
    logits). "hard": each member votes for its argmax (first maximum); among the classes with the
    most votes, the one with the largest P wins, then the lowest class id. "soft": the first class
    with the largest P. return_probs=True also returns the mean probabilities P / K (N, C).
    """
    x = torch.stack(list(member_logits)) if not isinstance(member_logits, torch.Tensor) else member_logits
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    K, N, C = x.shape
    p = torch.zeros(N, C, dtype=acc, device=x.device)
    for k in range(K):
        p = p + torch.softmax(x[k].to(acc), dim=1)
    if mode == "hard":
        votes = F.one_hot(torch.argmax(x, dim=2), C).sum(0)
        score = torch.where(votes == votes.amax(dim=1, keepdim=True), p, torch.full_like(p, -1.0))
    else:
        score = p
    labels = torch.argmax(score, dim=1)
    return (labels, p / K) if return_probs else labels


# ---------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None):
    """int64 (C, C) counts: cm[t, p] = #{i : target_i = t, pred_i = p}, rows = target, columns =
    prediction (scikit-learn's convention); pred and target of one shape, flattened. Elements whose
    target equals ignore_index count nowhere, and so (on the device backends) do elements with an id
    outside [0, C)."""
    C = num_classes
    t, p = target.reshape(-1).to(torch.int64), pred.reshape(-1).to(torch.int64)
    keep = (t >= 0) & (t < C) & (p >= 0) & (p < C)
    if ignore_index is not None:
        keep &= t != ignore_index
    cell = torch.where(keep, t * C + p, torch.full_like(t, C * C))  # static shapes: compiles without a break
    counts = torch.zeros(C * C + 1, dtype=torch.int64, device=t.device).scatter_add_(0, cell, torch.ones_like(cell))
    return counts[: C * C].view(C, C)


# ---------------------------------------------------------------------------------------------
# dice focal: Dice + softmax focal for segmentation


def dice_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    gamma: float = 2.0,
    lambda_dice: float = 0.5,
    lambda_focal: float = 0.5,
    smooth: float = 1.0,
    include_background: bool = True,
    ignore_index: int | None = None,
    batch_dice: bool = True,
) -> torch.Tensor:
    """lambda_dice * dice + lambda_focal * focal on logits (B, C, *spatial), target int64 (B, *spatial).

    p = softmax(logits, 1), y = one-hot(target); pixels whose target is ignore_index count in neither term.
    focal = softmax_focal_loss(logits, target, gamma, weight, ignore_index, reduction="mean").
    Per class c (class 0 left out when include_background=False), summed over the batch and the pixels
    when batch_dice, else per image:
        I_c = sum p_c y_c,  S_c = sum p_c + sum y_c,  dice_c = 1 - (2 I_c + smooth) / (S_c + smooth)
    dice = sum_c w_c dice_c / sum_c w_c (w = weight, or ones), then the mean over images when not batch_dice.
    A term whose lambda is 0 is left out (so it cannot turn the loss into NaN). An empty batch (B = 0)
    gives NaN, as torch's "mean" over nothing. Ignored pixels' logits reach neither the loss nor the
    gradient; softmax is that of softmax_focal_loss (finite for infinite logits).
    """
    B, C = logits.shape[:2]
    if B == 0:
        return logits.sum() * float("nan")
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe_t = torch.where(keep, target, torch.zeros_like(target))
    p = _log_softmax(torch.where(keep.unsqueeze(1), logits, torch.zeros_like(logits))).exp().reshape(B, C, -1)
    y = F.one_hot(safe_t, C).movedim(-1, 1).reshape(B, C, -1).to(p.dtype)
    k = keep.reshape(B, 1, -1).to(p.dtype)
    inter = (p * y * k).sum(2)  # (B, C)
    card = ((p + y) * k).sum(2)
    if batch_dice:
        inter, card = inter.sum(0, keepdim=True), card.sum(0, keepdim=True)
    dice_c = 1 - (2 * inter + smooth) / (card + smooth)
    w = torch.ones(C, dtype=p.dtype, device=p.device) if weight is None else weight.to(p.dtype)
    if not include_background:
        w = torch.cat([w.new_zeros(1), w[1:]])
    loss = logits.new_zeros((), dtype=p.dtype)
    if lambda_dice != 0:
        loss = loss + lambda_dice * ((dice_c * w).sum(1) / w.sum()).mean()
    if lambda_focal != 0:
        focal = softmax_focal_loss(logits, target, gamma, weight, -100 if ignore_index is None else ignore_index)
        loss = loss + lambda_focal * focal
    return loss
