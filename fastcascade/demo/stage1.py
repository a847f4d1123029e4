"""Stage 1 (NONE vs PARTITION) as the seed plan trains and tunes it, and what each part of that buys.

* STAGE1_RECIPE, the plan's recipe, trains every Stage-1 model of the demo (the own hierarchy's, the trunk
  head, the raw-block gates): sigmoid focal loss with alpha 0.25 and gamma 2.5, hard-negative mining 3:1 and
  the 1:1 balanced sampler (fit's "oversample");
* calibration: each Stage-1 model's temperature, fitted on val, and its ECE on test before and after;
* thresholds: the Stage-1 threshold of a v6 hierarchy chosen three ways on val (for Stage 1's own F1 on the
  plan's grid: v5's way; for precision under a recall floor on the same grid; end to end with tune_cascade) and
  each reported on test: the contamination of Stage 2's inputs (the share whose true label is NONE), the stage
  table of the final predictions;
* ablation (``--ablation stage1``): the trunk's Stage-1 head retrained with alpha, mining and the sampler each
  removed in turn, each in the v6-trunk hierarchy tuned end to end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .. import data as fd
from ..calibration import expected_calibration_error, fit_temperature, tune_threshold
from ..cascade import tune_cascade
from ..losses import sigmoid_focal_loss
from .context import blocks_of, labels_of

__all__ = ["ABLATIONS", "PLAN_GRID", "STAGE1_MIN_RECALL", "STAGE1_RECIPE", "Stage1Recipe", "THRESHOLD_WAYS",
           "SWEEP", "stage1_calibration", "stage1_logits", "stage_table_of", "threshold_ways"]


@dataclass(frozen=True)
class Stage1Recipe:
    """How a Stage-1 model trains: its sigmoid focal loss (alpha, gamma, hard_negative_ratio) and fit's sampler."""

    alpha: float | None = 0.25
    gamma: float = 2.5
    hard_negative_ratio: float | None = 3.0
    sampler: str | None = "oversample"

    def loss(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of Stage-1 logits `out` ((N,) or (N, 1)) against 0/1 targets `t`."""
        return sigmoid_focal_loss(out.reshape(-1), t.float(), alpha=self.alpha, gamma=self.gamma,
                                  hard_negative_ratio=self.hard_negative_ratio)

    def fit_options(self) -> dict:
        """fit's keyword arguments the recipe sets (the sampler)."""
        return {"sampler": self.sampler}


#: the seed plan's Stage-1 recipe (../shared/SEED-PLAN.md: focal alpha 0.25, gamma 2.5, mining 3:1, sampler 1:1)
STAGE1_RECIPE = Stage1Recipe()
#: the ablation's rows: the recipe, then each of its parts removed in turn
ABLATIONS = {"recipe": STAGE1_RECIPE,
             "no alpha": dataclasses.replace(STAGE1_RECIPE, alpha=None),
             "no mining": dataclasses.replace(STAGE1_RECIPE, hard_negative_ratio=None),
             "no sampler": dataclasses.replace(STAGE1_RECIPE, sampler=None)}

#: the plan's Stage-1 threshold grid: 0.40 to 0.70 in 31 steps
PLAN_GRID = torch.linspace(0.40, 0.70, 31, dtype=torch.float64)
#: the recall floor of the precision-tuned threshold: v5's own Stage-1 recall (F1 65.19% at precision 53.71%,
#: so recall 0.829): as many partitions reach Stage 2 as in v5, with fewer NONE blocks beside them
STAGE1_MIN_RECALL = 0.83
THRESHOLD_WAYS = ("stage-1 F1 (v5)", "precision", "end to end")
#: the thresholds the plot sweeps
SWEEP = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)


@torch.no_grad()
def stage1_logits(module: nn.Module, x: torch.Tensor, device, trunk=None, tap: str | None = None,
                  chunk: int = 2048) -> torch.Tensor:
    """float64 (N,) logits of a Stage-1 module on blocks x (through the trunk up to its tap, when it reads one),
    on the CPU."""
    out = []
    for i in range(0, x.shape[0], chunk):
        h = x[i:i + chunk].to(device)
        if tap is not None:
            for name, seg in trunk.items():
                h = seg(h)
                if name == tap:
                    break
        out.append(module(h).reshape(-1).double().cpu())
    return torch.cat(out)


def stage1_calibration(module: nn.Module, run, trunk=None, tap: str | None = None) -> dict:
    """A Stage-1 model's temperature, fitted on val (fastcascade.fit_temperature), and its ECE on test before and
    after (fastcascade.expected_calibration_error, the positive class's probability)."""
    yv = fd.stage_targets(labels_of(run.val))["stage1"]
    yt = fd.stage_targets(labels_of(run.test))["stage1"]
    t = fit_temperature(stage1_logits(module, blocks_of(run.val), run.device, trunk, tap).float(), yv.float())
    logit_t = stage1_logits(module, blocks_of(run.test), run.device, trunk, tap)
    return {"temperature": t, "ece_before": expected_calibration_error(torch.sigmoid(logit_t).float(), yt),
            "ece_after": expected_calibration_error(torch.sigmoid(logit_t / t).float(), yt)}


def stage_table_of(confusion) -> fd.StageTable:
    """The plan's stage table of a design from its final 8-class confusion matrix (rows truth, columns prediction)."""
    cm = torch.as_tensor(confusion, dtype=torch.int64)
    k = cm.shape[0]
    truth = torch.arange(k).repeat_interleave(k)
    pred = torch.arange(k).repeat(k)
    counts = cm.reshape(-1)
    return fd.stage_table(pred.repeat_interleave(counts), truth.repeat_interleave(counts))


def threshold_ways(cascade, run, xv, yv, xt, yt) -> dict:
    """{way: row} for a v6 hierarchy (a Cascade whose root is Stage 1 with a Threshold rule): its Stage-1
    threshold chosen on val THRESHOLD_WAYS ways, each on test: the threshold, the share of rows reaching Stage 2
    and of those the share whose true label is NONE (contamination), and the stage table; and under "sweep"
    the test's Stage-1 F1, contamination and final macro F1 over SWEEP thresholds (for the plot)."""
    root = cascade.root
    temp = float(root.rule.temperature)
    # the probabilities the Threshold rule compares, in float64
    score = {split: torch.sigmoid(stage1_logits(root.module, x, run.device, cascade.trunk, root.tap) / temp)
             for split, x in (("val", xv), ("test", xt))}
    y1 = fd.stage_targets(yv.cpu())["stage1"]
    thresholds = {"stage-1 F1 (v5)": tune_threshold(score["val"], y1, "f1", grid=PLAN_GRID)[0]}
    try:
        thresholds["precision"] = tune_threshold(score["val"], y1, "precision", min_recall=STAGE1_MIN_RECALL,
                                                 grid=PLAN_GRID)[0]
        floor_on_grid = True
    except ValueError:  # no grid point keeps the recall: every distinct score is a candidate
        thresholds["precision"] = tune_threshold(score["val"], y1, "precision", min_recall=STAGE1_MIN_RECALL)[0]
        floor_on_grid = False
    tuned = tune_cascade(cascade, xv, yv, objective="macro_f1")
    thresholds["end to end"] = float(tuned.setting[root.name])
    out = {}
    yt_cpu = yt.cpu()
    out["sweep"] = _sweep(cascade, tuned.setting, score["test"], xt, yt_cpu)
    for way, thr in thresholds.items():
        reach = score["test"] > thr  # strictly, in float64: as the Threshold rule routes
        pred = cascade.with_setting({**tuned.setting, root.name: thr}).predict(xt).cpu()
        out[way] = {"threshold": thr, "reach_stage2": float(reach.double().mean()),
                    "contamination": float((yt_cpu[reach] == fd.NONE).double().mean()) if bool(reach.any()) else 0.0,
                    "table": fd.stage_table(pred, yt_cpu).to_dict(),
                    **({"min_recall_on_grid": floor_on_grid} if way == "precision" else {})}
    return out



@torch.no_grad()
def _sweep(cascade, setting: dict, score: torch.Tensor, xt, yt: torch.Tensor) -> dict:
    """Test metrics of the final labels as the Stage-1 threshold sweeps SWEEP, the later stages at `setting`.
    Stage 2 and below never answer NONE and decide each row alone, so the final label at threshold t is NONE
    where score <= t and else the label of the hierarchy with every row sent on (threshold 0, score > 0)."""
    root = cascade.root.name
    sent_on = cascade.with_setting({**setting, root: 0.0}).predict(xt).cpu()
    out = {"threshold": [], "stage1_f1": [], "contamination": [], "macro_f1": []}
    for t in SWEEP.tolist():
        reach = score > t
        table = fd.stage_table(torch.where(reach, sent_on, torch.full_like(sent_on, fd.NONE)), yt)
        out["threshold"].append(t)
        out["stage1_f1"].append(table.stage1_f1)
        out["contamination"].append(float((yt[reach] == fd.NONE).double().mean()) if bool(reach.any()) else 0.0)
        out["macro_f1"].append(table.macro_f1)
    return out
