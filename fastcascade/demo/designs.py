"""The designs the demo compares, each tuned on val both ways (FLOPs and measured latency) and run on test.

* flat: the 8-class model (its backbone is the shared trunk of the trunk designs);
* v6-trunk: the seed's v6 hierarchy (Stage 1 -> Stage 2 -> RECT / AB ensemble) with heads on the trunk,
  Stage 1 after the first segment, the others after the last;
* v6-own: the same hierarchy with its own backbones (one per stage, three for AB);
* gate: Stage 1 (the v6-trunk head) as a gate in front of the flat model: NONE exits after the first
  segment, every other row runs the rest of the trunk and the flat model's head;
* exits: 8-class exits after the first and the second segment (exit when confident), then the flat head;
* raw<w>: a w-channel CNN on the raw block (fastcascade.demo.gate.RawGate) as a gate in front of the whole
  flat model: cheap in time, not only in FLOPs (the flat model's full-resolution stem, which the trunk
  designs always pay, is what an early exit must skip on a CPU);
* raw<w>-v6: that gate in front of the v6-trunk hierarchy.

Operating points. Each cascade is tuned on val twice with fastcascade.tune_cascade, for the best val macro F1
within BUDGET of the flat model's cost: on FLOPs per block (BUDGET x the flat model's FLOPs), and on the seconds
per block its latency model (fastcascade.measure_latency, measured in the same run) predicts at RUN_BATCH rows
per batch (BUDGET x the flat model's predicted time). BUDGET = 1 / (1.5 x 1.15): the target's throughput ratio,
with the latency model's tolerance as the margin. Where no setting is that cheap, the best point.
Temperatures are fitted on val first (fastcascade.fit_temperature).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..cascade import (
    Argmax,
    Cascade,
    Confident,
    Leaf,
    Stage,
    Threshold,
    cascade_dense,
    flops_per_row,
    tune_cascade,
)
from ..data import av1_partition_cascade
from ..data.labels import NONE
from ..metrics import classification_report
from ..train import evaluate
from .context import LABEL_NAMES, NUM_LABELS, Run, blocks_of, labels_of
from .heads import TrunkHeads
from .hierarchy import OwnHierarchy
from .report import TARGET
from .stage1 import stage1_calibration
from .timing import RUN_BATCH, latency_models, timed_batch_sizes, timed_in_turns

__all__ = ["DESCRIPTIONS", "WAYS", "Design", "build_designs", "measure", "v6_trunk_cascade"]

DESCRIPTIONS = {
    "flat": "the flat 8-class model (its backbone is the shared trunk)",
    "v6-trunk": "v6 hierarchy, heads on the shared trunk (Stage 1 after the first segment)",
    "v6-own": "v6 hierarchy, its own backbones (today's design)",
    "gate": "Stage 1 (trunk head) as a gate in front of the flat model",
    "exits": "8-class exits after the first and second segments, then the flat head",
    "raw": "a {w}-channel CNN on the raw block as a gate in front of the flat model",
    "raw-v6": "a {w}-channel CNN on the raw block as a gate in front of the v6-trunk hierarchy",
}
WAYS = ("flops", "latency")  # what a cascade is tuned on
# the budget each cascade is tuned under, a fraction of the flat model's cost: its FLOPs, or its time predicted by
# its latency model; the target's throughput ratio with the latency model's tolerance as the margin
BUDGET = 1 / (TARGET["throughput_ratio"] * (1 + TARGET["prediction_error"]))


def describe(name: str) -> str:
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    w = "".join(ch for ch in name.split("-")[0] if ch.isdigit())
    return DESCRIPTIONS["raw-v6" if name.endswith("-v6") else "raw"].format(w=w)


@dataclass
class Design:
    name: str
    model: nn.Module  # a Cascade, or the flat model
    tuned: object = None  # the TuneResult on val
    chosen: dict = field(default_factory=dict)  # the operating point taken (stage -> threshold / tau)


def v6_trunk_cascade(th: TrunkHeads, trunk: nn.ModuleDict, stage1: nn.Module | None = None,
                     temperature: float = 1.0) -> Cascade:
    """The v6 hierarchy on the trunk's heads (its Stage 1: th's, or `stage1` reading the same segment)."""
    h, taps = th.heads, th.taps
    return av1_partition_cascade(h["stage1"] if stage1 is None else stage1, h["stage2"], h["rect"], th.ab(),
                                 temperature=temperature, trunk=trunk,
                                 taps={"stage1": taps["stage1"], "stage2": taps["stage2"], "rect": taps["rect"],
                                       "ab": taps["ab1"]})


def build_designs(run: Run, own: OwnHierarchy, flat: nn.Module, trunk: nn.ModuleDict, flat_head: nn.Module,
                  th: TrunkHeads, raw_gates: dict[int, nn.Module]) -> list[Design]:
    """The designs, over the given (inference-form) modules; raw_gates: width -> RawGate."""
    h, taps, last = th.heads, th.taps, list(trunk)[-1]
    cal = run.calibration
    cal["v6-own stage1"] = stage1_calibration(own.stage1, run)
    cal["trunk stage1"] = stage1_calibration(h["stage1"], run, trunk, taps["stage1"])
    t_own, t_s1 = cal["v6-own stage1"]["temperature"], cal["trunk stage1"]["temperature"]
    # the exits keep temperature 1: trained class-balanced, their softmax is no calibrated probability on the
    # natural distribution (fitting T on val can run off to a uniform softmax); tau is tuned on val instead
    t_e1 = t_e2 = 1.0
    v6_trunk = v6_trunk_cascade(th, trunk, temperature=t_s1)
    v6_own = av1_partition_cascade(own.stage1, own.stage2, own.rect, own.ab, temperature=t_own)

    def flat_stage():
        return Stage(flat_head, Argmax(), range(NUM_LABELS), name="flat", tap=last)

    gate = Cascade(Stage(h["stage1"], Threshold(0.5, t_s1), [NONE, flat_stage()], name="gate", tap=taps["stage1"]),
                   trunk=trunk)
    leaves = [Leaf(c) for c in range(NUM_LABELS)]
    exit2 = Stage(h["exit2"], Confident(0.9, t_e2), [*leaves, flat_stage()], name="exit2", tap=taps["exit2"])
    exits = Cascade(Stage(h["exit1"], Confident(0.9, t_e1), [*leaves, exit2], name="exit1", tap=taps["exit1"]),
                    trunk=trunk)
    cascades = [("v6-trunk", v6_trunk), ("v6-own", v6_own), ("gate", gate), ("exits", exits)]
    for w, g in raw_gates.items():
        cal[f"raw{w}"] = stage1_calibration(g, run)
        t_raw = cal[f"raw{w}"]["temperature"]
        whole = Stage(flat, Argmax(), range(NUM_LABELS), name="flat")  # the whole model: no trunk to resume
        cascades.append((f"raw{w}", Cascade(Stage(g, Threshold(0.5, t_raw), [NONE, whole], name="raw"))))
        if w == max(raw_gates):  # the widest gate also fronts the hierarchy
            cascades.append((f"raw{w}-v6", Cascade(Stage(g, Threshold(0.5, t_raw), [NONE, v6_trunk.root], name="raw"),
                                                   trunk=trunk)))
    return [Design("flat", flat)] + [Design(n, c.to(run.device).eval()) for n, c in cascades]


class _Clock:
    """Records the seconds since the previous call under timing["compare"][step]."""

    def __init__(self, timing: dict):
        self.steps = timing.setdefault("compare", {})
        self.t = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[step] = now - self.t
        self.t = now


def _spread(frontier, k: int) -> list:
    """Up to k frontier points spread over its length (both ends included)."""
    if len(frontier) <= k:
        return list(frontier)
    idx = sorted({round(i * (len(frontier) - 1) / (k - 1)) for i in range(k)})
    return [frontier[i] for i in idx]


def _tuned(design: Design, way: str, xv, yv, lat: dict, flat_cost: dict) -> tuple:
    """(TuneResult, chosen point (cost, metric, setting), the budget) of design tuned one way: the best val macro
    F1 within BUDGET x the flat model's cost (flat_cost[way]: its FLOPs per block, or its predicted seconds per
    block at RUN_BATCH); where no setting is that cheap, the design cannot meet the target and its best point
    (the unconstrained optimum) is reported."""
    kw = {} if way == "flops" else {"cost": "latency", "latency": lat[design.name], "run_batch_size": RUN_BATCH}
    budget = BUDGET * flat_cost[way]
    try:
        tuned = tune_cascade(design.model, xv, yv, objective="macro_f1", budget=budget, **kw)
        return tuned, (tuned.cost, tuned.metric, tuned.setting), budget
    except ValueError:  # nothing within the budget (v6-own is slower than the flat model at every setting)
        tuned = tune_cascade(design.model, xv, yv, objective="macro_f1", **kw)
        return tuned, tuned.frontier[-1], budget


def _entry(run: Run, design: Design, way: str, tuned, point, cache: dict) -> dict:
    """One design tuned one way: its operating point's report on test and its predicted time per block."""
    setting = point[2]
    key = (design.name, tuple(sorted(setting.items())))
    if key not in cache:
        cascade = design.model.with_setting(setting)
        cache[key] = (cascade, evaluate(cascade, run.test, class_names=LABEL_NAMES, device=run.device))
    cascade, rep = cache[key]
    return {"design": design.name, "way": way, "description": describe(design.name), "cascade": cascade,
            "test": rep.to_dict(), "macro_f1": rep.macro_f1, "accuracy": rep.accuracy,
            "flops_per_block": rep.flops_per_row, "setting": setting,
            "val": {"macro_f1": point[1], ("flops_per_block" if way == "flops" else "seconds_per_block"): point[0]},
            "frontier_val": [{"cost": c, "macro_f1": m, "setting": s} for c, m, s in tuned.frontier],
            "cost_unit": tuned.cost_unit}


@torch.no_grad()
def measure(run: Run, designs: list[Design]) -> dict:
    """Tune each cascade on val both ways (WAYS), then report the flat model and every (design, way) on test:
    the EvaluationReport, FLOPs per block, measured blocks/s (each at its fastest batch size of
    timing.timed_batch_sizes, all in turns, medians of rounds) and its ratio to the flat model's (the median of
    per-round ratios), the blocks/s its latency model predicted, and agreement with the dense oracle; and a few
    points of each latency frontier on val, predicted against measured."""
    dev, clock = run.device, _Clock(run.timing)
    xv, yv = blocks_of(run.val).to(dev), labels_of(run.val).to(dev)
    xt = blocks_of(run.test).to(dev)
    rounds, points, sizes = (3, 2, timed_batch_sizes(True)) if run.quick else (7, 4, timed_batch_sizes(False))
    flat = designs[0].model
    lat = latency_models({d.name: d.model for d in designs}, xv[:256], run.quick)
    for name, model in lat.items():  # the profiles, to tune these designs elsewhere (fastcascade.LatencyModel.load)
        (run.work / "latency").mkdir(parents=True, exist_ok=True)
        model.save(run.work / "latency" / f"{name}.json")
    clock("latency_models")
    flat_val = classification_report(flat(xv).argmax(1), yv, NUM_LABELS).macro_f1
    rep = evaluate(flat, run.test, class_names=LABEL_NAMES, device=dev)
    out = {"flat": {"design": "flat", "way": None, "description": describe("flat"), "test": rep.to_dict(),
                    "macro_f1": rep.macro_f1, "accuracy": rep.accuracy, "flops_per_block": rep.flops_per_row,
                    "val": {"macro_f1": flat_val, "flops_per_block": float(flops_per_row(flat, xv))}}}
    cache, frontiers = {}, {}
    flat_cost = {"flops": out["flat"]["val"]["flops_per_block"],
                 "latency": lat["flat"].seconds_per_row(None, batch_size=RUN_BATCH)}
    for d in designs[1:]:
        for way in WAYS:
            tuned, point, budget = _tuned(d, way, xv, yv, lat, flat_cost)
            out[f"{d.name}@{way}"] = _entry(run, d, way, tuned, point, cache) | {
                "budget": budget, "within_budget": point[0] <= budget}
            if way == "latency":
                frontiers[d.name] = _spread(tuned.frontier, points)
    clock("tune_and_evaluate")
    fns = {"flat": lambda v: flat(v).argmax(1)} | {k: r["cascade"].predict for k, r in out.items() if k != "flat"}
    for k, t in timed_in_turns(fns, xt, dev, rounds, sizes, reference="flat").items():
        r = out[k]
        model = lat["flat" if k == "flat" else r["design"]]
        pred = model.seconds_per_row(None if k == "flat" else r["cascade"], xt, batch_size=t["batch_size"])
        r.update(blocks_per_s=t["blocks_per_s"], batch_size=t["batch_size"], throughput_ratio=t["ratio"],
                 predicted_blocks_per_s=1 / pred)
    for r in out.values():  # the speed-up over the flat model the latency models predicted (each at its batch size)
        r["predicted_throughput_ratio"] = r["predicted_blocks_per_s"] / out["flat"]["predicted_blocks_per_s"]
    clock("throughput")
    for k, r in out.items():
        if k == "flat":
            continue
        c, xs = r.pop("cascade"), xt[:512] if run.quick else xt  # static mode runs every stage on full-batch buffers
        r["routing_matches_dense"] = all(torch.equal(c.predict(xs, mode=m), cascade_dense(c, xs))
                                         for m in ("dynamic", "static"))
    clock("oracle")
    by_name = {d.name: d.model for d in designs}
    timed = {(name, k): by_name[name].with_setting(p[2]) for name, front in frontiers.items()
             for k, p in enumerate(front)}
    measured = timed_in_turns({k: c.predict for k, c in timed.items()}, xv, dev, max(1, rounds - 2), RUN_BATCH)
    for (name, k), c in timed.items():
        out[f"{name}@latency"].setdefault("frontier_val_timed", []).append(
            {"macro_f1": frontiers[name][k][1], "blocks_per_s": measured[(name, k)]["blocks_per_s"],
             "predicted_blocks_per_s": 1 / lat[name].seconds_per_row(c, xv, batch_size=RUN_BATCH)})
    clock("frontier_throughput")
    return out
