"""The latency model (fastcascade.measure_latency, LatencyModel) and tuning on it: the interpolation, the
calls-per-batch formula against the exact binomial expectation, tune_cascade(cost="latency") against brute
force on a synthetic latency model, the JSON round trip, the device-mismatch warning and bad arguments.
Whether its predictions hold on real timings is a benchmark's question (bench/latency_check.py)."""

import itertools
import json
import math
import warnings

import pytest
import torch
from cascade_trees import random_cascade, random_input
from torch import nn

import fastcascade as fc
from fastcascade.cascade.latency import PartTiming, beyond_root, latency_parts, padded_parts
from fastcascade.metrics import classification_report


def _timing(sizes, med):
    return PartTiming(tuple(sizes), tuple(med), tuple(m * 1.5 for m in med))


def _synthetic(cascade, seed: int) -> fc.LatencyModel:
    """A latency model of cascade's parts with random piecewise-linear times: a fixed cost per call and a
    per-row cost that changes at 64 rows (as a cache would make it); the root's parts alone at 40-90% of it."""
    gen = torch.Generator().manual_seed(seed)
    names, exits = latency_parts(cascade)
    parts = {}
    for p in names:
        a, b, b2 = (torch.rand(3, generator=gen) * torch.tensor([50e-6, 2e-6, 6e-6])).tolist()
        parts[p] = _timing((1, 64, 512), (a + b, a + 64 * b, a + 64 * b + 448 * b2))
    alone = {p: _timing((1, 64, 512), tuple(t * (0.4 + 0.5 * float(torch.rand(1, generator=gen)))
                                            for t in parts[p].median))
             for p in exits[0] if p != "runner"}
    env = fc.cascade.latency.environment(torch.device("cpu"))
    return fc.LatencyModel(parts, tuple(cascade.node_names), exits, env, 5, cascade.row_buckets,
                           padded_parts(cascade), alone, beyond_root(cascade))


def _predicted(lat, cascade, exit_stage, B):
    """Seconds per row from the module docstring's formula, written out per part in Python floats."""
    N = exit_stage.numel()

    def reach(part):
        return sum(int((exit_stage == k).sum()) for k, paid in enumerate(lat.exit_parts) if part in paid) / N

    deeper = 1 - (1 - sum(reach(k) for k in lat.beyond_root)) ** B  # a batch goes beyond the root
    total = 0.0
    for part, timing in lat.parts.items():
        p = reach(part)
        if p == 0:
            continue
        called = 1 - (1 - p) ** B
        rows = B * p / called
        if part in lat.padded and rows > 2 * lat.row_buckets:  # the runner's padding, on average
            rows *= 1 + math.log(2) / (2 * lat.row_buckets)
        t = float(timing.seconds(torch.tensor(rows, dtype=torch.float64)))
        if part in lat.alone:  # the root's parts: in the state the previous batch left
            t = deeper * t + (1 - deeper) * float(lat.alone[part].seconds(torch.tensor(rows, dtype=torch.float64)))
        elif part == "runner" and lat.alone:
            t = deeper * t
        total += called * t
    return total / B


def test_interpolation_between_and_beyond_the_measured_sizes():
    t = _timing((1, 10, 100), (1.0, 2.0, 20.0))
    got = t.seconds(torch.tensor([0.0, 1.0, 5.5, 10.0, 55.0, 100.0, 200.0, -3.0]))
    assert got.tolist() == pytest.approx([0.0, 1.0, 1.5, 2.0, 11.0, 20.0, 40.0, 0.0])
    assert float(t.seconds(torch.tensor(100.0), "p95")) == pytest.approx(30.0)
    # one size: proportional; below a smallest size above 1: scaled down to 0 rows
    assert float(_timing((8,), (4.0,)).seconds(torch.tensor(2.0))) == pytest.approx(1.0)
    assert float(_timing((8, 16), (4.0, 6.0)).seconds(torch.tensor(2.0))) == pytest.approx(1.0)


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.003, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("B", [1, 7, 64])
def test_calls_per_batch_formula_is_the_binomial_expectation_for_affine_times(p, B):
    """P(at least one of B rows reaches the part) = 1 - (1 - p)^B, each such call on B p / P rows: for t(k) =
    a + b k (k >= 1) the expected time per batch is exactly sum_k Binomial(B, p)(k) t(k)."""
    a, b = 3e-5, 2e-7
    lat = fc.LatencyModel({"x": _timing((1, 1000), (a + b, a + 1000 * b))}, ("n",), (("x",),), {}, 1)
    exact = sum(math.comb(B, k) * p ** k * (1 - p) ** (B - k) * (a + b * k) for k in range(1, B + 1)) / B
    got = float(lat.seconds_from_reach(torch.tensor([p], dtype=torch.float64), B))
    assert got == pytest.approx(exact, rel=1e-9, abs=1e-18)


def test_a_plain_model_is_one_part():
    lat = fc.LatencyModel({"model": _timing((1, 100), (1e-4, 1e-2))}, (), (), {}, 3)
    assert lat.seconds_per_row(None, batch_size=100) == pytest.approx(1e-4)
    assert lat.seconds_per_row(None, batch_size=50) == pytest.approx((1e-4 + 49 / 99 * (1e-2 - 1e-4)) / 50)
    with pytest.raises(ValueError, match="plain model"):
        lat.seconds_from_exits(torch.ones(1, 2), 8)


def _grid(c, name, x):
    outs = fc.cascade.dense_outputs(c, x)[name].double()
    rule = c.nodes[c.node_names.index(name)].rule
    s = (torch.sigmoid(outs.reshape(-1) / rule.temperature) if isinstance(rule, fc.Threshold)
         else torch.softmax(outs / rule.temperature, 1).amax(1))
    u = torch.unique(s)
    return [0.0] + ((u[1:] + u[:-1]) / 2).tolist() + [1.0]


def _brute(c, lat, names, x, y, B, budget=None):
    best = None
    for values in itertools.product(*(_grid(c, n, x) for n in names)):
        out = c.with_setting(dict(zip(names, values))).predict(x, return_details=True)
        m = classification_report(out.labels, y, c.num_classes).macro_f1
        cost = _predicted(lat, c, out.exit_stage, B)
        if budget is not None and cost > budget:
            continue
        if best is None or m > best[0] + 1e-12 or (abs(m - best[0]) <= 1e-12 and cost < best[1] - 1e-15):
            best = (m, cost)
    return best


def _cases(count, want):
    out, seed = [], 0
    while len(out) < count:
        c = random_cascade(seed, max_depth=2, num_labels=4, segments=1 + seed % 2)
        tunable = [n.name for n in c.nodes if isinstance(n, fc.Stage) and isinstance(n.rule, (fc.Threshold, fc.Confident))]
        if len(tunable) == want:
            out.append((seed, c, tunable))
        seed += 1
    return out


@pytest.mark.parametrize("B", [1, 16, 256])
@pytest.mark.parametrize("case", range(4))
def test_latency_tuning_matches_brute_force_on_a_synthetic_model(case, B):
    seed, c, (name,) = _cases(4, 1)[case]
    x, y = random_input(50, seed), torch.randint(0, c.num_classes, (50,), generator=torch.Generator().manual_seed(seed))
    lat = _synthetic(c, seed)
    r = fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=B)
    best = _brute(c, lat, [name], x, y, B)
    assert r.cost_unit == "seconds per row"
    assert r.metric == pytest.approx(best[0], abs=1e-12) and r.cost == pytest.approx(best[1], rel=1e-9)
    # the tuned cascade, run, costs what the tuner said
    out = r.cascade.predict(x, return_details=True)
    assert _predicted(lat, c, out.exit_stage, B) == pytest.approx(r.cost, rel=1e-9)
    # run over x: its full batches of B rows, then one of the rest
    full, rest = divmod(x.shape[0], B)
    over_x = (full * B * r.cost + (rest * _predicted(lat, c, out.exit_stage, rest) if rest else 0)) / x.shape[0]
    assert lat.seconds_per_row(r.cascade, x, batch_size=B) == pytest.approx(over_x, rel=1e-9)
    assert r.rows_per_s == pytest.approx(1 / r.cost)
    # under a budget: the best within it, like brute force
    costs = sorted({_predicted(lat, c, c.with_setting({name: v}).predict(x, return_details=True).exit_stage, B)
                    for v in _grid(c, name, x)})
    k = len(costs) // 3
    # between two settings' costs: the formula summed in two orders may differ in the last bit
    budget = (costs[k] + costs[k + 1]) / 2 if len(costs) > 1 else costs[0] * (1 + 1e-9)
    rb = fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=B, budget=budget)
    bb = _brute(c, lat, [name], x, y, B, budget)
    assert rb.cost <= budget and rb.metric == pytest.approx(bb[0], abs=1e-12)
    assert rb.cost == pytest.approx(bb[1], rel=1e-9)
    # the frontier is in the same unit, non-dominated, cost ascending
    costs_f, metrics_f = [p[0] for p in r.frontier], [p[1] for p in r.frontier]
    assert costs_f == sorted(costs_f) and metrics_f == sorted(metrics_f)


@pytest.mark.parametrize("case", range(2))
def test_two_rules_end_at_a_coordinate_optimum_of_latency(case):
    seed, c, names = _cases(2, 2)[case]
    x, y = random_input(40, seed), torch.randint(0, c.num_classes, (40,), generator=torch.Generator().manual_seed(seed))
    lat = _synthetic(c, seed + 1)
    r = fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=32)
    for name in names:
        for v in _grid(c, name, x):
            out = c.with_setting({**r.setting, name: v}).predict(x, return_details=True)
            m = classification_report(out.labels, y, c.num_classes).macro_f1
            cost = _predicted(lat, c, out.exit_stage, 32)
            assert not (m > r.metric + 1e-12 or (abs(m - r.metric) <= 1e-12 and cost < r.cost * (1 - 1e-9))), (name, v)


def test_baseline_makes_budget_a_fraction():
    seed, c, _ = _cases(1, 1)[0]
    x, y = random_input(60, seed), torch.randint(0, c.num_classes, (60,), generator=torch.Generator().manual_seed(1))
    flat = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, c.num_classes))
    flops = fc.flops_per_row(flat, x)
    a = fc.tune_cascade(c, x, y, budget=0.9, baseline=flat)
    b = fc.tune_cascade(c, x, y, budget=0.9 * flops)
    assert (a.setting, a.metric, a.cost) == (b.setting, b.metric, b.cost)
    lat = _synthetic(c, 0)
    base = fc.LatencyModel({"model": _timing((1, 64), (1e-5, 4e-4))}, (), (), dict(lat.env), 3)
    a = fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=64, budget=2.0, baseline=base)
    b = fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=64, budget=2.0 * 4e-4 / 64)
    assert (a.setting, a.metric, a.cost) == (b.setting, b.metric, b.cost)
    # a module as the baseline is measured here, in the same conditions
    m = fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=64, budget=1e6, baseline=flat)
    assert m.cost > 0


def test_measure_latency_of_a_cascade_and_a_model():
    torch.set_num_threads(1)
    c = random_cascade(5, max_depth=2, segments=2, num_labels=4)
    c.train()
    x = random_input(40, 5)
    lat = fc.measure_latency(c, x, batch_sizes=(1, 8, 64), repeats=3, warmup=1)
    assert c.training and all(m.training for m in c.modules())  # modes restored
    names, exits = latency_parts(c)
    assert list(lat.parts) == names and lat.exit_parts == exits and lat.nodes == tuple(c.node_names)
    assert all(v.batch_sizes == (1, 8, 64) for v in lat.parts.values())
    assert all(t > 0 for k, v in lat.parts.items() if k != "runner" for t in v.median)
    assert all(t >= 0 for t in lat.parts["runner"].median)  # a residual, never below 0
    assert all(p95 >= med for v in lat.parts.values() for med, p95 in zip(v.median, v.p95))
    assert lat.env["threads"] == 1 and lat.env["device"] == "cpu" and lat.env["torch"] == torch.__version__
    assert "call" in names and all(f"{s}/route" in names for s in c.node_names if isinstance(
        c.nodes[c.node_names.index(s)], fc.Stage))
    # a node that reads the input or is handed trunk features gathers them (paid by the rows reaching it)
    for node in c.nodes[1:]:
        handed = any(node.name in [getattr(k, "name", None) for k in p.kids] and c.plan[p.name].carry[
            [getattr(k, "name", None) for k in p.kids].index(node.name)] for p in c.nodes if isinstance(p, fc.Stage))
        assert (f"{node.name}/gather" in names) == (handed or c.plan[node.name].reads < 0), node.name
    assert lat.seconds_per_row(c, x, batch_size=64) > 0
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    one = fc.measure_latency(model, torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8), batch_sizes=[4, 2],
                             repeats=2)
    assert list(one.parts) == ["model"] and one.batch_sizes == (2, 4) and not one.is_cascade


class _Logged(nn.Module):
    """Records each call (its name and row count) in a shared log."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log, self.lin = name, log, nn.Linear(4, 2)

    def forward(self, x):
        self.log.append((self.name, x.shape[0]))
        return self.lin(x)


def test_measure_latencies_times_every_models_parts_in_the_same_rounds():
    torch.set_num_threads(1)
    log = []
    x = torch.randn(6, 4)
    lats = fc.measure_latencies({"a": _Logged("a", log), "b": _Logged("b", log)}, x, batch_sizes=(2, 1),
                                repeats=3, warmup=0)
    # every round: each size, each model in turn (never all of one model's calls, then the other's); in its turn
    # a model runs twice, the timed call right after its own untimed one, as the second batch of a stream
    assert log == [("a", 1), ("a", 1), ("b", 1), ("b", 1), ("a", 2), ("a", 2), ("b", 2), ("b", 2)] * 3
    assert list(lats) == ["a", "b"] and all(list(v.parts) == ["model"] and v.batch_sizes == (1, 2)
                                            for v in lats.values())
    # a cascade among them gets its parts, as measure_latency gives them
    c = random_cascade(5, max_depth=2, segments=2, num_labels=4)
    xc = random_input(40, 5)
    both = fc.measure_latencies({"flat": nn.Sequential(nn.Flatten(1), nn.LazyLinear(4)), "cascade": c}, xc,
                                batch_sizes=(1, 8), repeats=2, warmup=1)
    assert list(both["cascade"].parts) == latency_parts(c)[0] and both["cascade"].nodes == tuple(c.node_names)
    assert both["flat"].seconds_per_row(None, batch_size=8) > 0 and both["cascade"].seconds_per_row(c, xc, 8) > 0
    with pytest.raises(ValueError, match="models must be a non-empty mapping"):
        fc.measure_latencies({}, x)
    with pytest.raises(TypeError, match=r"models\['b'\] must be a fastcascade.Cascade or an nn.Module"):
        fc.measure_latencies({"a": _Logged("a", log), "b": len}, x)
    with pytest.raises(ValueError, match="models: expected every model on one device"):
        fc.measure_latencies({"a": _Logged("a", log), "m": nn.Linear(4, 2, device="meta")}, x)


def test_a_cascade_s_parts_are_timed_in_the_order_its_predict_calls_them():
    """In a pass over a cascade's parts, each part follows what precedes it in a run (so that the caches hold
    what they hold there): the modules' first calls in Cascade.predict come in the pass's order."""
    from fastcascade.cascade.measure import _call_order

    checked = 0
    for seed in range(12):
        c = random_cascade(seed, max_depth=3, segments=2, num_labels=4).eval()
        names = latency_parts(c)[0]
        order = _call_order(c, names)
        assert sorted(order) == sorted(n for n in names if n != "runner") and order[0] == "call"
        part_of = {c.trunk[s]: s for s in c.segments}
        for node in c.nodes:
            if isinstance(node, fc.Ensemble):
                part_of.update({m: f"{node.name}.{k}" for k, m in enumerate(node.members)})
            else:
                part_of[node.module] = node.name
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o, p=p: seen.append(p) if p not in seen else None)
                 for m, p in part_of.items()]
        try:
            c.predict(random_input(400, seed))
        finally:
            for h in hooks:
                h.remove()
        assert seen == [p for p in order if p in seen], seed
        checked += len(seen) > 3
    assert checked >= 6  # trees with several stages reached, not only roots


def test_the_runner_part_is_what_whole_calls_cost_beyond_the_parts_their_rows_reached():
    from fastcascade.cascade.measure import _residual

    names = ["call", "runner", "a", "b"]
    exits = (("call", "runner", "a"), ("call", "runner", "a", "b"))
    parts = {"call": _timing((4, 8), (1.0, 1.0)), "a": _timing((4, 8), (4.0, 8.0)), "b": _timing((4, 8), (2.0, 3.0))}
    # on 4 rows 1 reached b (exit at node 1); on 8 rows, 6 did: b's time at 1 row is 2/4 (scaled below 4 rows)
    runs = [torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])]
    whole = _timing((4, 8), (1.0 + 4.0 + 0.5 + 10.0, 1.0 + 8.0 + 2.5 + 20.0))
    r = _residual(whole, parts, names, exits, runs, 0, ())
    assert r.median == pytest.approx((10.0, 20.0)) and r.batch_sizes == (4, 8)
    assert _residual(_timing((4, 8), (0.0, 0.0)), parts, names, exits, runs, 0, ()).median == (0.0, 0.0)
    # where the runner pads b's rows (1 bucket per doubling: 6 rows run as 8), b is paid at 8 rows (3.0)
    assert _residual(whole, parts, names, exits, runs, 1, ("b",)).median == pytest.approx((10.0, 19.5))


def test_save_load_round_trip_corruption_and_environment_warning(tmp_path):
    c = random_cascade(2, max_depth=2, segments=1, num_labels=4)
    lat = _synthetic(c, 3)
    path = lat.save(tmp_path / "lat.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = fc.LatencyModel.load(path)
    assert back == lat and back.row_buckets == c.row_buckets == 8 and back.padded == padded_parts(c)
    # a model saved before row buckets: read as measured on exact row counts
    old = {k: v for k, v in lat.to_dict().items() if k not in ("row_buckets", "padded", "alone", "beyond_root")}
    assert fc.LatencyModel.from_dict(old) == fc.LatencyModel(lat.parts, lat.nodes, lat.exit_parts, lat.env, 5)
    x = random_input(30, 2)
    assert back.seconds_per_row(c, x, batch_size=16) == lat.seconds_per_row(c, x, batch_size=16)
    # measured elsewhere: a warning naming what differs
    other = fc.LatencyModel(lat.parts, lat.nodes, lat.exit_parts, {**lat.env, "threads": lat.env["threads"] + 3},
                            lat.repeats)
    other.save(tmp_path / "other.json")
    with pytest.warns(RuntimeWarning, match=r"measured with threads \d+.*here threads \d+"):
        fc.LatencyModel.load(tmp_path / "other.json")
    with pytest.warns(RuntimeWarning, match="device 'cpu'.*here device 'cuda'"):
        fc.LatencyModel.load(path, device="cuda")
    # a damaged file: an error, not a model with wrong times
    text = path.read_text()
    first = next(iter(lat.parts.values())).median[1]
    (tmp_path / "bad.json").write_text(text.replace(repr(first), repr(first * 2), 1))
    with pytest.raises(ValueError, match="does not match the checksum"):
        fc.LatencyModel.load(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not JSON"):
        fc.LatencyModel.load(tmp_path / "cut.json")
    d = json.loads(text)
    d["parts"]["call"]["median_s"] = [-1.0] * 3
    d.pop("checksum")
    with pytest.raises(ValueError, match="times must be finite numbers >= 0"):
        fc.LatencyModel.from_dict(d)
    with pytest.raises(FileNotFoundError):
        fc.LatencyModel.load(tmp_path / "missing.json")


def test_steady_allocator_is_applied_once_where_glibc_is():
    import platform

    first = fc.steady_allocator()
    assert fc.steady_allocator() is first  # idempotent
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True  # mallopt accepted all three settings (it returns 0 for a value it refuses)


def test_bad_arguments():
    c = random_cascade(2, max_depth=2, segments=1, num_labels=4)
    x = random_input(20, 2)
    y = torch.randint(0, c.num_classes, (20,))
    lat = _synthetic(c, 0)
    with pytest.raises(TypeError, match="model must be"):
        fc.measure_latency(lambda v: v, x)
    with pytest.raises(ValueError, match="example must be a tensor of input rows"):
        fc.measure_latency(c, x[:0])
    with pytest.raises(ValueError, match="batch_sizes: each must be >= 1"):
        fc.measure_latency(c, x, batch_sizes=[0, 4])
    with pytest.raises(ValueError, match="batch_sizes must be a non-empty list"):
        fc.measure_latency(c, x, batch_sizes=8)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        fc.measure_latency(c, x, repeats=0)
    with pytest.raises(TypeError, match="latency: cost='latency' needs the cascade's LatencyModel"):
        fc.tune_cascade(c, x, y, cost="latency", run_batch_size=8)
    with pytest.raises(ValueError, match="run_batch_size: cost='latency' needs the batch size"):
        fc.tune_cascade(c, x, y, cost="latency", latency=lat)
    with pytest.raises(ValueError, match="cost must be 'flops' or 'latency'"):
        fc.tune_cascade(c, x, y, cost="time")
    with pytest.raises(ValueError, match="latency applies to cost='latency' only"):
        fc.tune_cascade(c, x, y, latency=lat)
    with pytest.raises(ValueError, match="baseline: it sets the unit of budget"):
        fc.tune_cascade(c, x, y, baseline=nn.Linear(6, 4))
    with pytest.raises(TypeError, match="baseline: with cost='flops', a plain nn.Module"):
        fc.tune_cascade(c, x, y, budget=0.5, baseline=c)
    other = _synthetic(random_cascade(7, max_depth=3, segments=2, num_labels=4), 0)
    with pytest.raises(ValueError, match="latency: the latency model was measured for stages"):
        fc.tune_cascade(c, x, y, cost="latency", latency=other, run_batch_size=8)
    base = fc.LatencyModel({"model": _timing((1, 8), (1e-5, 1e-4))}, (), (), {**lat.env, "threads": 99}, 3)
    with pytest.raises(ValueError, match="baseline: its latency model was measured with"):
        fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=8, budget=0.5, baseline=base)
    with pytest.raises(ValueError, match="budget .* seconds per row: no setting found within it"):
        fc.tune_cascade(c, x, y, cost="latency", latency=lat, run_batch_size=8, budget=1e-12)
    with pytest.raises(ValueError, match="part: unknown part 'nope'"):
        lat.call_seconds("nope", 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        lat.seconds_per_row(c, x, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_latency_on_cuda_uses_events():
    c = random_cascade(5, max_depth=2, segments=2, num_labels=4).cuda()
    lat = fc.measure_latency(c, random_input(40, 5).cuda(), batch_sizes=(1, 64), repeats=3)
    assert lat.env["device"] == "cuda" and all(t > 0 for v in lat.parts.values() for t in v.median)


def test_a_latency_model_prices_the_runners_padding_and_names_a_row_buckets_mismatch():
    c = random_cascade(2, max_depth=2, segments=1, num_labels=4)
    x = random_input(300, 2)
    lat = _synthetic(c, 3)
    assert lat.padded and set(lat.padded) <= set(lat.parts) and not any(p.endswith("/route") for p in lat.padded)
    exact = fc.LatencyModel(lat.parts, lat.nodes, lat.exit_parts, lat.env, 5)  # the same times, no padding
    c0 = c.with_setting({})
    c0.row_buckets = 0
    assert lat.seconds_per_row(c, x, batch_size=256) > exact.seconds_per_row(c0, x, batch_size=256)
    with pytest.raises(ValueError, match="measured with row_buckets=8, the cascade has row_buckets=0"):
        lat.seconds_per_row(c0, x, batch_size=256)
    with pytest.raises(ValueError, match="row_buckets must be an int >= 0"):
        fc.LatencyModel.from_dict({**lat.to_dict(), "row_buckets": -2})


def test_the_roots_parts_cost_their_alone_times_when_batches_stop_at_the_root():
    """D = 1 - (1 - q)^B: a batch goes beyond the root (q: the rows' fraction that does). Every row exiting at
    the root: the root's parts at their alone times, no runner; every row beyond it: the whole pass's times."""
    c = random_cascade(2, max_depth=2, segments=1, num_labels=4)
    lat = _synthetic(c, 3)
    root = [p for p in lat.exit_parts[0] if p != "runner"]
    assert sorted(lat.alone) == sorted(root) and lat.beyond_root == beyond_root(c) and lat.beyond_root
    B = 32
    at_root = torch.zeros(len(lat.nodes), dtype=torch.float64)
    at_root[0] = 1
    want = sum(float(lat.alone[p].seconds(torch.tensor(32.0))) for p in root) / B
    assert float(lat.seconds_from_exits(at_root, B)) == pytest.approx(want, rel=1e-12)
    deep = max(range(1, len(lat.nodes)), key=lambda k: len(lat.exit_parts[k]))
    beyond = torch.zeros(len(lat.nodes), dtype=torch.float64)
    beyond[deep] = 1
    padded = 32.0 * (1 + math.log(2) / 16)  # the runner's mean padding of a node's 32 rows below the root
    full = sum(float(lat.parts[p].seconds(torch.tensor(padded if p in lat.padded else 32.0)))
               for p in lat.exit_parts[deep]) / B
    assert float(lat.seconds_from_exits(beyond, B)) == pytest.approx(full, rel=1e-12)
    # a measured cascade: its root's parts timed alone too, the others not
    m = fc.measure_latency(c, random_input(40, 2), batch_sizes=(1, 8), repeats=2, warmup=1)
    assert sorted(m.alone) == sorted(root) and m.beyond_root == beyond_root(c)
    assert all(t > 0 for v in m.alone.values() for t in v.median)
    with pytest.raises(ValueError, match="alone and beyond_root must name parts the model holds"):
        fc.LatencyModel.from_dict({**lat.to_dict(), "beyond_root": ["nope/route"]})
