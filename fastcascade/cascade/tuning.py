"""Operating points chosen end to end: tune_cascade searches the thresholds / taus of a cascade's
Threshold and Confident rules for the best *final* metric, optionally under a compute budget.

    result = fc.tune_cascade(cascade, val_x, val_labels, objective="macro_f1", budget=0.6 * flat_flops)
    result.setting        # {"stage1": 0.62}: stage name -> threshold (Threshold) or tau (Confident)
    result.metric, result.cost                 # on (val_x, val_labels); cost: mean FLOPs per row
    result.frontier       # [(cost, metric, setting), ...] the non-dominated settings, cost ascending
    result.cascade        # the cascade with the setting applied (same modules)

Every stage's outputs are computed once (the dense pass: every segment and head on every row); a
setting's final labels and costs then follow from the decisions alone. For one rule, every cut between
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

from .. import routing
from ..reference import logit_threshold
from .cost import cascade_cost, eval_mode
from .dense import dense_outputs
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
            xb = xb.to(device)
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
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
    def __init__(self, cascade, outs: dict, y: torch.Tensor, entry: dict[str, int], score):
        self.cascade, self.y, self.entry, self.score = cascade, y, entry, score
        self.C, self.N = cascade.num_classes, y.shape[0]
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

    def outcome(self, node, dec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final label, FLOPs from entering node on) of every row, were it routed to node."""
        if isinstance(node, Leaf):
            return (torch.full((self.N,), node.label, dtype=torch.int64, device=self.y.device),
                    torch.zeros(self.N, dtype=torch.int64, device=self.y.device))
        own = self.entry[node.name]
        if isinstance(node, Ensemble):
            return dec[node.name], torch.full((self.N,), own, dtype=torch.int64, device=self.y.device)
        lab, cost = self.children(node, dec)
        b = dec[node.name][None]
        return lab.gather(0, b)[0], own + cost.gather(0, b)[0]

    def children(self, node, dec):
        kids = [self.outcome(c, dec) for c in node.kids]
        return torch.stack([k[0] for k in kids]), torch.stack([k[1] for k in kids])

    def reach(self, name: str, dec: dict) -> torch.Tensor:
        mask = torch.ones(self.N, dtype=torch.bool, device=self.y.device)
        path = self.cascade.path(name)
        for parent, child in zip(path, path[1:]):
            node = self.cascade.nodes[self.cascade.node_names.index(parent)]
            b = [k for k, c in enumerate(node.kids) if getattr(c, "name", None) == child][0]
            mask &= dec[parent] == b
        return mask

    def evaluate(self, setting: dict) -> tuple[float, float]:
        lab, cost = self.outcome(self.cascade.root, self.decisions(setting))
        cm = torch.bincount(self.y * self.C + lab, minlength=self.C * self.C).reshape(1, self.C, self.C)
        return float(self.score(cm)[0]), int(cost.sum()) / self.N

    def sweep(self, name: str, setting: dict) -> tuple[list[float], torch.Tensor, torch.Tensor]:
        """(candidate values, metrics (M,), mean costs (M,)) of stage name's rule, the others at setting."""
        node = self.cascade.nodes[self.cascade.node_names.index(name)]
        dec = self.decisions(setting)
        final_lab, final_cost = self.outcome(self.cascade.root, dec)
        here = self.reach(name, dec)
        base = final_cost - self.outcome(node, dec)[1]  # what the rows paid above node
        lab, cost = self.children(node, dec)
        cost = cost + self.entry[name] + base
        if isinstance(node.rule, Threshold):  # the first z rows by logit take branch 0, the rest branch 1
            first, rest = 0, 1
            pick = lambda t, k: t[k]  # noqa: E731
        else:  # the first z rows by softmax sum exit at their argmax, the rest continue
            first, rest = None, len(node.kids) - 1
            pick = lambda t, k: t.gather(0, self.argmax[name][None])[0] if k is None else t[k]  # noqa: E731
        key, order = self.keys[name][here].sort(stable=True)
        values, z = self._candidates(node, key)
        rows = here.nonzero()[:, 0][order]
        cc = self.C * self.C
        pair = lambda k: self.y[rows] * self.C + pick(lab, k)[rows]  # noqa: E731
        onehot = lambda p: torch.nn.functional.one_hot(p, cc)  # noqa: E731
        pre_f = torch.cat([torch.zeros(1, cc, dtype=torch.int64, device=key.device), onehot(pair(first)).cumsum(0)])
        pre_r = torch.cat([torch.zeros(1, cc, dtype=torch.int64, device=key.device), onehot(pair(rest)).cumsum(0)])
        out = ~here
        fixed = torch.bincount(self.y[out] * self.C + final_lab[out], minlength=cc)
        cm = fixed + pre_f[z] + (pre_r[-1] - pre_r[z])
        zero = torch.zeros(1, dtype=torch.int64, device=key.device)
        cf = torch.cat([zero, pick(cost, first)[rows].cumsum(0)])
        cr = torch.cat([zero, pick(cost, rest)[rows].cumsum(0)])
        costs = (int(final_cost[out].sum()) + cf[z] + (cr[-1] - cr[z])).to(torch.float64) / self.N
        return values, self.score(cm.reshape(-1, self.C, self.C)), costs

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


def tune_cascade(cascade, x, labels: torch.Tensor | None = None, objective: str | Callable = "macro_f1",
                 budget: float | None = None, params: Sequence[str] | None = None, *, batch_size: int = 4096,
                 max_rounds: int = 20) -> TuneResult:
    """The operating point of `cascade` that maximises the final metric on (x, labels).

    Args:
        cascade: a fastcascade.Cascade (run in eval mode here, its modes restored).
        x: its inputs (N, ...) with labels the final class ids (N,), or a DataLoader of (x, label)
            batches (labels None).
        objective: "macro_f1" (as fastcascade.metrics.ClassificationReport computes it), "accuracy", or a
            callable mapping (M, C, C) int64 confusion matrices (rows: truth) to M scores.
        budget: the most mean FLOPs per row allowed (fastcascade.cascade_cost), or None.
        params: the stages to tune (default: every Threshold and Confident rule); the others keep theirs.
        batch_size: rows per dense pass; max_rounds: bound on coordinate-ascent rounds.
    Returns a TuneResult. Raises ValueError when no setting found meets the budget.
    """
    score = _objective(objective)
    if budget is not None and not (isinstance(budget, (int, float)) and budget >= 0):
        raise ValueError(f"budget must be a number of FLOPs per row >= 0 or None, got {budget!r}")
    names = _tunable(cascade, params)
    outs, y, example = _collect(cascade, x, labels, batch_size)
    sim = _Simulation(cascade, outs, y, cascade_cost(cascade, example).entry, score)
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
        raise ValueError(f"budget {budget}: no setting found within it; the cheapest one scored costs {cheapest:.6g} "
                         f"FLOPs per row")
    return TuneResult(setting=dict(setting), metric=m, cost=c, frontier=_frontier(points),
                      cascade=cascade.with_setting(setting))
