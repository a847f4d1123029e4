"""fastcascade.train (fit, checkpoints, evaluate, DDP) and the demo, `python -m fastcascade demo`."""

import dataclasses
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset
from train_tasks import linear_task

import fastcascade as fc
import fastcascade.data as fd
from fastcascade import train as T
from fastcascade.metrics import confusion_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0, classes=3, dropout=0.1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, classes))


class TinyCNN(nn.Module):
    def __init__(self, k, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 4, k)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.layer1(self.stem(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def blocks():
    """A small slice of the embedded dataset (train and val images stay apart)."""
    train, val = fd.load_partition_dataset("train"), fd.load_partition_dataset("val")
    g = torch.Generator().manual_seed(0)
    return (Subset(train, torch.randperm(len(train), generator=g)[:800].tolist()),
            Subset(val, torch.randperm(len(val), generator=g)[:400].tolist()))


def _files(d: pathlib.Path):
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------------------------
# checkpoints


class HiddenState(nn.Module):
    """A buffer that forward reads but state_dict leaves out: a reload cannot reproduce the model."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("shift", torch.zeros(2), persistent=False)

    def forward(self, x):
        return self.lin(x) + self.shift


def test_save_checkpoint_round_trip(tmp_path):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    extra = {"note": "x", "t": torch.arange(3)}
    path = T.save_checkpoint(tmp_path / "a.pt", model, opt, epoch=3, extra=extra, probe=torch.randn(4, 8))
    assert _files(tmp_path) == ["a.pt"]
    fresh = _mlp(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    ckpt = T.load_checkpoint(path, fresh, fresh_opt)
    assert ckpt["epoch"] == 3 and ckpt["extra"]["note"] == "x"
    assert torch.equal(ckpt["extra"]["t"], torch.arange(3))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_save_checkpoint_refuses_state_outside_state_dict(tmp_path):
    model = HiddenState()
    model.shift.fill_(0.5)  # the in-memory model differs from anything rebuilt from the file
    with pytest.raises(RuntimeError, match="shift"):
        T.save_checkpoint(tmp_path / "m.pt", model, probe=torch.randn(3, 4))
    assert _files(tmp_path) == []  # no checkpoint, no temporary file


def test_save_checkpoint_probe_catches_a_reload_that_changes_outputs(tmp_path):
    class SkipsBias(nn.Linear):
        """load_state_dict that silently drops the bias: every tensor is in state_dict, but a reload
        gives a zero bias, so only the outputs on the probe reveal it."""

        def _load_from_state_dict(self, state_dict, prefix, *args):
            state_dict = dict(state_dict)
            super()._load_from_state_dict(state_dict, prefix, *args)
            with torch.no_grad():
                self.bias.zero_()

    torch.manual_seed(0)
    model = SkipsBias(4, 2)
    with pytest.raises(RuntimeError, match="differ"):
        T.save_checkpoint(tmp_path / "m.pt", model, probe=torch.randn(3, 4))
    assert _files(tmp_path) == []


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    good = _mlp()
    T.save_checkpoint(path, good, probe=torch.randn(2, 8))
    before = path.read_bytes()
    bad = HiddenState()
    bad.shift.fill_(1.0)
    with pytest.raises(RuntimeError):
        T.save_checkpoint(path, bad, probe=torch.randn(2, 4))
    with pytest.raises(Exception):  # torch.save itself fails half-way: not picklable
        T.save_checkpoint(path, good, extra={"fn": lambda: 0})
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert _files(tmp_path) == ["c.pt"]


def test_load_checkpoint_errors(tmp_path):
    path = T.save_checkpoint(tmp_path / "m.pt", _mlp(), probe=torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"another architecture.*3\.weight \[3, 32\] vs \[4, 32\]"):
        T.load_checkpoint(path, _mlp(classes=4))
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))  # no dropout: keys shift
    with pytest.raises(ValueError, match=r"not in the checkpoint: 2\.weight, 2\.bias"):
        T.load_checkpoint(path, other)
    with pytest.raises(ValueError, match="no optimizer state"):
        T.load_checkpoint(path, _mlp(), torch.optim.AdamW(_mlp().parameters()))
    with pytest.raises(FileNotFoundError, match="no such file"):
        T.load_checkpoint(tmp_path / "missing.pt", _mlp())
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        T.load_checkpoint(tmp_path / "garbage.pt", _mlp())
    torch.save(_mlp().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a fastcascade checkpoint"):
        T.load_checkpoint(tmp_path / "plain.pt", _mlp())


def test_load_checkpoint_checks_optimizer_and_scheduler_before_changing_anything(tmp_path):
    model = _mlp()
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 0.1}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    sched.step()
    path = T.save_checkpoint(tmp_path / "m.pt", model, opt, sched)

    def untouched(kind, match, **kw):
        fresh = _mlp(seed=1)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        o = kw.get("opt", lambda m: torch.optim.AdamW(m.parameters()))(fresh)
        s = kw["sched"](o) if "sched" in kw else None
        o_before = repr(o.state_dict())  # after the scheduler: building one sets each group's initial_lr
        with pytest.raises(ValueError, match=match):
            T.load_checkpoint(path, fresh, o, s)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()), kind
        assert repr(o.state_dict()) == o_before, kind

    untouched("one group", r"2 parameter group\(s\), the optimizer given 1")
    untouched("another split", r"groups hold \[2, 2\] parameters, those of the optimizer given \[1, 3\]",
              opt=lambda m: torch.optim.AdamW([{"params": [m[0].weight]},
                                               {"params": [m[0].bias, *m[3].parameters()]}]))
    untouched("another class", "saved from AdamW, the optimizer given is SGD",
              opt=lambda m: torch.optim.SGD([{"params": m[0].parameters()}, {"params": m[3].parameters()}], lr=0.1))
    two = lambda m: torch.optim.AdamW([{"params": m[0].parameters()}, {"params": m[3].parameters()}])  # noqa: E731
    untouched("another scheduler", "saved from CosineAnnealingLR, the scheduler given is StepLR", opt=two,
              sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 3))
    fresh = _mlp(seed=1)
    o = two(fresh)
    T.load_checkpoint(path, fresh, o, torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10))  # fits: loads
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_save_checkpoint_refuses_values_its_loader_would_refuse(tmp_path):
    import numpy as np

    for extra, key in (({"a": np.zeros(3)}, r"extra\['a'\]: a numpy.ndarray"),
                       ({"run": {"lr": np.float64(0.5)}}, r"extra\['run'\]\['lr'\]: a numpy.float64"),
                       ({"out": pathlib.Path("x")}, r"extra\['out'\]: a pathlib.*str\(path\)")):
        with pytest.raises(TypeError, match=key):
            T.save_checkpoint(tmp_path / "m.pt", _mlp(), extra=extra, verify=False)
    assert _files(tmp_path) == []
    ok = {"t": torch.ones(2), "n": 1.5, "s": {"a", "b"}, "b": b"x", "d": {1: (2, None)}, "dtype": torch.int8}
    T.load_checkpoint(T.save_checkpoint(tmp_path / "m.pt", _mlp(), extra=ok), _mlp())


def test_checkpoint_of_the_previous_format_loads_with_a_warning(tmp_path):
    path = T.save_checkpoint(tmp_path / "m.pt", _mlp())
    ckpt = torch.load(path, weights_only=True)
    ckpt["format"] = "fastcascade.checkpoint/1"
    for k in ("checksum", "optimizer_class", "scheduler_class"):
        del ckpt[k]
    torch.save(ckpt, path)
    fresh = _mlp(seed=1)
    with pytest.warns(UserWarning, match="no checksum"):
        T.load_checkpoint(path, fresh)
    assert torch.equal(fresh[0].weight, _mlp()[0].weight)


# ---------------------------------------------------------------------------------------------
# fit


def test_fit_learns_an_easy_task(tmp_path):
    train, val = linear_task()
    model = _mlp()
    history, best = T.fit(model, nn.functional.cross_entropy, train, val, 6, lr=1e-2, batch_size=64,
                          out_dir=tmp_path, progress=False)
    assert len(history) == 6
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    final = T.evaluate(model, val)
    assert final.macro_f1 > 0.85  # chance is about 0.33
    # the model ends with the best epoch's weights, and best.pt holds them
    i = max(range(6), key=lambda k: history[k]["val"]["macro_f1"])
    assert final.macro_f1 == history[i]["val"]["macro_f1"]
    assert best == tmp_path / "best.pt" and T.load_checkpoint(best, _mlp(seed=5))["epoch"] == i + 1
    assert set(_files(tmp_path)) == {"best.pt", "last.pt", "history.json"}
    assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 6
    rec = history[0]
    assert {"epoch", "train_loss", "val_loss", "lr", "val", "frozen", "seconds"} <= set(rec)
    assert {"precision", "recall", "f1", "support"} <= set(rec["val"]["per_class"]["0"])


def test_fit_is_deterministic_and_seeded():
    train, val = linear_task()
    ce = nn.functional.cross_entropy
    runs = [T.fit(_mlp(), ce, train, val, 2, batch_size=64, seed=s, progress=False)[0] for s in (0, 0, 1)]
    assert [r["train_loss"] for r in runs[0]] == [r["train_loss"] for r in runs[1]]
    assert [r["train_loss"] for r in runs[0]] != [r["train_loss"] for r in runs[2]]


def test_resume_continues_exactly(tmp_path, blocks):
    train, val = blocks
    loss = fc.SoftmaxFocalLoss(gamma=2.0)

    def run(out, epochs, resume=None):
        model = TinyCNN(8)
        return T.fit(model, loss, train, val, epochs, lr=3e-3, batch_size=64, sampler="class_balanced",
                     augment=fd.RandomDihedral(seed=7), out_dir=out, checkpoint_every=1, progress=False,
                     resume=resume, seed=3), model

    (full, _), m_full = run(tmp_path / "a", 3)
    (resumed, _), m_res = run(tmp_path / "b", 3, resume=tmp_path / "a" / "epoch-0001.pt")
    assert len(resumed) == 3 and resumed[0] == full[0]  # the first epoch comes from the checkpoint
    for k in (1, 2):
        assert resumed[k]["train_loss"] == full[k]["train_loss"]  # bitwise
        assert resumed[k]["val_loss"] == full[k]["val_loss"]
        assert resumed[k]["val"]["confusion"] == full[k]["val"]["confusion"]
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not written by fit"):
        T.save_checkpoint(tmp_path / "plain.pt", TinyCNN(8))
        T.fit(TinyCNN(8), loss, train, val, 2, resume=tmp_path / "plain.pt", progress=False)


def test_early_stopping(tmp_path):
    train, val = linear_task()
    # a learning rate too small to change any prediction: the monitored F1 never improves after epoch 1
    history, best = T.fit(_mlp(dropout=0.0), nn.functional.cross_entropy, train, val, 10, lr=1e-12,
                          patience=2, out_dir=tmp_path, progress=False)
    assert len(history) == 3 and history[-1]["stopped_early"] and not history[0]["stopped_early"]
    assert T.load_checkpoint(best, _mlp())["epoch"] == 1
    # the run is finished: resuming it trains no further epoch (the folder is consistent: nothing to say)
    again, _ = T.fit(_mlp(dropout=0.0), nn.functional.cross_entropy, train, val, 10, lr=1e-12, patience=2,
                     out_dir=tmp_path, resume=tmp_path / "last.pt", progress=False)
    assert again == history
    history, _ = T.fit(_mlp(dropout=0.0), nn.functional.cross_entropy, train, val, 4, lr=1e-2, patience=None,
                       monitor="val_loss", progress=False)
    assert len(history) == 4


def _seen_targets(sampler, seed=0, epochs=1, **kw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g)
    y = (torch.rand(2000, generator=g) < 0.1).long()  # 10% minority
    seen = []

    def loss_fn(out, t):
        if torch.is_grad_enabled():  # training steps only, not validation
            seen.append(t.clone())
        return nn.functional.cross_entropy(out, t)

    T.fit(_mlp(classes=2), loss_fn, TensorDataset(x, y), TensorDataset(x[:100], y[:100]), epochs,
          sampler=sampler, batch_size=250, seed=seed, progress=False, **kw)
    return torch.cat(seen), y


@pytest.mark.parametrize("sampler", ["class_balanced", "oversample"])
def test_samplers_balance_classes(sampler):
    seen, y = _seen_targets(sampler)
    assert seen.numel() == y.numel()  # an epoch draws as many rows as the training set
    assert abs(y.float().mean().item() - 0.1) < 0.03
    frac = seen.float().mean().item()
    # effective number (beta=0.9999) at 1800 / 200 rows weighs classes ~1.09 : 1.01; oversampling 1 : 1
    assert 0.42 < frac < 0.58, frac
    again, _ = _seen_targets(sampler)
    other, _ = _seen_targets(sampler, seed=1)
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_plain_shuffle_keeps_the_distribution():
    seen, y = _seen_targets(None)
    assert torch.equal(seen.sort().values, y.sort().values)  # each row exactly once


@pytest.mark.parametrize("sampler, kw, share", [
    # no sampler: every row weighs 1, times its class's factor: 1800 x 1 against 200 x 9
    (None, {"class_factors": {1: 9.0}}, 0.5),
    # oversampling draws the classes alike; a factor of 3 then gives the minority 3 / 4 of the draws
    ("oversample", {"class_factors": torch.tensor([1.0, 3.0])}, 0.75),
    ("oversample", {"class_factors": {"pos": 3}, "class_names": ["neg", "pos"]}, 0.75),
    ("oversample", {"class_factors": [0, 2.5]}, 1.0),  # a factor of 0 leaves the class out
    ("class_balanced", {"class_factors": {"neg": 0.0}, "class_names": ("neg", "pos")}, 1.0),
])
def test_class_factors_multiply_the_samplers_weights(sampler, kw, share):
    seen, y = _seen_targets(sampler, **kw)
    assert seen.numel() == y.numel()  # still one epoch = as many rows as the training set
    frac = seen.float().mean().item()
    assert abs(frac - share) < 0.05, frac
    if share < 1:  # drawn with replacement: the shuffle would see each row once (a share of 0.1)
        assert torch.equal(seen, _seen_targets(sampler, **kw)[0])
        assert not torch.equal(seen, _seen_targets(sampler, seed=1, **kw)[0])


def test_class_factors_resolve_names_and_indices():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    names = ["HORZ_A", "HORZ_B", "VERT_A"]
    s = T.Sampling(class_factors={"HORZ_B": 5, 2: 3.0})
    assert torch.equal(s.factors(3, names), torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    assert torch.equal(s.row_weights(y, 3, names), torch.tensor([1.0] * 6 + [5.0] * 3 + [3.0], dtype=torch.float64))
    over = T.Sampling("oversample", class_factors=torch.tensor([2, 1, 0]))
    assert torch.allclose(over.row_weights(y, 3), torch.tensor([2 / 6] * 6 + [1 / 3] * 3 + [0.0], dtype=torch.float64))
    assert T.Sampling(class_factors=None).row_weights(y) is None  # the plain shuffle stays one
    assert T.Sampling(class_factors=torch.tensor([1, 2])) == T.Sampling(class_factors=[1.0, 2.0])  # a value


@pytest.mark.parametrize("factors, names, match", [
    ({0: -1.0}, None, r"class_factors\[0\] must be a finite number >= 0, got -1.0"),
    ({"VERT_B": float("nan")}, None, r"class_factors\['VERT_B'\] must be a finite number >= 0, got nan"),
    (torch.tensor([1.0, float("inf"), 1.0]), None, r"class_factors\[1\] must be a finite number >= 0, got inf"),
    ({"HORZ_B": 5}, None, r"class_factors names the class 'HORZ_B', but no class names are known: pass class_names"),
    ({"HORZ_X": 5}, ["a", "b", "c"], r"class_factors: unknown class name 'HORZ_X'; the classes are \['a', 'b', 'c'\]"),
    ({3: 2.0}, None, r"class_factors: class index 3 is out of range for 3 classes"),
    ({-1: 2.0}, None, r"class_factors: class index -1 is out of range"),
    ({"b": 2.0, 1: 3.0}, ["a", "b", "c"], r"class_factors: class 1 is given twice"),
    (torch.ones(2, 3), None, r"class_factors: a \(C,\) tensor of factors, one per class, got shape \(2, 3\)"),
    (torch.ones(4), None, r"class_factors: a tensor of 4 factors, expected one per class \(3,\)"),
    (torch.zeros(3), None, r"class_factors: every class has factor 0"),
    ({0: 0, 1: 0, 2: 0}, None, r"class_factors: every class has factor 0"),
    ({0: 0, 1: 0}, None, r"class_factors: every class present in the training rows \(\[0, 1\]\) has factor 0"),
    ({}, None, r"class_factors is an empty mapping; expected None, a mapping"),
    ("HORZ_B", None, r"class_factors must be None, a mapping \{class name or index: factor\} or a \(C,\) tensor"),
    ({1.5: 2}, None, r"class_factors: key 1.5 is not a class name \(str\) or index \(int\)"),
    ({0: True}, None, r"class_factors\[0\] must be a finite number >= 0, got True"),
])
def test_class_factors_bad_input(factors, names, match):
    train, val = linear_task(200)
    keep = train.tensors[1] < 2  # the training rows hold classes 0 and 1 only; the model has 3 outputs
    train = TensorDataset(train.tensors[0][keep], train.tensors[1][keep])
    with pytest.raises(ValueError, match=match):
        T.fit(_mlp(), nn.functional.cross_entropy, train, val, 1, class_factors=factors, class_names=names,
              progress=False)


def test_class_factors_resume_draws_the_rows_of_the_uninterrupted_run(tmp_path):
    """The sampler's generator is in the checkpoint: epochs 2 and 3 of a run resumed after epoch 1 draw the
    rows, in the order, of the run that was never stopped."""
    train, val = linear_task(1200)

    def run(out, resume=None):
        rows = []

        def record(x, y):
            rows.append((x.clone(), y.clone()))
            return x, y

        T.fit(_mlp(), nn.functional.cross_entropy, train, val, 3, lr=1e-2, batch_size=64, out_dir=out,
              checkpoint_every=1, resume=resume, seed=2, augment=record, class_names=["a", "b", "c"],
              class_factors={"a": 5, 2: 0}, progress=False)
        return rows

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=tmp_path / "a" / "epoch-0001.pt")
    steps = -(-900 // 64)
    assert len(full) == 3 * steps and len(resumed) == 2 * steps
    for (xa, ya), (xb, yb) in zip(full[steps:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    seen = torch.cat([y for _, y in full])
    assert (seen == 2).sum() == 0  # factor 0: never drawn
    counts = torch.bincount(train.tensors[1], minlength=3).double()
    drawn = torch.bincount(seen, minlength=3).double()
    expected = counts[0] * 5 / (counts[0] * 5 + counts[1])
    assert abs(drawn[0] / drawn.sum() - expected) < 0.04


def test_sampling_settings_carry_fits_keywords_and_check_them():
    """Sampling and Checkpointing group fit's keywords: same names, same defaults, the same errors."""
    defaults = {k: p.default for k, p in inspect.signature(T.fit).parameters.items()}
    for group in (T.Sampling, T.Checkpointing):
        fields = {f.name: f.default for f in dataclasses.fields(group)}
        assert fields == {k: defaults[k] for k in fields}, group
    for kw, match in [({"sampler": "balanced"}, "sampler"), ({"beta": 1.0}, "beta"),
                      ({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"),
                      ({"seed": 1.5}, "seed"), ({"class_factors": {0: -1}}, "class_factors")]:
        with pytest.raises(ValueError, match=match):
            T.Sampling(**kw)
    train, val = linear_task(200)
    with pytest.raises(ValueError, match="beta"):  # checked before the first step, sampler or not
        T.fit(_mlp(), nn.functional.cross_entropy, train, val, 1, beta=1.5, progress=False)


def test_sampling_weights_and_epoch_order():
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 0 + [3] * 5)
    over = T.Sampling("oversample").row_weights(y)
    mass = torch.zeros(4, dtype=torch.float64).index_add_(0, y, over)
    assert torch.allclose(mass[[0, 1, 3]], torch.ones(3, dtype=torch.float64))  # every present class alike
    cb = T.Sampling("class_balanced", beta=0.9).row_weights(y)
    assert torch.allclose(cb, fc.class_balanced_weights(torch.bincount(y), 0.9).double()[y])
    assert T.Sampling().row_weights(y) is None
    with pytest.raises(ValueError, match="class-id targets"):
        T.Sampling("oversample").row_weights(torch.rand(5, 2))
    s = T.Sampling(seed=3)
    # the plain shuffle: each row once per epoch, the same order from the same seed, another from another
    first = s.epoch_order(None, 45, 1, 0, 0, s.seed_all())
    assert torch.equal(first.sort().values, torch.arange(45))
    assert torch.equal(first, s.epoch_order(None, 45, 1, 0, 0, s.seed_all()))
    other = T.Sampling(seed=4)
    assert not torch.equal(first, other.epoch_order(None, 45, 1, 0, 0, other.seed_all()))
    # weighted, two ranks: the shards of one global draw of ceil(45 / 2) * 2 rows
    shards = [s.epoch_order(over, 45, 2, r, 0, s.seed_all()) for r in (0, 1)]
    assert shards[0].numel() == shards[1].numel() == 23 and not torch.equal(shards[0], shards[1])
    gen = s.seed_all()
    drawn = torch.cat([s.epoch_order(over, 45, 1, 0, e, gen) for e in range(20)])
    assert 0 <= drawn.min() and drawn.max() < 45
    share = torch.bincount(y[drawn], minlength=4).double() / drawn.numel()
    assert torch.allclose(share[[0, 1, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.07), share
    assert s.steps_per_epoch(45, 2) == 1 and T.Sampling(batch_size=10).steps_per_epoch(45, 2) == 3


def test_checkpointing_settings(tmp_path):
    (tmp_path / "f").write_text("x")
    c = T.Checkpointing(str(tmp_path / "run"), checkpoint_every=2)
    assert c.out_dir == tmp_path / "run" and c.best_path == tmp_path / "run" / "best.pt" and c.resume is None
    assert [e for e in range(1, 7) if c.archives(e)] == [2, 4, 6]
    assert T.Checkpointing().best_path is None and not T.Checkpointing().archives(2)
    with pytest.raises(ValueError, match="out_dir=.* is a file"):
        T.Checkpointing(tmp_path / "f")
    with pytest.raises(ValueError, match="checkpoint_every"):
        T.Checkpointing(tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="resume must be a path"):
        T.Checkpointing(resume=3)
    with pytest.raises(TypeError, match="out_dir must be a path"):
        T.Checkpointing(out_dir=3)
    assert not (tmp_path / "run").exists()  # settings create nothing; fit's lock makes the folder


def test_target_fn_drops_rows_that_do_not_reach_a_stage(blocks):
    train, val = blocks
    seen = []

    def loss_fn(out, t):
        if torch.is_grad_enabled():
            seen.append(t.clone())
        return fc.softmax_focal_loss(out, t)

    history, _ = T.fit(TinyCNN(4), loss_fn, train, val, 1, target_fn=lambda y: fd.stage_targets(y)["ab"],
                       progress=False, class_names=["HORZ_A", "HORZ_B", "VERT_A", "VERT_B"])
    seen = torch.cat(seen)
    ab_rows = (fd.stage_targets(train.dataset.labels[train.indices])["ab"] != fd.IGNORE_INDEX).sum()
    assert seen.numel() == ab_rows and seen.min() >= 0 and seen.max() <= 3
    val_ab = (fd.stage_targets(val.dataset.labels[val.indices])["ab"] != fd.IGNORE_INDEX).sum()
    assert sum(sum(r) for r in history[0]["val"]["confusion"]) == val_ab


def test_freeze_then_unfreeze(tmp_path, blocks):
    train, val = blocks
    model = TinyCNN(2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history, _ = T.fit(model, fc.SoftmaxFocalLoss(), train, val, 2, freeze_epochs=1, out_dir=tmp_path,
                       checkpoint_every=1, monitor="val_loss",
                       target_fn=lambda y: fd.stage_targets(y)["rect"],
                       param_groups={"head": 1e-2, "backbone": 1e-2}, progress=False)
    assert [r["frozen"] for r in history] == [True, False]
    assert set(history[0]["lr"]) == {"head", "backbone"}
    after1 = T.load_checkpoint(tmp_path / "epoch-0001.pt", TinyCNN(2))["model"]
    for k in start:
        frozen_bn = k.startswith(("stem", "layer1"))
        # the backbone (BatchNorm statistics too) is held in epoch 1, the head trains
        assert torch.equal(after1[k], start[k]) == frozen_bn, k
    after2 = T.load_checkpoint(tmp_path / "epoch-0002.pt", TinyCNN(2))["model"]
    assert not torch.equal(after2["stem.0.weight"], start["stem.0.weight"])
    assert all(p.requires_grad for p in model.parameters())  # the flags the model came with


def test_fit_bf16_autocast_and_clipping():
    train, val = linear_task(400)
    history, _ = T.fit(_mlp(), nn.functional.cross_entropy, train, val, 2, amp_dtype=torch.bfloat16,
                       grad_clip=0.5, schedule="onecycle", progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)


@pytest.mark.parametrize("kw, match", [
    ({"schedule": "linear"}, "schedule"), ({"sampler": "balanced"}, "sampler"),
    ({"monitor": "f1"}, "monitor"),
    ({"patience": 0}, "patience"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"),
    ({"amp_dtype": torch.int8}, "amp_dtype"), ({"amp_dtype": torch.float16}, "GradScaler"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"param_groups": [1, 2]}, "param_groups"),
    ({"target_fn": lambda y: torch.full_like(y, -100)}, "no rows"),
    ({"eval_batch_size": 0}, "eval_batch_size must be an int >= 1"),
    ({"num_workers": -1}, "num_workers"),
    ({"lr": float("inf")}, "lr must be finite"), ({"lr": float("nan")}, "lr must be finite"),
    ({"weight_decay": float("nan")}, "weight_decay must be finite"),
    ({"device": "tpu"}, "device='tpu': not a device torch knows"),
    ({"device": "meta"}, "device='meta': meta tensors"),
    ({"device": "cuda:7"}, "device='cuda:7': (no CUDA device is visible|only)"),
    pytest.param({"device": "mps"}, "device='mps': this machine",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is here")),
])
def test_fit_bad_arguments(kw, match):
    train, val = linear_task(200)
    with pytest.raises((ValueError, TypeError), match=match):
        T.fit(_mlp(), nn.functional.cross_entropy, train, val, 1, progress=False, **kw)
    with pytest.raises(ValueError, match="epochs"):
        T.fit(_mlp(), nn.functional.cross_entropy, train, val, 0)


def test_fit_refuses_an_out_dir_that_is_a_file(tmp_path):
    train, val = linear_task(200)
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ValueError, match=r"out_dir=.* (is a file|is under .*f, which is a file)"):
            T.fit(_mlp(), nn.functional.cross_entropy, train, val, 1, out_dir=out, progress=False)
    assert _files(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_model_and_cascade(blocks):
    _, val = blocks
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    s1, s2, rect = TinyCNN(1, 0), TinyCNN(3, 1), TinyCNN(2, 2)
    ab = [TinyCNN(4, 3 + k) for k in range(3)]
    cascade = fc.data.av1_partition_cascade(s1, s2, rect, ab, threshold=0.4).eval()
    rep = T.evaluate(cascade, val, class_names=list(fd.LABEL_NAMES[:8]), batch_size=128)
    assert isinstance(rep, fc.EvaluationReport)
    assert torch.equal(rep.final.confusion, confusion_matrix(cascade.predict(x), y, 8))
    ref = cascade.evaluate(x, y)  # the tensors whole, not the dataset's batches: the same report
    assert rep.to_dict() == ref.to_dict() and rep.reached["stage1"] == 1.0
    assert rep.stages["stage2"].class_names == ("SPLIT", "RECT", "AB")
    json.dumps(rep.to_dict())
    assert "stage rect: reached" in str(rep)
    static = T.evaluate(cascade, (x, y), mode="static", class_names=list(fd.LABEL_NAMES[:8]))
    assert static.to_dict() == rep.to_dict()
    # a single stage, on the rows that reach it
    r = T.evaluate(rect, val, target_fn=lambda t: fd.stage_targets(t)["rect"])
    t = fd.stage_targets(y)["rect"]
    keep = t != fd.IGNORE_INDEX
    with torch.no_grad():
        pred = rect.eval()(x[keep]).argmax(1)
    assert torch.equal(r.confusion, confusion_matrix(pred, t[keep], 2))
    with torch.no_grad():
        bin_pred = (s1(x).reshape(-1) > 0).long()
    assert torch.equal(T.evaluate(s1, (x, y), target_fn=lambda t: fd.stage_targets(t)["stage1"]).confusion,
                       confusion_matrix(bin_pred, fd.stage_targets(y)["stage1"], 2))
    with pytest.raises(TypeError, match="data"):
        T.evaluate(rect, [1, 2, 3])


# ---------------------------------------------------------------------------------------------
# distributed: two CPU processes (gloo) under torchrun

DDP_FACTORS = {0: 5.0, 2: 0.0}
DDP_SCRIPT = f"FACTORS = {DDP_FACTORS!r}\n" + textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    from torch.utils.data import TensorDataset
    import torch.distributed as dist
    from fastcascade import train as T

    torch.set_num_threads(1)
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    train, val = TensorDataset(x[:700], y[:700]), TensorDataset(x[700:], y[700:])
    torch.manual_seed(int(os.environ["RANK"]))  # different initial weights: DDP must broadcast rank 0's
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    trained = []  # the targets of this rank's training rows, in order

    def loss_fn(out, t):
        if torch.is_grad_enabled():
            trained.extend(t.tolist())
        return nn.functional.cross_entropy(out, t)

    sampler = {"none": None, "factors": None}.get(sys.argv[2], sys.argv[2])
    factors = FACTORS if sys.argv[2] == "factors" else None
    history, best = T.fit(model, loss_fn, train, val, 2, lr=1e-2, batch_size=50, sampler=sampler,
                          class_factors=factors, out_dir=out + "/ckpt", progress=False)
    rank = dist.get_rank()
    rep = T.evaluate(model, val)
    json.dump({"world": dist.get_world_size(), "history": history, "best": str(best), "trained": trained,
               "weights": [p.tolist() for p in model.state_dict().values()], "single": rep.final.to_dict()},
              open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["none", "oversample", "factors"])
def test_fit_ddp_two_processes_agree(tmp_path, sampler):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(script), str(tmp_path), sampler], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["weights"] == r1["weights"]  # identical final weights
    same_but_time = [{**h, "seconds": r0["history"][i]["seconds"]} for i, h in enumerate(r1["history"])]
    assert r0["history"] == same_but_time
    # validation metrics are all-reduced: the sharded confusion sums to the full val set, and equal a
    # single-process evaluation of the same (best) weights
    best = max(r0["history"], key=lambda h: h["val"]["macro_f1"])
    assert sum(map(sum, best["val"]["confusion"])) == 200
    assert best["val"]["confusion"] == r0["single"]["confusion"]
    assert r0["history"][-1]["train_loss"] < r0["history"][0]["train_loss"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "history.json", "last.pt"]
    if sampler == "factors":
        # one global weighted draw per epoch, sharded rank by rank: what one process draws with that seed
        g = torch.Generator().manual_seed(0)
        y = (torch.randn(900, 8, generator=g) @ torch.randn(8, 3, generator=g)).argmax(1)[:700]
        s = T.Sampling(seed=0, class_factors=DDP_FACTORS)
        gen, weights = s.seed_all(), s.row_weights(y, 3)
        drawn = [s.epoch_order(weights, 700, 1, 0, e, gen) for e in range(2)]
        for rank, r in enumerate((r0, r1)):
            assert r["trained"] == torch.cat([y[d[rank::2]] for d in drawn]).tolist()
        assert 2 not in r0["trained"] + r1["trained"] and len(r0["trained"]) == len(r1["trained"]) == 700


# ---------------------------------------------------------------------------------------------
# the demo


def _demo(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fastcascade", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = _demo(["demo", "--quick", "--out", str(out), "--no-progress", "--seeds", "2", "--ablation", "stage1"],
              tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for text in ("== designs on the 2000 test blocks, at operating points tuned on val on FLOPs and on latency",
                 "blocks/s", "always NONE", "equal the dense oracle for every design: True", "######## seed 1 (2 of 2)",
                 "== over 2 seeds (0, 1): mean ± std on test", "target (mean macro F1 >= flat's, >= 1.5x",
                 "== the plan's stage table", "plan v5", "== Stage 1: temperature fitted on val",
                 "== Stage 1's threshold chosen on val three ways", "== Stage-1 ablation"):
        assert text in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["quick"] and m["config"]["train_blocks"] == 4000 and m["config"]["val_blocks"] == 2000
    assert m["config"]["test_blocks"] == 2000 and m["config"]["seeds"] == [0, 1] and set(m["seeds"]) == {"0", "1"}
    designs = m["designs"]
    names = ["v6-trunk", "v6-own", "gate", "exits", *(f"raw{w}" for w in m["config"]["raw_gate_widths"]),
             f"raw{max(m['config']['raw_gate_widths'])}-v6"]
    assert set(designs) == {"flat"} | {f"{n}@{way}" for n in names for way in ("flops", "latency")}
    for name, d in designs.items():
        final = d["test"]["final"]
        assert final["class_names"] == list(fd.LABEL_NAMES[:8]) and sum(map(sum, final["confusion"])) == 2000
        assert 0 <= d["macro_f1"] <= 1 and d["flops_per_block"] > 0 and d["blocks_per_s"] > 0, name
        assert d["predicted_blocks_per_s"] > 0 and d["batch_size"] == 512, name  # --quick times one batch size
        assert d["predicted_throughput_ratio"] == pytest.approx(
            d["predicted_blocks_per_s"] / designs["flat"]["predicted_blocks_per_s"])
        if name == "flat":
            continue
        assert d["throughput_ratio"] > 0 and d["routing_matches_dense"] is True and d["setting"]
        costs = [p["cost"] for p in d["frontier_val"]]
        assert costs == sorted(costs) and max(d["test"]["reached"].values()) == 1.0  # the root
        assert d["cost_unit"] == ("FLOPs per row" if name.endswith("@flops") else "seconds per row")
        # the chosen point: tuned for val macro F1 within the budget (a fraction of the flat model's cost, in the
        # way's unit; several rules end at a coordinate optimum, at most the best scored point within it), else
        # the best point of the frontier
        within = [p for p in d["frontier_val"] if p["cost"] <= d["budget"]]
        cost = d["val"]["flops_per_block" if name.endswith("@flops") else "seconds_per_block"]
        assert d["within_budget"] == bool(within), name
        if within:
            assert cost <= d["budget"] and d["val"]["macro_f1"] <= within[-1]["macro_f1"] + 1e-12, name
        else:
            assert d["val"]["macro_f1"] == d["frontier_val"][-1]["macro_f1"], name
        if name.endswith("@flops"):
            assert d["budget"] == pytest.approx(designs["flat"]["val"]["flops_per_block"] / (1.5 * 1.15))
        if name.endswith("@latency"):
            assert len(d["frontier_val_timed"]) >= 1
    own = designs["v6-own@flops"]["test"]["reached"]
    assert own["stage1"] == 1.0 and 0 <= own["rect"] + own["ab"] <= own["stage2"] <= 1
    gate = designs["gate@latency"]["test"]
    assert gate["parts_reached"]["layer1"] == 1.0 and gate["parts_reached"]["layer3"] == gate["reached"]["flat"]
    raw = designs[f"raw{m['config']['raw_gate_widths'][0]}@latency"]
    assert raw["flops_per_block"] < designs["flat"]["flops_per_block"] or raw["test"]["reached"]["flat"] == 1.0
    assert 0.5 < m["always_none"]["accuracy"] < 0.8
    # the aggregate over the two seeds agrees with the seeds' own numbers
    agg = m["aggregate"]
    for key in designs:
        values = [m["seeds"][s]["designs"][key]["macro_f1"] for s in ("0", "1")]
        assert agg[key]["macro_f1"]["values"] == values
        assert agg[key]["macro_f1"]["mean"] == pytest.approx(sum(values) / 2)
    assert set(m["target"]["ratios"]) == set(designs) - {"flat"}
    assert m["summary"]["flat_training_rows"] >= 0.5 * m["summary"]["cascade_training_rows"]
    assert set(m["throughput_blocks_per_s"]) == set(designs) and m["routing_matches_dense"] is True
    # the stage table of every design is its final confusion's: the 8-class scores agree with the evaluation's
    for name, d in designs.items():
        assert d["stage_table"]["rows"] == 2000 and d["stage_table"]["accuracy"] == pytest.approx(d["accuracy"])
        assert d["stage_table"]["macro_f1"] == pytest.approx(d["macro_f1"]), name
    assert set(m["stage_tables"]) == set(designs)
    assert m["stage_tables"]["flat"]["macro_f1"]["values"] == [m["seeds"][s]["designs"]["flat"]["macro_f1"]
                                                               for s in ("0", "1")]
    stage1 = m["seeds"]["0"]["stage1"]
    assert set(stage1["calibration"]) == {"v6-own stage1", "trunk stage1"} | {f"raw{w}" for w in
                                                                              m["config"]["raw_gate_widths"]}
    assert all(c["temperature"] > 0 and 0 <= c["ece_after"] <= 1 for c in stage1["calibration"].values())
    for design in ("v6-trunk", "v6-own"):
        ways = stage1["thresholds"][design]
        sweep = ways.pop("sweep")
        assert list(ways) == ["stage-1 F1 (v5)", "precision", "end to end"]
        assert 0.40 - 1e-9 <= ways["stage-1 F1 (v5)"]["threshold"] <= 0.70 + 1e-9
        # the sweep's final labels (NONE below the threshold, the sent-on labels above) agree with the cascade's
        # own routing wherever a way's threshold falls on the sweep's grid; the curves are in [0, 1]
        assert len(sweep["threshold"]) == 49 and all(0 <= v <= 1 for v in sweep["macro_f1"] + sweep["contamination"])
        for w in ways.values():
            for t, f1 in zip(sweep["threshold"], sweep["macro_f1"]):
                if abs(t - w["threshold"]) < 1e-12:
                    assert f1 == pytest.approx(w["table"]["macro_f1"])
        for w in ways.values():
            # Stage 2 never answers NONE, so the rows it received are the rows predicted a partition: the
            # contamination measured on Stage 1's routing is 1 - the Stage-1 precision of the final labels
            t = w["table"]
            assert t["rows"] == 2000 and w["contamination"] == pytest.approx(1 - t["stage1_precision"])
            assert w["reach_stage2"] * 2000 * t["stage1_precision"] == pytest.approx(
                t["stage1_recall"] * t["partition_rows"])
    ablation = stage1["ablation"]
    assert list(ablation) == ["recipe", "no alpha", "no mining", "no sampler"]
    assert ablation["no alpha"]["recipe"]["alpha"] is None and ablation["no sampler"]["recipe"]["sampler"] is None
    assert ablation["recipe"]["recipe"] == {"alpha": 0.25, "gamma": 2.5, "hard_negative_ratio": 3.0,
                                            "sampler": "oversample"}
    assert m["stage1_aggregate"]["ablation"]["no mining"]["table"]["stage1_f1"]["values"] == [
        m["seeds"][s]["stage1"]["ablation"]["no mining"]["table"]["stage1_f1"] for s in ("0", "1")]
    own_models = {"stage1", "stage2", "rect", "ab1", "ab2", "ab3", "flat"}
    heads = {f"trunk_{k}" for k in ("stage1", "stage2", "rect", "ab1", "ab2", "ab3", "exit1", "exit2")}
    gates = {f"gate{w}" for w in m["config"]["raw_gate_widths"]}
    ablated = {"ablation_no_alpha", "ablation_no_mining", "ablation_no_sampler"}
    assert set(m["history"]) == own_models | heads | gates | ablated
    # fit's diagnostics, gathered per model (2 epochs: some best epochs are the first)
    assert m["training_warnings"] == [{"model": k, **w} for k, h in m["history"].items() for r in h
                                      for w in r["warnings"]]
    assert all(w["kind"] in ("collapse", "best_epoch_first", "drop_after_unfreeze") for w in m["training_warnings"])
    assert m["seeds"]["0"]["training_warnings"] == m["training_warnings"]
    assert isinstance(m["seeds"]["1"]["training_warnings"], list)
    for seed in ("seed-0", "seed-1"):
        for png in ("frontier.png", "confusion_flat.png", "confusion_v6-own.png", "confusion_gate.png",
                    "learning_curves.png", "confusion_v6-trunk_stage_stage2.png", "stage1_thresholds.png"):
            assert (out / seed / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for stage in own_models | heads | gates:
            assert (out / seed / "checkpoints" / stage / "best.pt").is_file()
    assert _files(tmp_path) == ["run"]  # no partial folder left next to it


def test_demo_bad_input(tmp_path, capsys):
    from fastcascade.__main__ import main

    r = _demo(["demo", "--quick", "--epochz", "3"], tmp_path)  # the real command line, once
    assert r.returncode == 2 and "unrecognized arguments: --epochz" in r.stderr
    with pytest.raises(SystemExit) as e:
        main(["demo", "--epochs", "0"])
    assert e.value.code == 2 and "argument --epochs: expected an int >= 1, got 0" in capsys.readouterr().err

    def fails(args, message):
        assert main(["demo", "--quick", "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err  # one line

    o = ["--out", str(tmp_path / "o")]
    fails(["--data", str(tmp_path / "nowhere"), *o], "nowhere: no such file")
    (tmp_path / "bad" / "16x16").mkdir(parents=True)
    (tmp_path / "bad" / "16x16" / "train.pt").write_bytes(b"garbage")
    fails(["--data", str(tmp_path / "bad"), *o], "train.pt: could not be read")
    zeros = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    fd.save_block_dataset(tmp_path / "lab" / "16x16" / "train.pt", zeros, torch.tensor([0, 1, 9, 2]))
    fd.save_block_dataset(tmp_path / "lab" / "16x16" / "val.pt", zeros, torch.tensor([0, 1, 2, 3]))
    fails(["--data", str(tmp_path / "lab"), *o], "'labels' must be in [0, 8)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    fails(["--out", str(tmp_path / "full")], "not empty")
    fails(["--backbone", "resnet18", "--stem-stride", "2", *o], "--stem-stride applies to the small-cnn backbone only")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--stem-stride", "3"])
    assert e.value.code == 2 and "argument --stem-stride: invalid choice: 3" in capsys.readouterr().err
    if not torch.cuda.is_available():
        fails(["--device", "cuda", *o], "--device cuda: no CUDA device is visible")
    for device, message in (("tpu", "not a device torch knows"), ("meta", "meta tensors"), ("mps", "this machine")):
        if device != "mps" or not torch.backends.mps.is_available():
            fails(["--device", device, *o], f"--device {device}: {message}")
    (tmp_path / "afile").write_text("x")
    fails(["--out", str(tmp_path / "afile")], "afile: is a file")
    fails(["--out", str(tmp_path / "afile" / "run")], "afile is a file")
    fails(["--data", str(tmp_path / "lab" / "16x16" / "val.pt"), *o], "a file; pass the dataset folder")
    assert sorted(_files(tmp_path)) == ["afile", "bad", "full", "lab"]  # nothing written for any failed run
    assert _files(tmp_path / "full") == ["keep.txt"]


def test_demo_timing_covers_every_row_in_batches_keeps_the_fastest_size_and_takes_median_ratios():
    from fastcascade.demo.timing import timed_in_turns

    seen, order = {}, []

    def record(name, sleep=0.0):
        def fn(x):
            seen.setdefault(name, []).append(x.shape[0])
            order.append(name)
            if name == "slow_big" and x.shape[0] > 100:
                time.sleep(0.02)  # big batches are slow for this one: its best size is the small one
            time.sleep(sleep)
            return x
        return fn

    x = torch.zeros(250, 3)
    fns = {"slow_big": record("slow_big"), "plain": record("plain"), "slower": record("slower", 0.004)}
    out = timed_in_turns(fns, x, torch.device("cpu"), 3, (100, 4096), reference="plain")
    assert out["slow_big"]["batch_size"] == 100 and set(out) == set(fns)
    # each pass covers all 250 rows: 100, 100, 50 and one of 250 (4096 capped at the split); a warm-up and 3 rounds
    assert sorted(set(seen["plain"])) == [50, 100, 250] and sum(seen["plain"]) == 4 * (250 + 250)
    # in turns: within a round every (fn, size) runs once before any runs again
    assert order[-12:].count("plain") == 4 and order[-12:].count("slower") == 4
    assert out["plain"]["ratio"] == 1.0 and out["slower"]["ratio"] < 1.0  # time per pass: 3 or 4 calls of 4 ms
    assert out["plain"]["seconds_per_block"] == pytest.approx(1 / out["plain"]["blocks_per_s"] , rel=1e-12)
    one = timed_in_turns({"plain": record("plain")}, x, torch.device("cpu"), 1, 64)
    assert one["plain"]["batch_size"] == 64 and one["plain"]["ratio"] is None


@pytest.mark.parametrize("shape,cells", [((5, 3, 8, 8), 4), ((2, 64, 4, 4), 2), ((3, 2, 6, 9), 3), ((1, 1, 5, 5), 2)])
def test_demo_grid_pool_equals_adaptive_average_pooling(shape, cells):
    from fastcascade.demo.models import GridPool

    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(GridPool(cells)(x), nn.functional.adaptive_avg_pool2d(x, cells))  # (5, 5): fallback
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(GridPool(cells)(x32), nn.functional.adaptive_avg_pool2d(x32, cells))


def test_demo_small_cnn_stem_stride_moves_layer1s_stride_into_the_stem():
    from torch.utils.flop_counter import FlopCounterMode

    from fastcascade.demo.models import SmallCNN

    x = torch.rand(2, 1, 16, 16)
    flops, shapes = {}, {}
    for stride in (1, 2):
        model = SmallCNN(8, stem_stride=stride).eval()
        shapes[stride] = (model.stem(x).shape, model.layer1(model.stem(x)).shape, model(x).shape)
        with FlopCounterMode(display=False) as counter:
            model(x)
        flops[stride] = counter.get_total_flops()
    assert shapes[1] == ((2, 16, 16, 16), (2, 32, 8, 8), (2, 8))
    assert shapes[2] == ((2, 16, 8, 8), (2, 32, 8, 8), (2, 8))  # the taps after layer1 see the same shapes
    assert abs(flops[2] / flops[1] - 1) < 0.03
    for bad in (0, 3, 1.5):
        with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
            SmallCNN(8, stem_stride=bad)


def test_a_dataset_that_follows_the_labelled_protocol_is_read_in_batches():
    """Any dataset with an int64 `labels` tensor and batch_indexing = True is read without per-item calls
    (what PartitionDataset does, without fastcascade.train knowing the class)."""
    from fastcascade.train.batches import LabelledDataset, labels_of, loader

    class Blocks(torch.utils.data.Dataset):
        batch_indexing = True

        def __init__(self, n):
            self.x, self.labels, self.calls = torch.rand(n, 1, 4, 4), torch.arange(n) % 3, []

        def __len__(self):
            return self.labels.shape[0]

        def __getitem__(self, i):
            self.calls.append(i)
            return self.x[i], self.labels[i]

    ds = Blocks(10)
    assert isinstance(ds, LabelledDataset) and isinstance(fd.PartitionDataset(ds.x, ds.labels), LabelledDataset)
    assert torch.equal(labels_of(ds), ds.labels) and ds.calls == []
    shapes = [tuple(x.shape) for x, _ in loader(ds, list(range(10)), 4, 0)]
    assert shapes == [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)] and len(ds.calls) == 3  # one call per batch
    ds.batch_indexing = False  # plain item access and a collate
    assert [tuple(x.shape) for x, _ in loader(ds, list(range(10)), 4, 0)][0] == (4, 1, 4, 4)
    assert len(ds.calls) == 13
