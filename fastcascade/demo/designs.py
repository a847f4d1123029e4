"""The designs the demo compares, each tuned on val and measured on test.

* flat: the 8-class model (its backbone is the shared trunk of the trunk designs);
* v6-trunk: the seed's v6 hierarchy (Stage 1 -> Stage 2 -> RECT / AB ensemble) with heads on the trunk,
  Stage 1 after the first segment, the others after the last;
* v6-own: the same hierarchy with its own backbones (one per stage, three for AB);
* gate: Stage 1 (the v6-trunk head) as a gate in front of the flat model: NONE exits after the first
  segment, every other row runs the rest of the trunk and the flat model's head;
* exits: 8-class exits after the first and the second segment (exit when confident), then the flat head.

Operating points: the thresholds / taus tuned on val for the final macro F1 (fastcascade.tune_cascade: the
best val point, ties to the lower cost). Temperatures are fitted on val first (fastcascade.fit_temperature).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import fit_temperature
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
from .context import (
    LABEL_NAMES,
    NUM_LABELS,
    Run,
    blocks_of,
    labels_of,
    stage_target,
    throughputs,
    timed_batch_sizes,
)
from .heads import TrunkHeads
from .hierarchy import OwnHierarchy

__all__ = ["DESCRIPTIONS", "Design", "build_designs", "measure"]

DESCRIPTIONS = {
    "flat": "the flat 8-class model (its backbone is the shared trunk)",
    "v6-trunk": "v6 hierarchy, heads on the shared trunk (Stage 1 after the first segment)",
    "v6-own": "v6 hierarchy, its own backbones (today's design)",
    "gate": "Stage 1 (trunk head) as a gate in front of the flat model",
    "exits": "8-class exits after the first and second segments, then the flat head",
}


@dataclass
class Design:
    name: str
    model: nn.Module  # a Cascade, or the flat model
    tuned: object = None  # the TuneResult on val
    chosen: dict = field(default_factory=dict)  # the operating point taken (stage -> threshold / tau)


@torch.no_grad()
def _val_logits(module: nn.Module, trunk: nn.ModuleDict | None, tap: str | None, x: torch.Tensor, device):
    out = []
    for i in range(0, x.shape[0], 2048):
        h = x[i:i + 2048].to(device)
        for name, seg in (trunk or {}).items():
            if tap is None:
                break
            h = seg(h)
            if name == tap:
                break
        out.append(module(h).float())
    return torch.cat(out)


def _temperature(module, trunk, tap, run: Run, target: str | None) -> float:
    x, y = blocks_of(run.val), labels_of(run.val)
    logits = _val_logits(module, trunk, tap, x, run.device).cpu()
    if target is None:
        return fit_temperature(logits, y)
    t = stage_target(target)(y)
    return fit_temperature(logits.reshape(-1), t.float())


def build_designs(run: Run, own: OwnHierarchy, flat: nn.Module, trunk: nn.ModuleDict, flat_head: nn.Module,
                  th: TrunkHeads) -> list[Design]:
    h, taps, last = th.heads, th.taps, list(trunk)[-1]
    t_own = _temperature(own.stage1, None, None, run, "stage1")
    t_s1 = _temperature(h["stage1"], trunk, taps["stage1"], run, "stage1")
    # the exits keep temperature 1: trained class-balanced, their softmax is no calibrated probability on the
    # natural distribution (fitting T on val can run off to a uniform softmax); tau is tuned on val instead
    t_e1 = t_e2 = 1.0
    v6_trunk = av1_partition_cascade(h["stage1"], h["stage2"], h["rect"], th.ab(), temperature=t_s1, trunk=trunk,
                                     taps={"stage1": taps["stage1"], "stage2": taps["stage2"], "rect": taps["rect"],
                                           "ab": taps["ab1"]})
    v6_own = av1_partition_cascade(own.stage1, own.stage2, own.rect, own.ab, temperature=t_own)

    def flat_stage():
        return Stage(flat_head, Argmax(), range(NUM_LABELS), name="flat", tap=last)

    gate = Cascade(Stage(h["stage1"], Threshold(0.5, t_s1), [NONE, flat_stage()], name="gate", tap=taps["stage1"]),
                   trunk=trunk)
    leaves = [Leaf(c) for c in range(NUM_LABELS)]
    exit2 = Stage(h["exit2"], Confident(0.9, t_e2), [*leaves, flat_stage()], name="exit2", tap=taps["exit2"])
    exits = Cascade(Stage(h["exit1"], Confident(0.9, t_e1), [*leaves, exit2], name="exit1", tap=taps["exit1"]),
                    trunk=trunk)
    designs = [Design("flat", flat)] + [Design(n, c.to(run.device).eval()) for n, c in
                                        (("v6-trunk", v6_trunk), ("v6-own", v6_own), ("gate", gate), ("exits", exits))]
    run.timing["temperatures"] = {"v6-own stage1": t_own, "trunk stage1": t_s1}
    return designs


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


@torch.no_grad()
def measure(run: Run, designs: list[Design]) -> dict:
    """Tune each cascade on val (its best val macro F1, ties to the lower cost), then report every design on
    test: the EvaluationReport, FLOPs per block, blocks/s (dynamic mode, the test split in batches, each
    design at its fastest of context.timed_batch_sizes, all designs timed in turns) and agreement with the dense
    oracle; and the val frontier, with blocks/s at a few of its points."""
    dev, clock = run.device, _Clock(run.timing)
    xv, yv = blocks_of(run.val).to(dev), labels_of(run.val).to(dev)
    xt = blocks_of(run.test).to(dev)
    rounds, points = (2, 2) if run.quick else (3, 4)
    out, predict = {}, {}
    for d in designs:
        if isinstance(d.model, Cascade):
            d.tuned = tune_cascade(d.model, xv, yv, objective="macro_f1")
            d.chosen, d.model = d.tuned.setting, d.tuned.cascade
            predict[d.name] = d.model.predict
        else:
            predict[d.name] = lambda v, m=d.model: m(v).argmax(1)
        rep = evaluate(d.model, run.test, class_names=LABEL_NAMES, device=dev)
        out[d.name] = {"description": DESCRIPTIONS[d.name], "test": rep.to_dict(), "macro_f1": rep.macro_f1,
                       "accuracy": rep.accuracy, "flops_per_block": rep.flops_per_row}
    clock("tune_and_evaluate")
    for name, (bps, batch) in throughputs(predict, xt, dev, rounds, timed_batch_sizes(run.quick)).items():
        out[name].update(blocks_per_s=bps, batch_size=batch)
    clock("throughput")
    timed = {}
    for d in designs[1:]:
        r, xs = out[d.name], xt[:512] if run.quick else xt  # static mode runs every stage on full-batch buffers
        r["routing_matches_dense"] = all(torch.equal(d.model.predict(xs, mode=m), cascade_dense(d.model, xs))
                                         for m in ("dynamic", "static"))
        r.update(setting=d.chosen, val={"macro_f1": d.tuned.metric, "flops_per_block": d.tuned.cost},
                 frontier_val=[{"flops_per_block": c, "macro_f1": m, "setting": s} for c, m, s in d.tuned.frontier])
        for k, (c, m, s) in enumerate(_spread(d.tuned.frontier, points)):
            timed[(d.name, k)] = (c, m, d.model.with_setting(s).predict)
    clock("oracle")
    bps = {}  # each design's frontier timed at the batch size it was fastest at on test
    for name in dict.fromkeys(n for n, _ in timed):  # design order, not a set's
        fns = {key: v[2] for key, v in timed.items() if key[0] == name}
        bps.update(throughputs(fns, xv, dev, max(1, rounds - 2), out[name]["batch_size"]))
    for (name, k), (c, m, _) in timed.items():
        out[name].setdefault("frontier_val_timed", []).append(
            {"flops_per_block": c, "macro_f1": m, "blocks_per_s": bps[(name, k)][0]})
    out["flat"]["val"] = {"macro_f1": classification_report(designs[0].model(xv).argmax(1), yv, NUM_LABELS).macro_f1,
                          "flops_per_block": float(flops_per_row(designs[0].model, xv))}
    clock("frontier_throughput")
    return out
