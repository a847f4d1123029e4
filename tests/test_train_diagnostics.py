"""fit's training diagnostics: each warning made to fire by a run that has the failure, and kept quiet by one
that does not; recorded in the history (and history.json), printed unless progress is off, kept by resume."""

import json
import math

import pytest
import torch
from torch import nn
from train_tasks import linear_task

from fastcascade import train as T

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A body (the "backbone" freeze_backbone freezes) and a head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(8, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _collapsed():
    """A model that predicts class 0 for every row."""
    model = Net()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    return model


def _kinds(history):
    return [[w["kind"] for w in r["warnings"]] for r in history]


CE = nn.functional.cross_entropy
NAMES = ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# collapse


def test_collapse_fires_each_epoch_is_recorded_and_printed(tmp_path, capsys):
    train, val = linear_task()
    # a learning rate too small to move anything: every epoch predicts "a" for every val row
    history, _ = T.fit(_collapsed(), CE, train, val, 2, lr=1e-12, class_names=NAMES, out_dir=tmp_path,
                       diagnostics={"first_best": False}, progress=True)
    assert _kinds(history) == [["collapse"], ["collapse"]]
    w = history[0]["warnings"][0]
    true_share = (val.tensors[1] == 0).double().mean().item()
    assert w["epoch"] == 1 and w["class"] == "a" and w["share"] == 1.0 and w["threshold"] == 0.9
    assert math.isclose(w["true_share"], true_share) and "100.0% of the val predictions are 'a'" in w["message"]
    assert json.loads((tmp_path / "history.json").read_text())[1]["warnings"] == history[1]["warnings"]
    out = capsys.readouterr().out
    assert out.count("fit warning (collapse): epoch") == 2, out
    # progress off: recorded, not printed
    again, _ = T.fit(_collapsed(), CE, train, val, 1, lr=1e-12, class_names=NAMES, progress=False)
    assert _kinds(again) == [["collapse"]] and "warning" not in capsys.readouterr().out


def test_collapse_stays_quiet_for_a_model_that_learned_and_below_the_threshold():
    train, val = linear_task()
    history, _ = T.fit(Net(), CE, train, val, 2, lr=1e-2, batch_size=64, progress=False)
    shares = [max(map(sum, zip(*r["val"]["confusion"]))) / 300 for r in history]
    assert max(shares) < 0.6 and _kinds(history) == [[], []]
    # the collapsed model, with the threshold at 100%: a share cannot exceed it
    history, _ = T.fit(_collapsed(), CE, train, val, 1, lr=1e-12, diagnostics={"collapse_share": 1.0},
                       progress=False)
    assert _kinds(history) == [[]]
    history, _ = T.fit(_collapsed(), CE, train, val, 2, lr=1e-12, diagnostics=False, progress=False)
    assert _kinds(history) == [[], []]


# ---------------------------------------------------------------------------------------------
# the best epoch is the first


def test_best_epoch_first_fires_at_the_last_epoch():
    train, val = linear_task()
    # nothing moves: no epoch improves on the first
    history, _ = T.fit(Net(), CE, train, val, 3, lr=1e-12, progress=False)
    assert _kinds(history) == [[], [], ["best_epoch_first"]]
    w = history[-1]["warnings"][0]
    assert (w["epoch"], w["best_epoch"], w["epochs"], w["monitor"]) == (3, 1, 3, "macro_f1")
    assert "is the first of 3" in w["message"]
    # early stopping ends the run at epoch 2: the warning comes with it
    history, _ = T.fit(Net(), CE, train, val, 5, lr=1e-12, patience=1, progress=False)
    assert len(history) == 2 and _kinds(history) == [[], ["best_epoch_first"]]
    history, _ = T.fit(Net(), CE, train, val, 2, lr=1e-12, monitor="val_loss", progress=False)
    assert _kinds(history) == [[], ["best_epoch_first"]]  # a loss that never falls counts the same


def test_best_epoch_first_stays_quiet_when_a_later_epoch_is_best_or_there_is_one_epoch():
    train, val = linear_task()
    history, _ = T.fit(Net(), CE, train, val, 3, lr=1e-2, batch_size=64, progress=False)
    best = max(range(3), key=lambda k: history[k]["val"]["macro_f1"])
    assert best > 0 and _kinds(history) == [[], [], []]
    history, _ = T.fit(Net(), CE, train, val, 1, lr=1e-12, progress=False)  # the first of one
    assert _kinds(history) == [[]]
    history, _ = T.fit(Net(), CE, train, val, 2, lr=1e-12, diagnostics={"first_best": False}, progress=False)
    assert _kinds(history) == [[], []]


# ---------------------------------------------------------------------------------------------
# a drop after unfreezing


def _unfreeze_run(body_lr, **kw):
    """One frozen epoch (the head trains), then one with the body at body_lr."""
    train, val = linear_task()
    model = Net()
    groups = [{"name": "head", "params": list(model.head.parameters()), "lr": 1e-2},
              {"name": "body", "params": list(model.body.parameters()), "lr": body_lr}]
    history, _ = T.fit(model, CE, train, val, 2, param_groups=groups, freeze_epochs=1, batch_size=64,
                       schedule=None, progress=False, **kw)
    assert [r["frozen"] for r in history] == [True, False]
    return history


def test_drop_after_unfreeze_fires():
    history = _unfreeze_run(50.0, diagnostics={"first_best": False})  # a body lr that wrecks its features
    assert _kinds(history) == [[], ["drop_after_unfreeze"]]
    w = history[1]["warnings"][0]
    f1 = [r["val"]["macro_f1"] for r in history]
    assert (w["epoch"], w["monitor"], w["before"], w["after"]) == (2, "macro_f1", f1[0], f1[1])
    assert w["drop"] == f1[0] - f1[1] > 0.05 and "dropped from" in w["message"]
    history = _unfreeze_run(50.0, monitor="val_loss", diagnostics={"first_best": False})
    w = history[1]["warnings"][0]
    assert w["kind"] == "drop_after_unfreeze" and w["after"] - w["before"] > 0.05 and "rose from" in w["message"]


def test_drop_after_unfreeze_stays_quiet():
    history = _unfreeze_run(1e-3)  # a gentle body lr: val improves
    assert history[1]["val"]["macro_f1"] > history[0]["val"]["macro_f1"] and _kinds(history) == [[], []]
    history = _unfreeze_run(50.0, diagnostics={"first_best": False, "unfreeze_drop": 0.5})  # within the margin
    assert history[1]["val"]["macro_f1"] > history[0]["val"]["macro_f1"] - 0.5 and _kinds(history) == [[], []]
    train, val = linear_task()  # no frozen epochs: nothing to compare with, whatever the drop
    history, _ = T.fit(Net(), CE, train, val, 2, lr=50.0, schedule=None, diagnostics={"first_best": False},
                       progress=False)
    assert _kinds(history) == [[], []]


# ---------------------------------------------------------------------------------------------
# resume, settings


def test_warnings_survive_resume(tmp_path):
    train, val = linear_task()

    def run(out, resume=None):
        return T.fit(_collapsed(), CE, train, val, 3, lr=1e-12, out_dir=out, checkpoint_every=1, resume=resume,
                     progress=False)[0]

    full = run(tmp_path / "a")
    assert _kinds(full) == [["collapse"], ["collapse"], ["collapse", "best_epoch_first"]]
    resumed = run(tmp_path / "b", resume=tmp_path / "a" / "epoch-0001.pt")
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(full) and resumed[0] == full[0]
    assert json.loads((tmp_path / "b" / "history.json").read_text()) == json.loads(json.dumps(resumed))
    finished = run(tmp_path / "a", resume=tmp_path / "a" / "last.pt")  # nothing to train: the history as it was
    assert finished == full


@pytest.mark.parametrize("value, match", [
    ({"collapse_share": 0}, r"collapse_share must be None or a number in \(0, 1\], got 0"),
    ({"collapse_share": 1.5}, r"collapse_share must be None or a number in \(0, 1\], got 1.5"),
    ({"unfreeze_drop": -0.1}, r"unfreeze_drop must be None or a finite number >= 0, got -0.1"),
    ({"unfreeze_drop": float("nan")}, r"unfreeze_drop must be None or a finite number >= 0, got nan"),
    ({"first_best": "yes"}, r"first_best must be True or False, got 'yes'"),
    ({"colapse_share": 0.5}, r"diagnostics: unknown entries \['colapse_share'\]"),
    ("strict", r"diagnostics must be None, True, False, a fastcascade.train.Diagnostics or a dict"),
])
def test_bad_diagnostics_are_refused_before_training(value, match, tmp_path):
    train, val = linear_task(200)
    with pytest.raises(ValueError, match=match):
        T.fit(Net(), CE, train, val, 1, diagnostics=value, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_diagnostics_settings():
    assert T.Diagnostics() == T.Diagnostics.of(None) == T.Diagnostics.of(True)
    assert T.Diagnostics.of({"collapse_share": 0.8}) == T.Diagnostics(collapse_share=0.8)
    off = T.Diagnostics.of(False)
    assert (off.collapse_share, off.first_best, off.unfreeze_drop) == (None, False, None)
    d = T.Diagnostics()
    assert (d.collapse_share, d.first_best, d.unfreeze_drop) == (0.9, True, 0.05)
