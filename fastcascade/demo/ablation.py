"""What each part of the plan's Stage-1 recipe buys (``python -m fastcascade demo --ablation stage1``).

The trunk's Stage-1 head is trained again with each of alpha, hard-negative mining and the balanced sampler
removed from STAGE1_RECIPE in turn (the head trains on cached trunk features: seconds each), put in the v6-trunk
hierarchy in place of the recipe's head (its temperature fitted on val), and the hierarchy is tuned end to end on
val for macro F1 (fastcascade.tune_cascade, no budget: the ablation measures accuracy, not time). Each row reports
on test the stage table of the final predictions: Stage-1 precision, recall and F1, and the final macro F1.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..cascade import tune_cascade
from ..data import stage_table
from .context import Run, blocks_of, labels_of
from .designs import v6_trunk_cascade
from .heads import TrunkFeatures, TrunkHeads, train_stage1_head
from .stage1 import ABLATIONS, stage1_calibration

__all__ = ["ABLATION_CHOICES", "stage1_ablation"]

ABLATION_CHOICES = ("stage1",)


def stage1_ablation(run: Run, trunk, heads: TrunkHeads, features: TrunkFeatures) -> dict:
    """{row: {"recipe", "temperature", "setting", "table"}} for each of ABLATIONS (the "recipe" row reuses the
    head trained with the recipe)."""
    xv, yv = blocks_of(run.val).to(run.device), labels_of(run.val).to(run.device)
    xt, yt = blocks_of(run.test).to(run.device), labels_of(run.test)
    out = {}
    for name, recipe in ABLATIONS.items():
        if name == "recipe":
            head = heads.heads["stage1"]
        else:
            head = train_stage1_head(run, features, recipe, key="ablation_" + re.sub(r"\W+", "_", name))
        t = stage1_calibration(head, run, trunk, heads.taps["stage1"])["temperature"]
        cascade = v6_trunk_cascade(heads, trunk, stage1=head, temperature=t).to(run.device).eval()
        tuned = tune_cascade(cascade, xv, yv, objective="macro_f1")
        with torch.no_grad():
            pred = cascade.with_setting(tuned.setting).predict(xt).cpu()
        out[name] = {"recipe": dataclasses.asdict(recipe), "temperature": t,
                     "setting": dict(tuned.setting), "table": stage_table(pred, yt).to_dict()}
    return out
