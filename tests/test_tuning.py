"""tune_cascade against brute force: every routing of the tuned rules applied with Cascade.with_setting and run
with Cascade.predict, scored with fastcascade.metrics and priced with cascade_cost."""

import itertools
import math

import pytest
import torch
from cascade_trees import random_cascade, random_input
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastcascade as fc
from fastcascade.metrics import classification_report


def _scores(c, name, x):
    """Every row's score for stage name's rule, computed here in float64 from its module's outputs:
    sigmoid(logit / T) for a Threshold, max softmax(logits / T) for a Confident."""
    outs = fc.cascade.dense_outputs(c, x)[name].double()
    rule = c.nodes[c.node_names.index(name)].rule
    if isinstance(rule, fc.Threshold):
        return torch.sigmoid(outs.reshape(-1) / rule.temperature)
    return torch.softmax(outs / rule.temperature, 1).amax(1)


def _grid(c, name, x):
    """Values that realise every routing of the rule on x: 0, 1 and the midpoints of the distinct scores."""
    u = torch.unique(_scores(c, name, x))
    return [0.0] + ((u[1:] + u[:-1]) / 2).tolist() + [1.0]


_COSTS = {}


def _run(c, setting, x, y, objective):
    """(metric, mean FLOPs per row) of c with the setting, run by Cascade.predict."""
    key = (id(c), id(x))
    if key not in _COSTS:  # parts do not change with the setting; nodes keep their ids
        _COSTS[key] = (c, x, fc.cascade_cost(c, x))
    out = c.with_setting(setting).predict(x, return_details=True)
    rep = classification_report(out.labels, y, c.num_classes)
    metric = {"macro_f1": rep.macro_f1, "accuracy": rep.accuracy}[objective]
    return metric, _COSTS[key][2].mean_flops(out.exit_stage)


def _brute(c, names, x, y, objective="macro_f1", budget=None):
    best = None
    for values in itertools.product(*(_grid(c, n, x) for n in names)):
        m, cost = _run(c, dict(zip(names, values)), x, y, objective)
        if budget is not None and cost > budget:
            continue
        if best is None or m > best[0] + 1e-12 or (abs(m - best[0]) <= 1e-12 and cost < best[1]):
            best = (m, cost)
    return best


def _labels(c, n, seed):
    return torch.randint(0, c.num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def _tunable(c):
    return [n.name for n in c.nodes if isinstance(n, fc.Stage) and isinstance(n.rule, (fc.Threshold, fc.Confident))]


def _cases(count, want=1):
    """(seed, cascade) for random cascades with `want` tunable rules among the first seeds that have them."""
    out, seed = [], 0
    while len(out) < count:
        c = random_cascade(seed, max_depth=2, num_labels=4)
        if len(_tunable(c)) == want:
            out.append((seed, c))
        seed += 1
    return out


@pytest.mark.parametrize("objective", ["macro_f1", "accuracy"])
@pytest.mark.parametrize("case", range(6))
def test_one_rule_matches_brute_force(case, objective):
    seed, c = _cases(6)[case]
    x, y = random_input(60, seed), _labels(c, 60, seed)
    name = _tunable(c)[0]
    r = fc.tune_cascade(c, x, y, objective=objective)
    best = _brute(c, [name], x, y, objective)
    assert r.metric == pytest.approx(best[0], abs=1e-12) and r.cost == best[1]
    assert set(r.setting) == {name}
    # the tuned cascade reproduces the metric and cost when run
    m, cost = _run(c, r.setting, x, y, objective)
    assert m == pytest.approx(r.metric, abs=1e-12) and cost == r.cost
    rule = r.cascade.nodes[r.cascade.node_names.index(name)].rule
    assert (rule.threshold if isinstance(rule, fc.Threshold) else rule.tau) == r.setting[name]


@pytest.mark.parametrize("case", range(4))
def test_a_budget_is_respected_like_brute_force(case):
    seed, c = _cases(4)[case]
    x, y = random_input(50, seed), _labels(c, 50, seed + 7)
    name = _tunable(c)[0]
    costs = sorted({_run(c, {name: v}, x, y, "macro_f1")[1] for v in _grid(c, name, x)})
    budget = costs[len(costs) // 3]
    r = fc.tune_cascade(c, x, y, budget=budget)
    best = _brute(c, [name], x, y, budget=budget)
    assert r.cost <= budget and r.metric == pytest.approx(best[0], abs=1e-12) and r.cost == best[1]
    if costs[0] > 0:
        with pytest.raises(ValueError, match="budget .* no setting found within it; the cheapest"):
            fc.tune_cascade(c, x, y, budget=costs[0] / 2)


def test_the_frontier_is_non_dominated_and_reproducible():
    seed, c = _cases(3)[2]
    x, y = random_input(80, seed), _labels(c, 80, 1)
    r = fc.tune_cascade(c, x, y)
    assert len(r.frontier) >= 2
    costs = [p[0] for p in r.frontier]
    metrics = [p[1] for p in r.frontier]
    assert costs == sorted(costs) and all(b > a for a, b in zip(metrics, metrics[1:]))
    assert r.frontier[-1][1] == pytest.approx(r.metric, abs=1e-12) and r.frontier[-1][0] == r.cost
    for cost, metric, setting in r.frontier:
        m, cc = _run(c, setting, x, y, "macro_f1")
        assert m == pytest.approx(metric, abs=1e-12) and cc == cost
    # nothing brute force finds dominates a frontier point
    name = _tunable(c)[0]
    for v in _grid(c, name, x):
        m, cc = _run(c, {name: v}, x, y, "macro_f1")
        assert not any(cc <= cost and m > metric + 1e-12 for cost, metric, _ in r.frontier if cc < cost)


def _two_independent_rules(seed):
    """An Argmax root whose two branches are independent Threshold / Confident stages (disjoint rows)."""
    gen = torch.Generator().manual_seed(seed)

    def lin(o):
        m = nn.Linear(6, o)
        with torch.no_grad():
            m.weight.copy_(torch.randn(o, 6, generator=gen))
            m.bias.zero_()
        return m.eval()

    a = fc.Stage(lin(1), fc.Threshold(0.5), [0, fc.Stage(lin(2), fc.Argmax(), [1, 2], name="a2")], name="a")
    b = fc.Stage(lin(2), fc.Confident(0.8), [2, 3, 0], name="b")
    return fc.Cascade(fc.Stage(lin(2), fc.Argmax(), [a, b], name="root"))


@pytest.mark.parametrize("seed", range(2))
def test_two_independent_rules_reach_the_global_optimum_of_accuracy(seed):
    """Accuracy and cost add up over disjoint rows, so coordinate ascent from the one-at-a-time optima is
    the global optimum: brute force over both rules together."""
    c = _two_independent_rules(seed)
    x = random_input(24, seed)
    y = _labels(c, 24, seed)
    r = fc.tune_cascade(c, x, y, objective="accuracy")
    best = _brute(c, ["a", "b"], x, y, "accuracy")
    assert r.metric == pytest.approx(best[0], abs=1e-12) and r.cost == best[1]


@pytest.mark.parametrize("case", range(3))
def test_several_rules_end_at_a_coordinate_optimum(case):
    """Coupled rules (macro F1, nested stages): no single rule can be moved to a better (metric, cost)."""
    seed, c = _cases(3, want=2)[case]
    x = random_input(40, seed)
    y = _labels(c, 40, seed)
    r = fc.tune_cascade(c, x, y)
    names = _tunable(c)
    assert set(r.setting) == set(names)
    m0, c0 = _run(c, r.setting, x, y, "macro_f1")
    assert m0 == pytest.approx(r.metric, abs=1e-12) and c0 == r.cost
    for name in names:
        for v in _grid(c, name, x):
            m, cost = _run(c, {**r.setting, name: v}, x, y, "macro_f1")
            assert not (m > r.metric + 1e-12 or (abs(m - r.metric) <= 1e-12 and cost < r.cost)), (name, v)
    # and at least as good as each rule tuned alone with the others as they were
    for name in names:
        alone = fc.tune_cascade(c, x, y, params=[name])
        assert r.metric >= alone.metric - 1e-12 or r.cost < alone.cost
    assert fc.tune_cascade(c, x, y).setting == r.setting  # deterministic


def test_callable_objective_dataloader_and_params():
    seed, c = _cases(2)[1]
    x = random_input(70, seed)
    y = _labels(c, 70, 5)
    recall0 = lambda cm: cm[:, 0, 0].double() / cm[:, 0].sum(1).clamp(min=1)  # noqa: E731
    r = fc.tune_cascade(c, x, y, objective=recall0)
    name = _tunable(c)[0]
    best = max(((pred := c.with_setting({name: v}).predict(x))[y == 0] == 0).double().mean().item()
               for v in _grid(c, name, x))
    assert r.metric == pytest.approx(best, abs=1e-12) and pred.shape == (70,)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    a, b = fc.tune_cascade(c, loader), fc.tune_cascade(c, x, y, batch_size=16)
    assert a.setting == b.setting and a.metric == b.metric and a.cost == b.cost and a.frontier == b.frontier


def test_bad_arguments():
    c = _two_independent_rules(0)
    x, y = random_input(20, 0), _labels(c, 20, 0)
    with pytest.raises(ValueError, match="params: unknown stage 'zz'"):
        fc.tune_cascade(c, x, y, params=["zz"])
    with pytest.raises(ValueError, match="params: stage 'root' has an Argmax rule"):
        fc.tune_cascade(c, x, y, params=["root"])
    with pytest.raises(ValueError, match="objective must be one of"):
        fc.tune_cascade(c, x, y, objective="f2")
    with pytest.raises(ValueError, match="objective: a callable .* must return M scores"):
        fc.tune_cascade(c, x, y, objective=lambda cm: cm.sum())
    with pytest.raises(ValueError, match="labels must be \\(N,\\)"):
        fc.tune_cascade(c, x, y[:5])
    with pytest.raises(ValueError, match="labels must be final class ids in \\[0, 4\\)"):
        fc.tune_cascade(c, x, y + 4)
    with pytest.raises(ValueError, match="budget must be"):
        fc.tune_cascade(c, x, y, budget=-1)
    with pytest.raises(ValueError, match="labels must be None when x is a DataLoader"):
        fc.tune_cascade(c, DataLoader(TensorDataset(x, y)), y)
    with pytest.raises(ValueError, match="no rows"):
        fc.tune_cascade(c, x[:0], y[:0])
    plain = fc.Cascade(fc.Stage(nn.Linear(6, 2), fc.Argmax(), [0, 1], name="only"))
    with pytest.raises(ValueError, match="no Threshold or Confident rule"):
        fc.tune_cascade(plain, x, y % 2)
    nan = _two_independent_rules(0)
    nan.nodes[1].module.bias.data.fill_(math.nan)
    with pytest.raises(ValueError, match="stage 'a': its logits hold NaN"):
        fc.tune_cascade(nan, x, y)
