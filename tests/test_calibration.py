"""Calibration: temperature scaling recovers a known temperature, threshold search equals a
brute-force search, ECE equals its definition, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded

import fastcascade as fc


def _synthetic(gen, n, C, t_true):
    """Labels drawn from softmax(z) (sigmoid(z) when C == 1), logits z * t_true: the model is
    over-confident (t_true > 1) or under-confident (t_true < 1) by exactly t_true."""
    z = torch.randn(n, C, generator=gen, dtype=torch.float64) * 2
    if C == 1:
        y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(z[:, 0])).to(torch.int64)
        return z[:, 0] * t_true, y
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=gen)[:, 0]
    return z * t_true, y


@pytest.mark.parametrize("C", [1, 2, 5])
@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(C, t_true):
    logits, labels = _synthetic(seeded("temperature", C, t_true), 40000, C, t_true)
    for dtype in [torch.float32, torch.float64]:
        t = fc.fit_temperature(logits.to(dtype), labels)
        assert t == pytest.approx(t_true, rel=0.04), (C, t_true, dtype)
    if C == 1:  # (N, 1) logits and float labels are the same binary problem
        assert fc.fit_temperature(logits[:, None].float(), labels.float()) == pytest.approx(t, rel=1e-5)


def test_fitted_temperature_minimises_the_nll():
    logits, labels = _synthetic(seeded("nll"), 5000, 4, 1.7)
    t = fc.fit_temperature(logits, labels)

    def nll(s):
        return float(F.cross_entropy(logits / s, labels))

    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02), nll(1.0))


def test_temperature_scaler_module():
    logits, labels = _synthetic(seeded("scaler"), 20000, 3, 2.0)
    scaler = fc.TemperatureScaler()
    assert torch.equal(scaler(logits), logits)
    assert scaler.fit(logits.float(), labels) is scaler
    assert float(scaler.temperature) == pytest.approx(2.0, rel=0.04)
    x = logits[:5].float().requires_grad_(True)
    y = scaler(x)
    assert y.dtype == torch.float32 and torch.allclose(y, x / float(scaler.temperature))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / float(scaler.temperature)))
    loaded = fc.TemperatureScaler()
    loaded.load_state_dict(scaler.state_dict())
    assert float(loaded.temperature) == float(scaler.temperature)
    assert "temperature=" in repr(scaler)


def test_calibration_lowers_ece():
    logits, labels = _synthetic(seeded("ece-drop"), 20000, 4, 3.0)
    before = fc.expected_calibration_error(torch.softmax(logits, 1), labels)
    t = fc.fit_temperature(logits, labels)
    after = fc.expected_calibration_error(torch.softmax(logits / t, 1), labels)
    assert before > 0.05 and after < before / 4


# ---------------------------------------------------------------------------------------------
# threshold search


def _brute_force(scores, labels, grid, objective, min_recall):
    best = None
    for t in sorted(set(grid)):
        pred = [s > t for s in scores]
        tp = sum(p and y for p, y in zip(pred, labels))
        k, P = sum(pred), sum(labels)
        prec = tp / k if k else 0.0
        rec = tp / P if P else 0.0
        f1 = 2 * tp / (k + P) if k + P else 0.0
        if min_recall is not None and rec < min_recall:
            continue
        val = f1 if objective == "f1" else prec
        if best is None or val > best[1]:  # strict: the lowest threshold keeps a tie
            best = (t, val, prec, rec, f1, tp)
    return best


@pytest.mark.parametrize("objective,min_recall", [("f1", None), ("f1", 0.8), ("precision", 0.5),
                                                  ("precision", 0.9), ("precision", 0.0)])
def test_tune_threshold_equals_brute_force(objective, min_recall):
    gen = seeded("threshold", objective, min_recall)
    for n in [1, 2, 10, 300]:
        labels = (torch.rand(n, generator=gen) < 0.3).to(torch.int64)
        if n > 1:
            labels[0] = 1
        # rounded scores: many ties between positives and negatives
        scores = ((torch.rand(n, generator=gen, dtype=torch.float64) + 0.4 * labels).clamp(max=1) * 20).round() / 20
        s, y = scores.tolist(), labels.tolist()
        for grid in [None, [0.0, 0.25, 0.5, 0.75, 1.0], torch.linspace(0, 1, 41)]:
            cands = [0.0] + s if grid is None else [float(g) for g in grid]
            want = _brute_force(s, y, cands, objective, min_recall)
            if want is None:
                with pytest.raises(ValueError, match="no threshold in the grid reaches recall"):
                    fc.tune_threshold(scores, labels, objective, min_recall, grid)
                continue
            t, m = fc.tune_threshold(scores, labels, objective, min_recall, grid)
            assert t == want[0], (n, grid)
            assert (m["precision"], m["recall"], m["f1"], m["tp"]) == pytest.approx(want[2:], abs=1e-15)
            assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == n and m["threshold"] == t
            pred = scores > t  # what route_threshold / Threshold(t) would decide
            assert m["tp"] == int((pred & (labels == 1)).sum()) and m["fp"] == int((pred & (labels == 0)).sum())


def test_tune_threshold_separable_scores_and_ties():
    labels = torch.tensor([0, 0, 1, 1])
    t, m = fc.tune_threshold(torch.tensor([0.1, 0.2, 0.7, 0.9], dtype=torch.float64), labels)
    assert t == 0.2 and m["f1"] == 1.0 and m["fp"] == 0 and m["fn"] == 0
    # every positive at score 0.5 and negatives around: the lowest of the equal-F1 thresholds
    t, m = fc.tune_threshold(torch.tensor([0.3, 0.5, 0.5, 0.5, 0.9], dtype=torch.float64), torch.tensor([0, 1, 1, 1, 0]),
                             grid=[0.0, 0.3, 0.4, 0.45])
    assert t == 0.3 and m["tp"] == 3 and m["fp"] == 1
    with pytest.raises(ValueError, match="no threshold in the grid reaches recall"):
        fc.tune_threshold(torch.tensor([0.0, 0.5]), torch.tensor([1, 0]), "precision", min_recall=1.0)


# ---------------------------------------------------------------------------------------------
# expected calibration error


def _ece_loop(conf, correct, n_bins):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            mean_conf = sum(conf[i] for i in idx) / len(idx)
            total += len(idx) / len(conf) * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_equals_its_definition(n_bins):
    gen = seeded("ece", n_bins)
    probs = torch.softmax(torch.randn(500, 4, generator=gen, dtype=torch.float64) * 2, 1)
    labels = torch.randint(0, 4, (500,), generator=gen)
    conf, pred = probs.max(1)
    want = _ece_loop(conf.tolist(), (pred == labels).double().tolist(), n_bins)
    assert fc.expected_calibration_error(probs, labels, n_bins) == pytest.approx(want, abs=1e-12)
    p = torch.rand(300, generator=gen, dtype=torch.float64)
    p[:3] = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y = (torch.rand(300, generator=gen) < 0.5).to(torch.int64)
    pred = (p > 0.5).long()
    conf = torch.where(pred == 1, p, 1 - p)
    want = _ece_loop(conf.tolist(), (pred == y).double().tolist(), n_bins)
    assert fc.expected_calibration_error(p, y, n_bins) == pytest.approx(want, abs=1e-12)
    assert fc.expected_calibration_error(p[:, None].float(), y.bool(), n_bins) == pytest.approx(want, abs=1e-6)


def test_ece_of_a_perfectly_calibrated_predictor_is_small():
    gen = seeded("ece-perfect")
    p = torch.rand(200000, generator=gen, dtype=torch.float64)
    y = (torch.rand(200000, generator=gen, dtype=torch.float64) < p).long()
    assert fc.expected_calibration_error(p, y) < 0.01


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    x2, x1 = torch.randn(6, 3), torch.randn(6)
    y3, y2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 1, 0, 1, 0])
    p = torch.rand(6)
    cases = [
        (lambda: fc.fit_temperature(y3, y3), ValueError, "logits must be a floating-point"),
        (lambda: fc.fit_temperature(x2[:, None], y3), ValueError, r"logits must be \(N,\) or \(N, 1\)"),
        (lambda: fc.fit_temperature(x2[:0], y3[:0]), ValueError, "at least one row"),
        (lambda: fc.fit_temperature(x2, y3[:5]), ValueError, r"labels must be \(N,\) with N = 6"),
        (lambda: fc.fit_temperature(x2, y3 + 1), ValueError, r"labels hold ids outside \[0, C = 3\)"),
        (lambda: fc.fit_temperature(x2, y3.float()), ValueError, "labels must be integer class ids"),
        (lambda: fc.fit_temperature(x1, y3), ValueError, "labels of a binary stage must be 0 or 1"),
        (lambda: fc.fit_temperature(x1.tolist(), y2), TypeError, "logits must be a torch.Tensor"),
        (lambda: fc.fit_temperature(x1.where(y2 == 0, math.nan), y2), ValueError, "logits must be finite"),
        (lambda: fc.fit_temperature(x1, y2, max_iter=0), ValueError, "max_iter must be an int >= 1"),
        (lambda: fc.TemperatureScaler(0.0), ValueError, "temperature must be a finite number > 0"),
        (lambda: fc.tune_threshold(x1, y2), ValueError, r"scores must be probabilities in \[0, 1\]"),
        (lambda: fc.tune_threshold(p, y3), ValueError, "labels of a binary stage must be 0 or 1"),
        (lambda: fc.tune_threshold(p, y2, "recall"), ValueError, "objective must be one of"),
        (lambda: fc.tune_threshold(p, y2, "precision"), ValueError, "needs min_recall"),
        (lambda: fc.tune_threshold(p, y2, min_recall=1.5), ValueError, r"min_recall must be a number in \[0, 1\]"),
        (lambda: fc.tune_threshold(p, y2, grid=[0.5, 2.0]), ValueError, "grid must be a non-empty 1-D"),
        (lambda: fc.tune_threshold(p, y2, grid=[]), ValueError, "grid must be a non-empty 1-D"),
        (lambda: fc.tune_threshold(p[:, None].expand(6, 2), y2), ValueError, r"scores must be \(N,\) or \(N, 1\)"),
        (lambda: fc.tune_threshold(p, y2[:4]), ValueError, r"labels must be \(N,\) with N = 6"),
        (lambda: fc.expected_calibration_error(torch.softmax(x2, 1), y3, 0), ValueError, "n_bins must be an int >= 1"),
        (lambda: fc.expected_calibration_error(x2, y3), ValueError, r"probs must be probabilities in \[0, 1\]"),
        (lambda: fc.expected_calibration_error(torch.softmax(x2, 1), y3 + 1), ValueError, "outside"),
        (lambda: fc.expected_calibration_error(p.int(), y2), ValueError, "probs must be a floating-point"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
