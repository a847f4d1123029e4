"""The demo's Stage-1 tools: the recipe and its ablations, the stage table of a confusion matrix, and the
Stage-1 threshold chosen three ways (checked against the cascade's own routing and brute force)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastcascade import data as fd
from fastcascade import metrics
from fastcascade.demo.stage1 import (
    ABLATIONS,
    PLAN_GRID,
    STAGE1_MIN_RECALL,
    STAGE1_RECIPE,
    SWEEP,
    stage_table_of,
    threshold_ways,
)
from fastcascade.losses import sigmoid_focal_loss


def test_the_recipe_is_the_plans_and_each_ablation_removes_one_part():
    assert (STAGE1_RECIPE.alpha, STAGE1_RECIPE.gamma, STAGE1_RECIPE.hard_negative_ratio, STAGE1_RECIPE.sampler) == (
        0.25, 2.5, 3.0, "oversample")
    assert ABLATIONS["recipe"] == STAGE1_RECIPE
    full = dataclasses.asdict(STAGE1_RECIPE)
    for name, recipe in ABLATIONS.items():
        changed = {k for k, v in dataclasses.asdict(recipe).items() if v != full[k]}
        assert len(changed) == (0 if name == "recipe" else 1), name
        assert all(dataclasses.asdict(recipe)[k] is None for k in changed)


def test_recipe_loss_is_the_mined_alpha_focal_loss():
    g = torch.Generator().manual_seed(0)
    out, t = torch.randn(64, 1, generator=g), (torch.rand(64, generator=g) < 0.2).long()
    want = sigmoid_focal_loss(out.reshape(-1), t.float(), alpha=0.25, gamma=2.5, hard_negative_ratio=3.0)
    assert torch.equal(STAGE1_RECIPE.loss(out, t), want)
    # mining keeps 3 negatives per positive: with fewer positives it changes the loss, without alpha too
    assert not torch.equal(ABLATIONS["no mining"].loss(out, t), want)
    assert not torch.equal(ABLATIONS["no alpha"].loss(out, t), want)
    assert STAGE1_RECIPE.fit_options() == {"sampler": "oversample"} and ABLATIONS["no sampler"].fit_options() == {
        "sampler": None}


def test_stage_table_of_a_confusion_matrix_is_the_tables_of_its_rows():
    g = torch.Generator().manual_seed(1)
    y, p = torch.randint(0, 8, (500,), generator=g), torch.randint(0, 8, (500,), generator=g)
    cm = metrics.confusion_matrix(p, y, 8)
    assert stage_table_of(cm.tolist()) == fd.stage_table(p, y)


def _v6():
    torch.manual_seed(0)

    def lin(k):
        return nn.Sequential(nn.Flatten(1), nn.Linear(256, k))

    return fd.av1_partition_cascade(lin(1), lin(3), lin(2), [lin(4) for _ in range(3)], temperature=1.3).eval()


@torch.no_grad()
def test_threshold_ways_against_the_cascades_routing_and_brute_force():
    g = torch.Generator().manual_seed(2)
    c = _v6()
    xv, xt = torch.rand(400, 1, 16, 16, generator=g), torch.rand(300, 1, 16, 16, generator=g)
    # labels that Stage 1's scores partly explain, so that the thresholds differ
    def labels(x):
        s = torch.sigmoid(c.root.module(x).reshape(-1).double() / 1.3)
        lo, hi = s.min(), s.max()
        part = (s - lo) / (hi - lo) + 0.5 * torch.rand(len(x), generator=g, dtype=torch.float64) > 0.8
        return s, torch.where(part, torch.randint(1, 8, (len(x),), generator=g), torch.zeros(len(x), dtype=torch.long))

    s_v, yv = labels(xv)
    yt = labels(xt)[1]
    ways = threshold_ways(c, SimpleNamespace(device=torch.device("cpu")), xv, yv, xt, yt)
    sweep = ways.pop("sweep")
    assert list(ways) == ["stage-1 F1 (v5)", "precision", "end to end"]
    # v5's way: the first grid threshold of best Stage-1 F1 on val, found by a loop
    pos = yv != fd.NONE

    def f1(t):
        pred = s_v > t
        tp = int((pred & pos).sum())
        return 2 * tp / max(1, int(pred.sum()) + int(pos.sum()))

    best = max(PLAN_GRID.tolist(), key=lambda t: (f1(t), -t))
    assert ways["stage-1 F1 (v5)"]["threshold"] == pytest.approx(best)
    # the precision way keeps the recall floor on val
    thr = ways["precision"]["threshold"]
    assert int(((s_v > thr) & pos).sum()) / int(pos.sum()) >= STAGE1_MIN_RECALL
    for w in ways.values():  # each row is the cascade routed at that threshold
        pred = c.with_setting({"stage1": w["threshold"]}).predict(xt)
        assert w["table"] == fd.stage_table(pred, yt).to_dict()
        sent = pred != fd.NONE
        assert bool(sent.any())
        assert w["reach_stage2"] == pytest.approx(float(sent.double().mean()))
        assert w["contamination"] == pytest.approx(float((yt[sent] == fd.NONE).double().mean()))
    # the sweep's shortcut (NONE below the threshold, the sent-on labels above) is the cascade's routing
    for k in (0, 11, 24, 37, 48):
        t = SWEEP[k].item()
        table = fd.stage_table(c.with_setting({"stage1": t}).predict(xt), yt)
        assert sweep["threshold"][k] == t
        assert sweep["macro_f1"][k] == pytest.approx(table.macro_f1)
        assert sweep["stage1_f1"][k] == pytest.approx(table.stage1_f1)
