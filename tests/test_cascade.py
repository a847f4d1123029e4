"""The Cascade API: dynamic and static modes against the dense oracle, details, evaluation, bad input."""

import pytest
import torch
from conftest import HAS_CUDA, gpu, needs_cuda
from torch import nn

import fastcascade as fc
from fastcascade import reference
from fastcascade.cascade import (
    AV1_PARTITION_NAMES,
    Argmax,
    Cascade,
    Confident,
    Ensemble,
    Leaf,
    Stage,
    Threshold,
    cascade_dense,
)


def _head(out: int, gen: torch.Generator, bias=None) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, out))
    with torch.no_grad():
        m[1].weight.copy_(torch.randn(out, 16, generator=gen))
        m[1].bias.copy_(torch.randn(out, generator=gen) if bias is None else torch.tensor(bias, dtype=torch.float32))
    return m.eval()


def _av1(seed: int, threshold=0.5, stage2_bias=None, vote="hard") -> Cascade:
    gen = torch.Generator().manual_seed(seed)
    return Cascade.av1_partition(_head(1, gen), _head(3, gen, stage2_bias), _head(2, gen),
                                 [_head(4, gen) for _ in range(3)], threshold=threshold, vote=vote)


def _blocks(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [0, 1, 7, 200])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_av1_cascade_equals_the_dense_oracle(n, threshold):
    """threshold 0 sends everything past stage 1, 1 sends nothing, 0.5 some; every mode equals the oracle."""
    c = _av1(1, threshold)
    x = _blocks(n)
    dense = cascade_dense(c, x)
    assert dense.shape == (n,) and (n == 0 or dense.min() >= 0)
    for mode in ["dynamic", "static"]:
        labels = c.predict(x, mode=mode)
        assert labels.dtype == torch.int64
        assert torch.equal(labels, dense), mode
    if n and threshold == 1.0:
        assert (dense == 0).all()
    if n and threshold == 0.0:
        assert (dense != 0).all()


@pytest.mark.parametrize("bias,label_set", [([9.0, -9, -9], {3}), ([-9.0, 9, -9], {1, 2}), ([-9.0, -9, 9], {4, 5, 6, 7})])
def test_empty_branches(bias, label_set):
    """stage 2 biased so one branch takes every row and the others are empty."""
    c = _av1(2, threshold=0.0, stage2_bias=bias)
    x = _blocks(50, 3) * 0.01
    for mode in ["dynamic", "static"]:
        labels = c.predict(x, mode=mode)
        assert set(labels.tolist()) <= label_set
        assert torch.equal(labels, cascade_dense(c, x))


def test_many_random_cascades_match_the_oracle():
    for seed in range(12):
        c = _av1(seed, threshold=[0.2, 0.5, 0.8][seed % 3], vote=["hard", "soft"][seed % 2])
        x = _blocks(97, seed)
        dense = cascade_dense(c, x)
        assert len(set(dense.tolist())) >= 3  # the test routes rows to several leaves
        assert torch.equal(c.predict(x), dense)
        assert torch.equal(c.predict(x, mode="static"), dense)


def test_confident_rule_and_a_general_tree():
    gen = torch.Generator().manual_seed(5)
    inner = Stage(_head(3, gen), Argmax(), [Leaf(10), 11, 12], name="inner")
    root = Stage(_head(2, gen), Confident(tau=0.9), [Leaf(0), Leaf(1), inner], name="root")
    c = Cascade(root)
    assert c.num_classes == 13 and c.node_names == ["root", "inner"]
    x = _blocks(300, 6)
    dense = cascade_dense(c, x)
    assert {0, 1} & set(dense.tolist()) and {10, 11, 12} & set(dense.tolist())
    for mode in ["dynamic", "static"]:
        assert torch.equal(c.predict(x, mode=mode), dense)


def test_details_exit_stage_and_probs():
    c = _av1(7, 0.5)
    x = _blocks(120, 8)
    for mode in ["dynamic", "static"]:
        out = c.predict(x, mode=mode, return_details=True)
        names = [c.node_names[i] for i in out.exit_stage.tolist()]
        for lab, name in zip(out.labels.tolist(), names):
            expected = {0: "stage1", 3: "stage2", 1: "rect", 2: "rect"}.get(lab, "ab")
            assert name == expected, (AV1_PARTITION_NAMES[lab], name)
        assert torch.isfinite(out.probs["stage1"]).all()
        reached_rect = out.reached(c, "rect")
        assert torch.isnan(out.probs["rect"][~reached_rect]).all()
        assert torch.isfinite(out.probs["rect"][reached_rect]).all()
        torch.testing.assert_close(out.probs["rect"][reached_rect].sum(1), torch.ones(int(reached_rect.sum())))
        assert torch.equal(out.reached(c, "stage2"), out.labels != 0)


def test_evaluate_reports_routing_and_stage_quality():
    c = _av1(9, 0.5)
    x = _blocks(400, 10)
    truth = torch.randint(0, 8, (400,), generator=torch.Generator().manual_seed(1))
    rep = c.evaluate(x, truth)
    pred = c.predict(x)
    assert rep["accuracy"] == pytest.approx((pred == truth).float().mean().item())
    assert rep["reached"]["stage1"] == 1.0
    assert rep["reached"]["stage2"] == pytest.approx((pred != 0).float().mean().item())
    assert rep["reached"]["rect"] + rep["reached"]["ab"] <= rep["reached"]["stage2"] + 1e-9
    cm = rep["confusion"]["stage1"]
    assert cm.shape == (2, 2) and cm.sum() == 400  # every row reaches stage 1 and its truth is under it
    assert rep["confusion"]["ab"].shape == (4, 4)
    for name, v in rep["cascade_error"].items():
        assert 0 <= v["standalone_accuracy"] <= 1 and 0 <= v["in_cascade_accuracy"] <= 1, name
    # the stage-1 standalone accuracy is its binary accuracy on all rows
    s1 = reference.route_threshold(c.root.module(x).reshape(-1), 0.5)
    assert rep["cascade_error"]["stage1"]["standalone_accuracy"] == pytest.approx(
        (s1.long() == (truth != 0).long()).float().mean().item())


def test_stage_targets_follow_the_tree():
    c = _av1(0)
    t = c.stage_targets(torch.arange(8))
    assert t["stage1"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert t["stage2"].tolist() == [-1, 1, 1, 0, 2, 2, 2, 2]
    assert t["rect"].tolist() == [-1, 0, 1, -1, -1, -1, -1, -1]
    assert t["ab"].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]


def test_bad_input_names_the_stage():
    gen = torch.Generator().manual_seed(0)
    x = _blocks(5)
    c = Cascade.av1_partition(_head(2, gen), _head(3, gen), _head(2, gen), [_head(4, gen)])
    with pytest.raises(ValueError, match="stage 'stage1'.*one logit"):
        c.predict(x)
    c = Cascade.av1_partition(_head(1, gen), _head(4, gen), _head(2, gen), [_head(4, gen)], threshold=0.0)
    with pytest.raises(ValueError, match="stage 'stage2'.*3 children"):
        c.predict(x)
    c = Cascade.av1_partition(_head(1, gen), _head(3, gen), _head(2, gen), [_head(3, gen)], threshold=0.0)
    c.root.kids[1].module[1].bias.data = torch.tensor([-9.0, -9.0, 9.0])  # everything to AB
    with pytest.raises(ValueError, match="ensemble 'ab'.*member 0 must output"):
        c.predict(x * 0.01)
    with pytest.raises(ValueError, match="branch 1 has no child"):
        Stage(_head(1, gen), Threshold(), [0, None], name="s")
    with pytest.raises(ValueError, match="Threshold rule has 2 branches"):
        Stage(_head(1, gen), Threshold(), [0, 1, 2], name="s")
    with pytest.raises(ValueError, match="mode must be"):
        _av1(0).predict(x, mode="fast")
    with pytest.raises(ValueError, match="stage names must be unique"):
        Cascade(Stage(_head(2, gen), Argmax(), [0, Stage(_head(2, gen), Argmax(), [1, 2], name="a")], name="a"))
    with pytest.raises(ValueError, match="labels must be in"):
        _av1(0).evaluate(x, torch.tensor([0, 1, 2, 3, 8]))
    with pytest.raises(ValueError, match="stage 'stage1' is on cpu"):
        _av1(0).predict(x.to("meta"))


def test_exported():
    assert fc.Cascade is Cascade and fc.Stage is Stage and fc.Ensemble is Ensemble


@gpu
@needs_cuda
def test_static_mode_never_syncs_and_captures_in_a_graph():
    c = _av1(3, 0.5).cuda()
    x = _blocks(256, 4).cuda()
    dense = cascade_dense(c, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        labels = c.predict(x, mode="static")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(labels, dense)
    run = c.capture(256, x)
    assert torch.equal(run(x), dense)
    x2 = _blocks(256, 5).cuda()
    assert torch.equal(run(x2), cascade_dense(c, x2))


@gpu
@needs_cuda
def test_dynamic_mode_on_gpu_matches():
    assert HAS_CUDA
    c = _av1(4, 0.5).cuda()
    x = _blocks(1000, 6).cuda()
    assert torch.equal(c.predict(x), cascade_dense(c, x))
