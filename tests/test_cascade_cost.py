"""Compute accounting: cascade_cost's parts against torch.utils.flop_counter run on each part directly, and
its expected FLOPs against the rows each part actually ran on (forward hooks) in dynamic mode."""

import pytest
import torch
from cascade_trees import random_cascade, random_input
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fastcascade as fc
from fastcascade.demo.models import SmallCNN


def _flops(module, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def _trunk_cascade(seed: int = 0):
    """A SmallCNN cut into three segments: a gate on layer1, the flat head on layer3 behind it, and an
    ensemble of two heads on layer2 under a Confident exit."""
    torch.manual_seed(seed)
    model = SmallCNN(8).eval()
    trunk, head = fc.split_backbone(model, at=["layer1", "layer2"])
    pool = lambda c, k: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, k))  # noqa: E731
    ens = fc.Ensemble([pool(64, 3), pool(64, 3)], [1, 2, 3], name="ens", tap="layer2")
    exit_ = fc.Stage(pool(64, 2), fc.Confident(0.6), [4, 5, fc.Stage(head, fc.Argmax(), range(8), name="flat",
                                                                       tap="layer3")], name="exit", tap="layer2")
    mid = fc.Stage(pool(32, 2), fc.Argmax(), [ens, exit_], name="mid", tap="layer1")
    root = fc.Stage(pool(32, 1), fc.Threshold(0.5), [0, mid], name="gate", tap="layer1")
    return fc.Cascade(root, trunk=trunk).eval(), model


def test_parts_are_what_flop_counter_counts_on_each_part():
    c, model = _trunk_cascade()
    x = torch.rand(5, 1, 16, 16)
    cost = fc.cascade_cost(c, x)
    f1 = c.trunk["layer1"](x[:1])
    f2 = c.trunk["layer2"](f1)
    f3 = c.trunk["layer3"](f2)
    expected = {"layer1": _flops(c.trunk["layer1"], x[:1]), "layer2": _flops(c.trunk["layer2"], f1),
                "layer3": _flops(c.trunk["layer3"], f2), "gate": _flops(c.root.module, f1),
                "mid": _flops(c.nodes[1].module, f1), "ens.0": _flops(c.nodes[2].members[0], f2),
                "ens.1": _flops(c.nodes[2].members[1], f2), "exit": _flops(c.nodes[3].module, f2),
                "flat": _flops(c.nodes[4].module, f3)}
    assert cost.parts == expected
    assert all(v > 0 for v in expected.values())
    assert cost.dense == sum(expected.values())
    # the flat model is its trunk plus its head
    assert fc.flops_per_row(model, x) == _flops(model, x[:1]) == expected["layer1"] + expected["layer2"] + \
        expected["layer3"] + expected["flat"]
    assert cost.entry["gate"] == expected["layer1"] + expected["gate"]
    assert cost.entry["exit"] == expected["layer2"] + expected["exit"]
    assert cost.entry["flat"] == expected["layer3"] + expected["flat"]


def _rows_through(c, x):
    """Rows each part ran on during predict(x) (dynamic mode), counted by forward hooks; exact row counts
    (row_buckets 0): the cost model counts the rows routed to a part, not the runner's padding."""
    rows, hooks, buckets = {}, [], c.row_buckets
    c.row_buckets = 0

    def count(name):
        def hook(module, inputs, output):
            rows[name] = rows.get(name, 0) + inputs[0].shape[0]
        return hook

    for name, seg in (c.trunk or {}).items():
        hooks.append(seg.register_forward_hook(count(name)))
    for node in c.nodes:
        if isinstance(node, fc.Ensemble):
            hooks += [m.register_forward_hook(count(f"{node.name}.{k}")) for k, m in enumerate(node.members)]
        else:
            hooks.append(node.module.register_forward_hook(count(node.name)))
    try:
        out = c.predict(x, return_details=True)
    finally:
        c.row_buckets = buckets
        for h in hooks:
            h.remove()
    return rows, out


@pytest.mark.parametrize("seed", range(8))
def test_expected_flops_are_the_parts_times_the_rows_that_ran_them(seed):
    c = random_cascade(seed, segments=3)
    x = random_input(300, seed)
    cost = fc.cascade_cost(c, x)
    rows, out = _rows_through(c, x)
    total = sum(cost.parts[p] * n for p, n in rows.items())
    assert cost.expected(x) == total / 300
    assert cost.mean_flops(out.exit_stage) == total / 300
    assert cost.expected(x, mode="static") == total / 300
    reached = cost.reached(out.exit_stage)
    assert reached == {p: rows.get(p, 0) / 300 for p in cost.parts}
    per_row = cost.row_flops(out.exit_stage)
    assert per_row.dtype == torch.int64 and int(per_row.sum()) == total


def test_expected_flops_of_the_trunk_cascade_and_evaluate_reports_them():
    c, model = _trunk_cascade(1)
    x = torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 8, (400,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f1 = c.trunk["layer1"](x)
        mid = c.nodes[1].module(f1)
        c.nodes[1].module[2].bias[1] -= (mid[:, 1] - mid[:, 0]).median()  # mid sends rows both ways
        gate = torch.sigmoid(c.root.module(f1)).median().item()
        tau = torch.softmax(c.nodes[3].module(c.trunk["layer2"](f1)), 1).amax(1).median().item()
    c = c.with_setting({"gate": gate, "exit": tau})  # about half the rows pass each
    cost = fc.cascade_cost(c, x)
    rows, out = _rows_through(c, x)
    assert 0 < rows["layer1"] - rows["layer2"] and rows["layer2"] >= rows["layer3"] > 0
    assert cost.expected(x) == sum(cost.parts[p] * n for p, n in rows.items()) / 400
    assert cost.expected(x) < cost.dense
    rep = fc.evaluate(c, (x, y))
    assert rep.flops_per_row == cost.expected(x) and rep.dense_flops_per_row == cost.dense
    assert rep.parts_reached == cost.reached(out.exit_stage) and rep.parts_reached["layer1"] == 1.0
    assert "FLOPs per row" in str(rep) and rep.to_dict()["flops_per_row"] == rep.flops_per_row
    flat = fc.evaluate(model, (x, y))
    assert flat.flops_per_row == fc.flops_per_row(model, x) == flat.dense_flops_per_row
    ev = c.evaluate(x, y, batch_size=64)  # the same counts summed over batches
    assert ev.flops_per_row == rep.flops_per_row and ev.parts_reached == rep.parts_reached


def test_cost_leaves_modules_as_they_were():
    c, _ = _trunk_cascade(2)
    c.train()
    bn = c.trunk["layer1"][0][1]
    before = bn.running_mean.clone()
    fc.cascade_cost(c, torch.rand(3, 1, 16, 16))
    fc.flops_per_row(c.trunk["layer1"], torch.rand(3, 1, 16, 16))
    assert torch.equal(bn.running_mean, before) and all(m.training for m in c.modules())


def test_bad_examples():
    c, model = _trunk_cascade()
    with pytest.raises(ValueError, match="example must hold at least one row"):
        fc.cascade_cost(c, torch.rand(0, 1, 16, 16))
    with pytest.raises(TypeError, match="example must be a tensor"):
        fc.cascade_cost(c, [1, 2])
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        fc.flops_per_row(lambda v: v, torch.rand(1, 2))
    rep = c.evaluate(torch.rand(0, 1, 16, 16), torch.zeros(0, dtype=torch.int64))
    assert rep.parts_reached == {} and rep.flops_per_row != rep.flops_per_row  # NaN
    assert all(v != v for v in rep.reached.values()) and rep.final.confusion.sum() == 0
