"""Calibration of a trained stage: temperature scaling, threshold search for a binary stage, ECE.

    T = fit_temperature(val_logits, val_labels)                 # Guo et al. 2017, one scalar
    scaler = TemperatureScaler().fit(val_logits, val_labels)    # the nn.Module form: logits / T
    t, m = tune_threshold(val_probs, val_labels, "precision", min_recall=0.9)
    Threshold(t)  # the cascade's rule decides sigmoid(logit) > t, as tune_threshold scored it

These run once per validation pass on a few hundred thousand numbers: they compute in float64 and
read results back to the host (they are not ops and make no no-sync promise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TemperatureScaler", "expected_calibration_error", "fit_temperature", "tune_threshold"]

_OBJECTIVES = ("f1", "precision")


def _float_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _binary_labels(labels, n: int, device: torch.device) -> torch.Tensor:
    """labels (N,) or (N, 1) holding only 0 and 1 (bool, integer or float) -> float64 (N,)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be (N,) with N = {n} (binary), got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of the scores/logits ({device}), got {labels.device}")
    y = labels.detach().to(torch.float64)
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("labels of a binary stage must be 0 or 1, got "
                         f"{labels[(y != 0) & (y != 1)].unique()[:8].tolist()}")
    return y


def _class_labels(labels, n: int, C: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"labels must be integer class ids for (N, C) logits, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must be (N,) with N = {n}, got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of the logits ({device}), got {labels.device}")
    bad = (labels < 0) | (labels >= C)
    if bool(bad.any()):
        raise ValueError(f"labels hold ids outside [0, C = {C}): {labels[bad].unique()[:8].tolist()}")
    return labels.to(torch.int64)


def _split_logits(logits) -> tuple[torch.Tensor, bool]:
    """(logits as float64, binary?) for (N,), (N, 1) (sigmoid) or (N, C >= 2) (softmax)."""
    _float_tensor(logits, "logits")
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
        x, binary = logits.reshape(-1), True
    elif logits.dim() == 2 and logits.shape[1] >= 2:
        x, binary = logits, False
    else:
        raise ValueError(f"logits must be (N,) or (N, 1) (binary) or (N, C) with C >= 2, got shape "
                         f"{tuple(logits.shape)}")
    if x.shape[0] < 1:
        raise ValueError("logits must hold at least one row")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("logits must be finite (no NaN or inf)")
    return x, binary


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the mean NLL of logits / T.

    Binary stages: logits (N,) or (N, 1), labels 0/1, NLL of sigmoid(logits / T) (binary cross-entropy).
    Multi-class: logits (N, C), C >= 2, labels int (N,) in [0, C), NLL of softmax(logits / T).
    Optimises log T (so T stays positive) with L-BFGS and a strong-Wolfe line search, in float64.
    Data the model separates perfectly has no finite optimum (NLL falls as T -> 0): T is then what
    max_iter steps reach, and very small.
    Returns T as a Python float; divide the logits by it (TemperatureScaler does).
    """
    x, binary = _split_logits(logits)
    y = _binary_labels(labels, x.shape[0], x.device) if binary else _class_labels(labels, *x.shape, x.device)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    log_t = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    nll = F.binary_cross_entropy_with_logits if binary else F.cross_entropy
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(x * torch.exp(-log_t), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(torch.exp(log_t.detach()))


class TemperatureScaler(nn.Module):
    """logits / T with a fitted temperature T (a float64 buffer, saved in the state dict).

    scaler = TemperatureScaler().fit(val_logits, val_labels); probs = scaler(logits).softmax(1)
    """

    temperature: torch.Tensor

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float64))

    def fit(self, logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> TemperatureScaler:
        """Sets the temperature to fit_temperature(logits, labels, max_iter); returns self."""
        self.temperature.fill_(fit_temperature(logits, labels, max_iter))
        return self

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature.to(logits.dtype)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.6g}"


def _scores(scores, name: str = "scores") -> torch.Tensor:
    _float_tensor(scores, name)
    if not (scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1)):
        raise ValueError(f"{name} must be (N,) or (N, 1) probabilities of the positive class, got shape "
                         f"{tuple(scores.shape)}")
    s = scores.detach().reshape(-1).to(torch.float64)
    if s.numel() == 0:
        raise ValueError(f"{name} must hold at least one row")
    if not bool(((s >= 0) & (s <= 1)).all()):  # NaN fails too
        raise ValueError(f"{name} must be probabilities in [0, 1] (apply sigmoid to logits first)")
    return s


def tune_threshold(scores: torch.Tensor, labels: torch.Tensor, objective: str = "f1", min_recall: float | None = None,
                   grid: torch.Tensor | Sequence[float] | None = None) -> tuple[float, dict]:
    """The decision threshold of a binary stage, chosen on validation scores.

    A row is predicted positive where score > threshold, compared exactly in float64 (strictly, as
    fastcascade.route_threshold and the cascade's Threshold rule decide: with scores = sigmoid of the
    logits in float64, the returned metrics are what the cascade gets on these rows; fp32 scores can
    round onto the threshold). objective "f1" maximises F1; "precision" maximises precision among thresholds whose
    recall is >= min_recall (required). min_recall also constrains "f1" when given. Ties go to the
    lowest threshold.

    Args:
        scores: (N,) or (N, 1) probabilities of the positive class in [0, 1].
        labels: (N,) 0/1 (bool, integer or float).
        grid: candidate thresholds in [0, 1]; default 0 and every distinct score (each place where the
            predictions change). All candidates are scored at once by sorting (no loop over thresholds).
    Returns (threshold, metrics): metrics holds threshold, precision, recall, f1 (0 where undefined)
    and the counts tp, fp, fn, tn, as Python numbers.
    Raises ValueError when no candidate reaches min_recall.
    """
    s = _scores(scores)
    y = _binary_labels(labels, s.shape[0], scores.device).to(s.device)
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    if min_recall is not None and not (isinstance(min_recall, (int, float)) and 0 <= min_recall <= 1):
        raise ValueError(f"min_recall must be a number in [0, 1] or None, got {min_recall!r}")
    if objective == "precision" and min_recall is None:
        raise ValueError('objective="precision" needs min_recall (precision alone is maximised by predicting '
                         "almost nothing)")
    if grid is None:
        cand = torch.cat([s.new_zeros(1), s]).unique()  # sorted ascending
    else:
        cand = torch.as_tensor(grid, dtype=torch.float64).to(s.device)
        if cand.dim() != 1 or cand.numel() == 0 or not bool(((cand >= 0) & (cand <= 1)).all()):
            raise ValueError("grid must be a non-empty 1-D sequence of thresholds in [0, 1]")
        cand = cand.unique()
    # rows predicted positive at t are the k(t) highest scores: k = #{score > t}, and tp(t) is the
    # number of positives among them, read off a cumulative count over the scores in descending order
    order = torch.argsort(s, descending=True, stable=True)
    pos_before = torch.cat([y.new_zeros(1), torch.cumsum(y[order], 0)])  # positives among the top k
    k = s.numel() - torch.searchsorted(torch.sort(s).values, cand, right=True)
    tp = pos_before[k]
    P = y.sum()
    fp, fn = k.to(torch.float64) - tp, P - tp
    precision = torch.where(k > 0, tp / k.clamp(min=1), torch.zeros_like(tp))
    recall = tp / P if P > 0 else torch.zeros_like(tp)
    f1 = torch.where(k + P > 0, 2 * tp / (k + P).clamp(min=1), torch.zeros_like(tp))
    score = f1 if objective == "f1" else precision
    if min_recall is not None:
        feasible = recall >= min_recall
        if not bool(feasible.any()):
            raise ValueError(f"no threshold in the grid reaches recall >= min_recall = {min_recall} (the best is "
                             f"{float(recall.max()):.6g})")
        score = torch.where(feasible, score, torch.full_like(score, -1.0))
    best = int(torch.argmax(score))  # the first maximum: the lowest threshold among ties
    n = s.numel()
    metrics = {"threshold": float(cand[best]), "precision": float(precision[best]), "recall": float(recall[best]),
               "f1": float(f1[best]), "tp": int(tp[best]), "fp": int(fp[best]), "fn": int(fn[best]),
               "tn": int(n - tp[best] - fp[best] - fn[best])}
    return metrics["threshold"], metrics


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)| over n_bins
    equal-width confidence bins ((b - 1) / n_bins, b / n_bins] (a confidence of 0 falls in the first).

    probs (N, C), rows of class probabilities (e.g. softmax(logits / T)): confidence = the largest,
    correct = its class (the first, among ties) is the label, labels int (N,). probs (N,) or (N, 1):
    probabilities of the positive class of a binary stage, predicted positive where p > 0.5 (the
    default threshold), confidence max(p, 1 - p), labels 0/1.
    """
    _float_tensor(probs, "probs")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    if probs.dim() == 2 and probs.shape[1] >= 2:
        p = probs.detach().to(torch.float64)
        if p.shape[0] < 1:
            raise ValueError("probs must hold at least one row")
        if not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError("probs must be probabilities in [0, 1] (apply softmax to logits first)")
        y = _class_labels(labels, *p.shape, p.device)
        conf, pred = p.max(dim=1)
        correct = (pred == y).to(torch.float64)
    else:
        p = _scores(probs, "probs")
        y = _binary_labels(labels, p.shape[0], probs.device)
        pred = (p > 0.5).to(torch.float64)
        conf = torch.where(pred > 0, p, 1 - p)
        correct = (pred == y).to(torch.float64)
    b = (torch.ceil(conf * n_bins).to(torch.int64) - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, b, correct - conf)
    return float(gap.abs().sum() / conf.numel())
