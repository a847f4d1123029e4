"""fastcascade.demo.gate: the raw-block gate (Stage 1 before any backbone) and its training."""

import pathlib
from types import SimpleNamespace

import pytest
import torch

from fastcascade import data as fd
from fastcascade import flops_per_row
from fastcascade.demo.context import NUM_LABELS, Run, blocks_of, labels_of
from fastcascade.demo.gate import GATE_RECIPE, GATE_WIDTHS, RawGate, train_raw_gates
from fastcascade.demo.models import SmallCNN
from fastcascade.inference import fold_batchnorms, inference_form

EXAMPLE = torch.zeros(1, 1, 16, 16)


def _blocks(n: int, seed: int) -> fd.PartitionDataset:
    """A Stage-1 target the variance cannot tell and every dihedral transform keeps: NONE rows are noise in
    4x4 cells, the others noise per pixel of the same amplitude (the same variance, more detail)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    labels[: n // 2] = 0  # about half NONE, as in the real data
    fine = torch.rand(n, 1, 16, 16, generator=g)
    cells = torch.rand(n, 1, 4, 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    # an amplitude of 0.1: the log variance of real blocks' middle range (the gate's input is centred there)
    x = 0.45 + 0.1 * torch.where((labels == 0).view(n, 1, 1, 1), cells, fine)
    return fd.PartitionDataset((x * 255).round().to(torch.uint8), labels, num_classes=NUM_LABELS)


def _run(tmp_path: pathlib.Path, seed: int = 0, epochs: int = 3) -> Run:
    args = SimpleNamespace(seed=seed, batch_size=64, progress=False)
    train, val = _blocks(512, seed + 1), _blocks(256, seed + 2)
    return Run(args, train, val, val, torch.device("cpu"), "small-cnn", epochs, None, True, tmp_path)


@pytest.mark.parametrize("width", [1, 4, 8])
@pytest.mark.parametrize("variance", [True, False])
def test_raw_gate_gives_one_logit_per_row(width, variance):
    gate = RawGate(width, variance).eval()
    out = gate(torch.rand(5, 1, 16, 16))
    assert out.shape == (5, 1) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("width", GATE_WIDTHS)
def test_the_demo_gates_cost_under_5_percent_of_the_flat_models_flops(width):
    flat = flops_per_row(SmallCNN(NUM_LABELS), EXAMPLE)
    gate = flops_per_row(RawGate(width), EXAMPLE)
    assert 0 < gate < 0.05 * flat, (gate, flat)


def test_the_variance_input_is_the_blocks_log_variance_flat_blocks_included():
    x = torch.rand(6, 1, 16, 16)
    x[0], x[1], x[2] = 0.7, 1.0, 250 / 255  # flat blocks: rounding in E[x^2] - E[x]^2 must not go negative
    want = torch.log(x.double().flatten(1).var(1, unbiased=False) + 1e-4).unsqueeze(1).float()
    got = RawGate(2).log_variance(x) * 2.0 - 7.0  # undo the standardisation
    # float32 rounding of E[x^2] - E[x]^2: ~1e-8 in the variance, under 1e-3 in its log above the 1e-4 floor
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_the_variance_input_stays_float32_under_bf16_autocast():
    """The demo trains under bf16 autocast on a GPU: E[x^2] - E[x]^2 in bf16 would swamp most variances."""
    x = 0.88 + 0.03 * torch.rand(8, 1, 16, 16)  # a bright block of a typical variance, ~1e-4
    gate = RawGate(2)
    want = gate.log_variance(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate.log_variance(x)
        assert gate(x).shape == (8, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_the_gate_folds_into_its_inference_form():
    gate = RawGate(4)
    gate.train()
    for _ in range(3):  # running statistics away from their initial values
        gate(torch.rand(64, 1, 16, 16))
    x = torch.rand(32, 1, 16, 16)
    gate.eval()
    before = gate(x)
    served = inference_form(gate, x)  # checked against the gate on x
    norms = [m for m in served.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not norms and fold_batchnorms(served) == 0  # both were folded into their convolutions
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in gate.modules()) == 2  # the gate keeps its own
    torch.testing.assert_close(served(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [0, -3, 2.0, True, "4", None])
def test_a_bad_width_raises_naming_it(width):
    with pytest.raises(ValueError, match="width"):
        RawGate(width)


def test_train_raw_gates_checks_every_width_before_training(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ValueError, match="width"):
        train_raw_gates(run, widths=(4, 0))
    with pytest.raises(ValueError, match="widths"):
        train_raw_gates(run, widths=(4, 4))
    assert run.histories == {}


@torch.no_grad()
def _stage1_quality(gate: RawGate, ds) -> tuple[float, float]:
    """(loss, accuracy) of the gate's Stage-1 decisions on ds."""
    gate.eval()
    t = fd.stage_targets(labels_of(ds))["stage1"]
    logits = gate(blocks_of(ds))
    return float(GATE_RECIPE.loss(logits, t)), float(((logits.reshape(-1) > 0).long() == t).float().mean())


@pytest.mark.parametrize("variance", [True, False])
def test_training_learns_a_learnable_stage1_target(tmp_path, variance):
    """The convolutions learn what the variance input cannot tell."""
    run = _run(tmp_path, epochs=6)
    torch.manual_seed(run.args.seed + 70)  # the untrained gate train_raw_gates starts from
    loss0, acc0 = _stage1_quality(RawGate(4, variance), run.val)
    gates = train_raw_gates(run, widths=(4, 2), variance=variance, batch_size=32)
    assert list(gates) == [4, 2] and all(isinstance(g, RawGate) and g.variance == variance for g in gates.values())
    loss, acc = _stage1_quality(gates[4], run.val)
    assert loss < 0.5 * loss0 and acc > 0.9 and acc > acc0, (loss0, loss, acc0, acc)
    for key in ("gate4", "gate2"):  # recorded like the demo's other models
        assert len(run.histories[key]) == run.epochs and run.rows[key] == len(run.train) * run.epochs
        assert (run.work / "checkpoints" / key / "best.pt").is_file() and f"train_{key}_s" in run.timing


def _state(gates: dict) -> dict:
    return {(w, k): v.clone() for w, g in gates.items() for k, v in g.state_dict().items()}


def test_training_is_deterministic_under_a_seed(tmp_path):
    a = _state(train_raw_gates(_run(tmp_path / "a", epochs=1), widths=(4,)))
    b = _state(train_raw_gates(_run(tmp_path / "b", epochs=1), widths=(4,)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _state(train_raw_gates(_run(tmp_path / "c", seed=1, epochs=1), widths=(4,)))
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed is what made them equal


def test_epochs_and_batch_size_reach_fit(tmp_path):
    run = _run(tmp_path)
    train_raw_gates(run, widths=(2,), epochs=1, batch_size=256)
    assert len(run.histories["gate2"]) == 1
