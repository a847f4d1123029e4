"""Operating points chosen end to end: tune_cascade searches the thresholds / taus of a cascade's
Threshold and Confident rules for the best *final* metric, optionally under a compute or time budget.

    result = fc.tune_cascade(cascade, val_x, val_labels, objective="macro_f1", budget=0.6 * flat_flops)
    lat = fc.measure_latency(cascade, val_x[:512])           # or: in seconds, on a measured latency model
    result = fc.tune_cascade(cascade, val_x, val_labels, cost="latency", latency=lat, run_batch_size=512,
                             budget=0.5, baseline=flat)      # at most half the flat model's time per row
    result.setting        # {"stage1": 0.62}: stage name -> threshold (Threshold) or tau (Confident)
    result.metric, result.cost                 # on (val_x, val_labels); cost: mean FLOPs or seconds per row
    result.frontier       # [(cost, metric, setting), ...] the non-dominated settings, cost ascending
    result.cascade        # the cascade with the setting applied (same modules)

Every stage's outputs are computed once (the dense pass: every segment and head on every row); a
setting's final labels and exit stages then follow from the decisions alone, and its cost from how many
rows exit at each node (FLOPs: each exit's path FLOPs; latency: fastcascade.LatencyModel.seconds_from_exits). For one rule, every cut between
two distinct scores of the rows that reach it is a candidate, all scored at once: rows sorted by score,
the confusion matrices and costs of all candidates are prefix sums. Several rules: coordinate ascent,
each rule swept that way with the others fixed, from the combination of their one-at-a-time optima,
rules in tree order, until a round changes nothing (deterministic). Ties in the metric (within 1e-12)
go to the lower cost, then to the candidate found first.

Candidate cuts lie halfway between neighbouring scores, never on a row's own score: the cascade's
backends compute a Confident rule's softmax sum with exp functions that can differ in the last bit,
and a sub-batch's logits can differ from the dense pass's in the last bit, so a cut on a score could
route that row differently at run time. Temperatures stay as set (fit them first, e.g. with
fastcascade.fit_temperature): for a Threshold rule the temperature and the threshold are one cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import routing
from .._checks import model_input
from ..reference import logit_threshold
from .cost import cascade_cost, eval_mode, flops_per_row
from .dense import dense_outputs
from .latency import LatencyModel
from .measure import measure_latency
from .tree import Confident, Ensemble, Leaf, Stage, Threshold

__all__ = ["TuneResult", "tune_cascade"]

_TIE = 1e-12  # metrics closer than this are ties (the same counts summed in another order)


@dataclass(frozen=True)
class TuneResult:
    """tune_cascade's result: the chosen setting (stage name -> threshold or tau), its metric and cost
    (mean FLOPs per row) on the tuning data, the frontier of non-dominated (cost, metric, setting)
    points among all settings scored (cost ascending) and the cascade with the setting applied."""

    setting: dict[str, float]
    metric: float
    cost: float
    frontier: list[tuple[float, float, dict[str, float]]]
    cascade: object
    cost_unit: str = "FLOPs per row"  # or "seconds per row" (cost="latency")

    @property
    def rows_per_s(self) -> float:
        """Predicted rows per second at the chosen setting (cost="latency" only)."""
        if self.cost_unit != "seconds per row":
            raise ValueError("rows_per_s: the cascade was tuned on FLOPs; tune with cost='latency' for a time")
        return 1.0 / self.cost if self.cost > 0 else math.inf


# ---------------------------------------------------------------------------------------------
# objectives: (M, C, C) confusion matrices (rows = truth) -> (M,) scores


def macro_f1_of(cm: torch.Tensor) -> torch.Tensor:
    """Macro F1 of each (C, C) matrix, as fastcascade.metrics.ClassificationReport computes it: F1 per
    class 2 tp / (support + predicted), averaged over the classes present in truth or prediction."""
    cm = cm.to(torch.float64)
    tp = cm.diagonal(dim1=1, dim2=2)
    den = cm.sum(2) + cm.sum(1)
    f1 = torch.where(den > 0, 2 * tp / den.clamp(min=1), torch.zeros_like(tp))
    present = (den > 0).sum(1)
    return torch.where(present > 0, f1.sum(1) / present.clamp(min=1), torch.zeros_like(f1[:, 0]))


def accuracy_of(cm: torch.Tensor) -> torch.Tensor:
    total = cm.sum((1, 2)).to(torch.float64)
    return torch.where(total > 0, cm.diagonal(dim1=1, dim2=2).sum(1) / total.clamp(min=1), torch.zeros_like(total))


_OBJECTIVES = {"macro_f1": macro_f1_of, "accuracy": accuracy_of}


def _objective(objective) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(objective):
        def scored(cm):
            s = torch.as_tensor(objective(cm), dtype=torch.float64)
            if s.shape != (cm.shape[0],):
                raise ValueError(f"objective: a callable gets (M, C, C) confusion matrices (rows: truth) and must "
                                 f"return M scores, got shape {tuple(s.shape)} for M = {cm.shape[0]}")
            return s.to(cm.device)
        return scored
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(_OBJECTIVES)} or a callable, got {objective!r}")
    return _OBJECTIVES[objective]


# ---------------------------------------------------------------------------------------------
# the data: every stage's outputs on every row, once


@torch.no_grad()
def _collect(cascade, x, labels, batch_size: int):
    """({stage: (N, C) logits, ensemble: (K, N, C)}, labels (N,), one input row) over x (a tensor, with
    labels) or a DataLoader of (x, label) batches (labels None)."""
    if isinstance(x, torch.Tensor):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor of final class ids when x is a tensor, got "
                            f"{type(labels).__name__}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be (N,) = ({x.shape[0]},), got {tuple(labels.shape)}")
        batches = [(x[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    elif isinstance(x, torch.utils.data.DataLoader):
        if labels is not None:
            raise ValueError("labels must be None when x is a DataLoader of (x, label) batches")
        batches = x
    else:
        raise TypeError(f"x must be a tensor or a DataLoader of (x, label) batches, got {type(x).__name__}")
    p = next(cascade.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    outs, ys, example = {}, [], None
    with eval_mode(cascade):
        for xb, yb in batches:
            xb = model_input(xb.to(device))
            example = xb[:1] if example is None else example
            for name, o in dense_outputs(cascade, xb).items():
                outs.setdefault(name, []).append(o)
            ys.append(torch.as_tensor(yb).to(device, torch.int64))
    if example is None or example.shape[0] == 0:
        raise ValueError("x holds no rows to tune on")
    y = torch.cat(ys)
    if y.min() < 0 or y.max() >= cascade.num_classes:
        raise ValueError(f"labels must be final class ids in [0, {cascade.num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    dims = {n.name: 1 if isinstance(n, Ensemble) else 0 for n in cascade.nodes}
    return {k: torch.cat(v, dims[k]) for k, v in outs.items()}, y, example


# ---------------------------------------------------------------------------------------------
# the simulation: final labels and costs of a setting from the decisions


class _Simulation:
    """Final labels and exit nodes of every row under a setting, from the dense pass's outputs; a setting's
    cost is cost_fn of its exit histogram (rows exiting at each node), (M, nodes) int64 -> (M,) float64."""

    def __init__(self, cascade, outs: dict, y: torch.Tensor, cost_fn, score):
        self.cascade, self.y, self.cost_fn, self.score = cascade, y, cost_fn, score
        self.C, self.N, self.K = cascade.num_classes, y.shape[0], len(cascade.node_names)
        self.ids = {name: i for i, name in enumerate(cascade.node_names)}
        self.fixed, self.keys, self.argmax, self.defaults = {}, {}, {}, {}
        for node in cascade.nodes:
            o, name = outs[node.name], node.name
            if isinstance(node, Ensemble):
                self.fixed[name] = node.label_table.to(y.device)[routing.vote(o, node.mode, backend=cascade.backend)]
            elif isinstance(node.rule, Threshold):
                self.keys[name] = o.reshape(-1).to(torch.float64)
                self.defaults[name] = node.rule.threshold
            elif isinstance(node.rule, Confident):
                self.defaults[name] = node.rule.tau
                # the softmax sum of route_confident (fastcascade.reference): exit where it is <= 1 / tau
                d = (o.to(torch.float64) - o.to(torch.float64).amax(1, keepdim=True)) / node.rule.temperature
                s = torch.zeros(self.N, dtype=torch.float64, device=y.device)
                for c in range(o.shape[1]):
                    s = s + torch.exp(d[:, c])
                self.keys[name] = s
                self.argmax[name] = routing.route_argmax(o, backend=cascade.backend).to(torch.int64)
            else:
                self.fixed[name] = node.rule.decide(o, cascade.backend).to(torch.int64)
            if name in self.keys and not bool(torch.isfinite(o).all()):
                raise ValueError(f"stage {name!r}: its logits hold NaN or inf; tune_cascade needs finite logits")

    def decisions(self, setting: dict) -> dict[str, torch.Tensor]:
        setting, dec = {**self.defaults, **setting}, {}
        for node in self.cascade.nodes:
            name = node.name
            if name in self.fixed:
                dec[name] = self.fixed[name]
            elif isinstance(node.rule, Threshold):
                cut = logit_threshold(setting[name], node.rule.temperature)
                dec[name] = (self.keys[name] > cut).to(torch.int64)
            else:
                tau = setting[name]
                exit_ = self.keys[name] <= (math.inf if tau <= 0 else 1.0 / tau)
                dec[name] = torch.where(exit_, self.argmax[name], torch.full_like(self.argmax[name], len(node.kids) - 1))
        return dec

    def _full(self, value: int) -> torch.Tensor:
        return torch.full((self.N,), value, dtype=torch.int64, device=self.y.device)

    def outcome(self, node, dec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final label, exit node id) of every row, were it routed to node (a Stage or an Ensemble)."""
        if isinstance(node, Ensemble):
            return dec[node.name], self._full(self.ids[node.name])
        lab, ex = self.children(node, dec)
        b = dec[node.name][None]
        return lab.gather(0, b)[0], ex.gather(0, b)[0]

    def children(self, node, dec):
        """(branches, N) final labels and exit node ids of every row, were it sent down each branch."""
        kids = [(self._full(c.label), self._full(self.ids[node.name])) if isinstance(c, Leaf) else self.outcome(c, dec)
                for c in node.kids]
        return torch.stack([k[0] for k in kids]), torch.stack([k[1] for k in kids])

    def reach(self, name: str, dec: dict) -> torch.Tensor:
        mask = torch.ones(self.N, dtype=torch.bool, device=self.y.device)
        path = self.cascade.path(name)
        for parent, child in zip(path, path[1:]):
            node = self.cascade.nodes[self.ids[parent]]
            b = [k for k, c in enumerate(node.kids) if getattr(c, "name", None) == child][0]
            mask &= dec[parent] == b
        return mask

    def evaluate(self, setting: dict) -> tuple[float, float]:
        lab, ex = self.outcome(self.cascade.root, self.decisions(setting))
        cm = torch.bincount(self.y * self.C + lab, minlength=self.C * self.C).reshape(1, self.C, self.C)
        return float(self.score(cm)[0]), float(self.cost_fn(torch.bincount(ex, minlength=self.K)[None])[0])

    def sweep(self, name: str, setting: dict) -> tuple[list[float], torch.Tensor, torch.Tensor]:
        """(candidate values, metrics (M,), costs (M,)) of stage name's rule, the others at setting."""
        node = self.cascade.nodes[self.ids[name]]
        dec = self.decisions(setting)
        final_lab, final_exit = self.outcome(self.cascade.root, dec)
        here = self.reach(name, dec)
        lab, ex = self.children(node, dec)
        if isinstance(node.rule, Threshold):  # the first z rows by logit take branch 0, the rest branch 1
            first, rest = 0, 1
            pick = lambda t, k: t[k]
        else:  # the first z rows by softmax sum exit at their argmax, the rest continue
            first, rest = None, len(node.kids) - 1
            pick = lambda t, k: t.gather(0, self.argmax[name][None])[0] if k is None else t[k]
        key, order = self.keys[name][here].sort(stable=True)
        values, z = self._candidates(node, key)
        rows = here.nonzero()[:, 0][order]
        out = ~here

        def split(codes: torch.Tensor, fixed: torch.Tensor, width: int) -> torch.Tensor:
            """Per candidate, the histogram of codes (rows x 2 branches) over `width` bins: rows that do not
            reach the stage (fixed), the first z sorted rows on the first branch, the others on the rest."""
            zero = torch.zeros(1, width, dtype=torch.int64, device=key.device)
            pre_f = torch.cat([zero, torch.nn.functional.one_hot(pick(codes, first)[rows], width).cumsum(0)])
            pre_r = torch.cat([zero, torch.nn.functional.one_hot(pick(codes, rest)[rows], width).cumsum(0)])
            return fixed + pre_f[z] + (pre_r[-1] - pre_r[z])

        cc = self.C * self.C
        cm = split(self.y[None] * self.C + lab, torch.bincount(self.y[out] * self.C + final_lab[out], minlength=cc), cc)
        exits = split(ex, torch.bincount(final_exit[out], minlength=self.K), self.K)
        return values, self.score(cm.reshape(-1, self.C, self.C)), self.cost_fn(exits)

    def _candidates(self, node, key: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """Cuts halfway between neighbouring distinct scores (and both ends), as rule values, with z: how
        many of the sorted rows fall on the first side of each."""
        u = torch.unique(key)
        mid = ((u[1:] + u[:-1]) / 2).tolist()
        if isinstance(node.rule, Threshold):
            t = node.rule.temperature
            values = [0.0] + [1.0 / (1.0 + math.exp(-m / t)) if m / t > -700 else 0.0 for m in mid] + [1.0]
            cuts = [logit_threshold(v, t) for v in values]
        else:
            values = [0.0] + [1.0 / m for m in mid] + [1.0]
            cuts = [math.inf if v <= 0 else 1.0 / v for v in values]
        z = torch.searchsorted(key, torch.tensor(cuts, dtype=torch.float64, device=key.device), right=True)
        return values, z


# ---------------------------------------------------------------------------------------------
# the search


def _better(m: float, c: float, best_m: float, best_c: float) -> bool:
    return m > best_m + _TIE or (abs(m - best_m) <= _TIE and c < best_c)


def _best(values, metrics, costs, budget) -> int | None:
    """Index of the best candidate within the budget (None if none is)."""
    ok = torch.ones_like(costs, dtype=torch.bool) if budget is None else costs <= budget
    if not bool(ok.any()):
        return None
    m = torch.where(ok, metrics, torch.full_like(metrics, -math.inf))
    top = m.max()
    tied = ok & (m >= top - _TIE)
    c = torch.where(tied, costs, torch.full_like(costs, math.inf))
    return int(torch.nonzero(c == c.min())[0, 0])


def _tunable(cascade, params) -> list[str]:
    names = [n.name for n in cascade.nodes if isinstance(n, Stage) and isinstance(n.rule, (Threshold, Confident))]
    if params is None:
        if not names:
            raise ValueError("the cascade has no Threshold or Confident rule to tune")
        return names
    if isinstance(params, str) or not isinstance(params, Sequence) or not params:
        raise TypeError(f"params must be a non-empty list of stage names or None, got {params!r}")
    for p in params:
        if p not in cascade.node_names:
            raise ValueError(f"params: unknown stage {p!r}; stages: {cascade.node_names}")
        if p not in names:
            node = cascade.nodes[cascade.node_names.index(p)]
            kind = "an ensemble" if isinstance(node, Ensemble) else f"an {type(node.rule).__name__} rule"
            raise ValueError(f"params: stage {p!r} has {kind}, which has no threshold or tau to tune")
    return [n for n in names if n in params]  # tree order


def _frontier(points: dict) -> list[tuple[float, float, dict[str, float]]]:
    ranked = sorted(points.items(), key=lambda kv: (kv[1][1], -kv[1][0]))
    out, best = [], -math.inf
    for setting, (metric, cost) in ranked:
        if metric > best + _TIE:
            out.append((cost, metric, dict(setting)))
            best = metric
    return out


def _cost_model(cascade, example, cost: str, latency, run_batch_size, budget, baseline):
    """(cost_fn: exit histograms (M, nodes) -> (M,) costs, the budget in those units, the unit's name)."""
    if cost == "flops":
        for arg, v in (("latency", latency), ("run_batch_size", run_batch_size)):
            if v is not None:
                raise ValueError(f"{arg} applies to cost='latency' only, got {arg}={v!r} with cost='flops'")
        path = torch.tensor(cascade_cost(cascade, example).path_flops, dtype=torch.int64)
        n_of = lambda h: h.sum(-1).clamp(min=1).to(torch.float64)
        fn = lambda h: (h.cpu() * path).sum(-1).to(torch.float64) / n_of(h.cpu())
        base = None if baseline is None else _baseline_flops(baseline, example)
        return fn, budget if base is None else budget * base, "FLOPs per row"
    if cost != "latency":
        raise ValueError(f"cost must be 'flops' or 'latency', got {cost!r}")
    if not isinstance(latency, LatencyModel):
        raise TypeError(f"latency: cost='latency' needs the cascade's LatencyModel (fastcascade.measure_latency), "
                        f"got {type(latency).__name__}")
    latency.check(cascade)
    if isinstance(run_batch_size, bool) or not isinstance(run_batch_size, int) or run_batch_size < 1:
        raise ValueError(f"run_batch_size: cost='latency' needs the batch size the cascade will run at (an int "
                         f">= 1), got {run_batch_size!r}")
    fn = lambda h: latency.seconds_from_exits(h.cpu(), run_batch_size)
    base = None if baseline is None else _baseline_seconds(baseline, example, latency, run_batch_size)
    return fn, budget if base is None else budget * base, "seconds per row"


def _baseline_flops(baseline, example) -> float:
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool) and baseline > 0:
        return float(baseline)
    if isinstance(baseline, nn.Module) and not hasattr(baseline, "node_names"):
        return float(flops_per_row(baseline, example))
    raise TypeError(f"baseline: with cost='flops', a plain nn.Module (its FLOPs per row are the unit of budget) or "
                    f"a number of FLOPs per row > 0, got {type(baseline).__name__}")


def _baseline_seconds(baseline, example, latency: LatencyModel, run_batch_size: int) -> float:
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool) and baseline > 0:
        return float(baseline)
    if isinstance(baseline, nn.Module) and not hasattr(baseline, "node_names"):
        baseline = measure_latency(baseline, example, batch_sizes=[run_batch_size], repeats=latency.repeats)
    if not isinstance(baseline, LatencyModel) or baseline.is_cascade:
        raise TypeError(f"baseline: with cost='latency', a plain nn.Module (measured here), its LatencyModel or "
                        f"a number of seconds per row > 0, got {type(baseline).__name__}")
    differ = {k: (baseline.env.get(k), v) for k, v in latency.env.items() if baseline.env.get(k) != v}
    if differ:
        raise ValueError(f"baseline: its latency model was measured with {differ} (baseline, cascade) unlike the "
                         f"cascade's; times measured in different conditions do not compare")
    return baseline.seconds_per_row(None, batch_size=run_batch_size)


def tune_cascade(cascade, x, labels: torch.Tensor | None = None, objective: str | Callable = "macro_f1",
                 budget: float | None = None, params: Sequence[str] | None = None, *, cost: str = "flops",
                 latency: LatencyModel | None = None, run_batch_size: int | None = None, baseline=None,
                 batch_size: int = 4096, max_rounds: int = 20) -> TuneResult:
    """The operating point of `cascade` that maximises the final metric on (x, labels).

    Args:
        cascade: a fastcascade.Cascade (run in eval mode here, its modes restored).
        x: its inputs (N, ...) with labels the final class ids (N,), or a DataLoader of (x, label)
            batches (labels None).
        objective: "macro_f1" (as fastcascade.metrics.ClassificationReport computes it), "accuracy", or a
            callable mapping (M, C, C) int64 confusion matrices (rows: truth) to M scores.
        budget: the most cost allowed, in the cost's unit or, with baseline, as a fraction of the baseline's;
            None: no limit (the best metric, ties to the lower cost).
        params: the stages to tune (default: every Threshold and Confident rule); the others keep theirs.
        cost: "flops", the mean FLOPs per row (fastcascade.cascade_cost), or "latency", the seconds per row
            that `latency` predicts at run_batch_size (fastcascade.LatencyModel; rows/s = 1 / cost).
        latency: the cascade's LatencyModel (fastcascade.measure_latency), with cost="latency".
        run_batch_size: the batch size the cascade will run at, with cost="latency".
        baseline: makes budget a fraction of a model's cost: a plain nn.Module (its FLOPs per row; with
            cost="latency" its time, measured here at run_batch_size), its LatencyModel, or a number.
        batch_size: rows per dense pass; max_rounds: bound on coordinate-ascent rounds.
    Returns a TuneResult. Raises ValueError when no setting found meets the budget.
    """
    score = _objective(objective)
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget >= 0):
        raise ValueError(f"budget must be a number >= 0 (a cost per row, or with baseline a fraction of the "
                         f"baseline's) or None, got {budget!r}")
    if baseline is not None and budget is None:
        raise ValueError("baseline: it sets the unit of budget, so it needs a budget (a fraction, e.g. 0.5)")
    names = _tunable(cascade, params)
    if cost == "latency" and isinstance(latency, LatencyModel):
        latency.check(cascade)  # before the dense pass: a wrong model fails fast
    outs, y, example = _collect(cascade, x, labels, batch_size)
    cost_fn, budget, unit = _cost_model(cascade, example, cost, latency, run_batch_size, budget, baseline)
    sim = _Simulation(cascade, outs, y, cost_fn, score)
    rules = {n.name: n.rule for n in cascade.nodes if isinstance(n, Stage)}
    current = {n: float(rules[n].threshold if isinstance(rules[n], Threshold) else rules[n].tau) for n in names}
    points: dict[tuple, tuple[float, float]] = {}

    def sweep(name, setting):
        values, metrics, costs = sim.sweep(name, setting)
        for v, m, c in zip(values, metrics.tolist(), costs.tolist()):
            points.setdefault(tuple(sorted({**setting, name: v}.items())), (m, c))
        return values, metrics, costs

    def step(name, setting):
        values, metrics, costs = sweep(name, setting)
        i = _best(values, metrics, costs, budget)
        i = int(costs.argmin()) if i is None else i  # nothing within the budget: towards it
        return values[i]

    setting = {n: step(n, current) for n in names}  # each rule's optimum with the others as they were
    m, c = sim.evaluate(setting)
    points.setdefault(tuple(sorted(setting.items())), (m, c))
    for _ in range(max_rounds if len(names) > 1 else 0):
        moved = False
        for name in names:
            trial = {**setting, name: step(name, setting)}
            tm, tc = sim.evaluate(trial)
            feasible, was = budget is None or tc <= budget, budget is None or c <= budget
            if (feasible and (not was or _better(tm, tc, m, c))) or (not feasible and not was and tc < c):
                setting, m, c, moved = trial, tm, tc, True
        if not moved:
            break
    if budget is not None and c > budget:
        cheapest = min(cost for _, cost in points.values())
        raise ValueError(f"budget {budget:.6g} {unit}: no setting found within it; the cheapest one scored costs "
                         f"{cheapest:.6g} {unit}")
    return TuneResult(setting=dict(setting), metric=m, cost=c, frontier=_frontier(points),
                      cascade=cascade.with_setting(setting), cost_unit=unit)
