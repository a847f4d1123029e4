"""The Cascade API: dynamic and static modes against the dense oracle, details, evaluation, bad input."""

import pytest
import torch
from conftest import HAS_CUDA, gpu, needs_cuda
from torch import nn

import fastcascade as fc
from fastcascade import reference
from fastcascade.cascade import (
    Argmax,
    Cascade,
    Confident,
    Ensemble,
    Leaf,
    Stage,
    Threshold,
    cascade_dense,
)
from fastcascade.cascade.buckets import row_bucket
from fastcascade.data import LABEL_NAMES, av1_partition_cascade


def _head(out: int, gen: torch.Generator, bias=None) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, out))
    with torch.no_grad():
        m[1].weight.copy_(torch.randn(out, 16, generator=gen))
        m[1].bias.copy_(torch.randn(out, generator=gen) if bias is None else torch.tensor(bias, dtype=torch.float32))
    return m.eval()


def _av1(seed: int, threshold=0.5, stage2_bias=None, vote="hard") -> Cascade:
    gen = torch.Generator().manual_seed(seed)
    return av1_partition_cascade(_head(1, gen), _head(3, gen, stage2_bias), _head(2, gen),
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
            assert name == expected, (LABEL_NAMES[lab], name)
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
    rep = c.evaluate(x, truth, batch_size=128)  # four batches, the last one short
    pred = c.predict(x)
    assert rep.accuracy == pytest.approx((pred == truth).float().mean().item())
    assert rep.reached["stage1"] == 1.0
    assert rep.reached["stage2"] == pytest.approx((pred != 0).float().mean().item())
    assert rep.reached["rect"] + rep.reached["ab"] <= rep.reached["stage2"] + 1e-9
    cm = rep.stages["stage1"].confusion
    assert cm.shape == (2, 2) and cm.sum() == 400  # every row reaches stage 1 and its truth is under it
    assert rep.stages["ab"].confusion.shape == (4, 4)
    assert rep.stages["stage2"].class_names == ("SPLIT", "RECT", "AB")
    for name, v in rep.cascade_error.items():
        assert 0 <= v["standalone_accuracy"] <= 1 and 0 <= v["in_cascade_accuracy"] <= 1, name
    # the stage-1 standalone accuracy is its binary accuracy on all rows
    s1 = reference.route_threshold(c.root.module(x).reshape(-1), 0.5)
    assert rep.cascade_error["stage1"]["standalone_accuracy"] == pytest.approx(
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
    c = av1_partition_cascade(_head(2, gen), _head(3, gen), _head(2, gen), [_head(4, gen)])
    with pytest.raises(ValueError, match="stage 'stage1'.*one logit"):
        c.predict(x)
    c = av1_partition_cascade(_head(1, gen), _head(4, gen), _head(2, gen), [_head(4, gen)], threshold=0.0)
    with pytest.raises(ValueError, match="stage 'stage2'.*3 children"):
        c.predict(x)
    c = av1_partition_cascade(_head(1, gen), _head(3, gen), _head(2, gen), [_head(3, gen)], threshold=0.0)
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


# ---------------------------------------------------------------------------------------------
# shared trunks: stages tap segments, each segment runs once per row that needs it


from cascade_trees import random_cascade, random_input  # noqa: E402


@pytest.mark.parametrize("seed", range(16))
def test_random_trees_with_taps_equal_the_dense_oracle(seed):
    c = random_cascade(seed)
    for n in (0, 1, 7, 200):
        x = random_input(n, seed)
        dense = cascade_dense(c, x)
        for mode in ("dynamic", "static"):
            out = c.predict(x, mode=mode, return_details=True)
            assert torch.equal(out.labels, dense), (mode, n)
            assert torch.equal(c.predict(x, mode=mode), dense)
            if n:
                assert (out.exit_stage >= 0).all()


def test_random_trees_route_rows_through_the_trunk():
    """The random trees above are not trivial: most have taps, and rows end at several leaves."""
    tapped = 0
    for seed in range(16):
        c = random_cascade(seed)
        tapped += any(p.tap >= 0 for p in c.plan.values())
    assert tapped >= 8
    c = random_cascade(3)
    assert len(set(cascade_dense(c, random_input(200, 3)).tolist())) >= 3


def _depth_of_exit(c, exit_stage):
    return torch.tensor([c.plan[c.node_names[i]].depth for i in exit_stage.tolist()])


@pytest.mark.parametrize("seed", range(12))
def test_each_segment_runs_once_for_exactly_the_rows_routed_past_it(seed):
    """Exact row counts with row_buckets=0; with buckets, every call below the root on a bucket's count, at
    most 1/8 more rows than routed past it (below 17 rows: none), and the same labels."""
    calls = {0: {}, 8: {}}
    for buckets, log in calls.items():
        c = random_cascade(seed, segments=3)
        c.row_buckets = buckets
        log.update({name: [] for name in c.segments})
        hooks = [seg.register_forward_hook(lambda m, i, o, name=name, log=log: log[name].append(i[0].shape[0]))
                 for name, seg in c.trunk.items()]
        try:
            x = random_input(300, seed)
            out = c.predict(x, return_details=True)
        finally:
            for h in hooks:
                h.remove()
        depth = _depth_of_exit(c, out.exit_stage)
        for k, name in enumerate(c.segments):
            routed = int((depth >= k).sum())
            if buckets == 0:
                assert sum(log[name]) == routed, (name, log)
            else:
                assert all(n == 300 or row_bucket(n, 8) == n for n in log[name]), log[name]  # the root: all rows
                assert routed <= sum(log[name]) <= routed + sum(n // 9 for n in log[name] if n > 16), (name, log)
        if buckets == 0:
            exact = out.labels
        else:
            assert torch.equal(out.labels, exact)


def test_a_gate_on_an_early_segment_in_front_of_the_flat_model():
    """The flat fallback: the whole model (its head on the last segment) behind a gate on layer1."""
    from fastcascade.demo.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(8).eval()
    trunk, head = fc.split_backbone(model, at=["layer1", "layer2"])
    gate = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 1)).eval()
    flat = Stage(head, Argmax(), range(8), name="flat", tap="layer3")
    c = Cascade(Stage(gate, Threshold(0.5), [0, flat], name="gate", tap="layer1"), trunk=trunk)
    x = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logit = gate(trunk["layer1"](x)).reshape(-1)
        c = c.with_setting({"gate": torch.sigmoid(logit).median().item()})  # half the rows exit
    for n in (0, 1, 7, 200, 300):
        dense = cascade_dense(c, x[:n])
        for mode in ("dynamic", "static"):
            assert torch.equal(c.predict(x[:n], mode=mode), dense)
    labels = c.predict(x)
    passed = reference.route_threshold(logit, c.root.rule.threshold).bool()
    assert 100 < int(passed.sum()) < 200
    with torch.no_grad():
        assert torch.equal(labels[passed], model(x[passed]).argmax(1))
    assert (labels[~passed] == 0).all()


def test_mixed_tree_resumes_from_the_deepest_computed_segment():
    """root taps seg1 (seg0 and seg1 run); its child taps seg0 (already there) and its grandchild seg2
    (runs seg2 only); a stage without a tap reads the input."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    trunk = nn.ModuleDict({f"seg{i}": nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for i in range(3)})
    def lin(o):
        m = nn.Linear(5, o)
        m.weight.data.normal_(0, 3, generator=gen)
        m.bias.data.zero_()
        return m

    deep = Stage(lin(2), Argmax(), [3, 4], name="deep", tap="seg2")
    raw = Stage(lin(2), Argmax(), [5, 6], name="raw")
    mid = Stage(lin(3), Argmax(), [2, deep, raw], name="mid", tap="seg0")
    c = Cascade(Stage(lin(2), Argmax(), [Leaf(1), mid], name="root", tap="seg1"), trunk=trunk).eval()
    assert (c.plan["root"].run, c.plan["mid"].run, c.plan["deep"].run, c.plan["raw"].run) == ((0, 1), (), (2,), ())
    assert c.plan["root"].carry == ((), (0, 1)) and c.plan["mid"].carry == ((), (1,), ())
    x = torch.randn(500, 5, generator=gen)
    for mode in ("dynamic", "static"):
        assert torch.equal(c.predict(x, mode=mode), cascade_dense(c, x))
    assert len(set(cascade_dense(c, x).tolist())) >= 5


def test_split_backbone_cuts_resnets_and_the_small_cnn():
    import timm
    import torchvision

    from fastcascade.demo.models import SmallCNN

    torch.manual_seed(0)
    for model, at, names, shape in [
        (timm.create_model("resnet18", num_classes=5, in_chans=1), ["layer1", "layer3"], ["layer1", "layer3", "layer4"],
         (3, 1, 32, 32)),
        (torchvision.models.resnet18(num_classes=5), ["layer2"], ["layer2", "layer4"], (3, 3, 32, 32)),
        (SmallCNN(5), ["stem", "layer1", "layer2", "layer3"], ["stem", "layer1", "layer2", "layer3"], (3, 1, 16, 16)),
    ]:
        model.eval()
        trunk, head = fc.split_backbone(model, at=at)
        assert list(trunk) == names
        x = torch.randn(*shape)
        h = x
        for seg in trunk.values():
            h = seg(h)
        with torch.no_grad():
            assert torch.equal(head(h), model(x)), type(model).__name__
        assert all(any(p is q for q in model.parameters()) for p in trunk.parameters())  # shared, not copied
    with pytest.raises(ValueError, match="at: 'layer9' is not a feature stage"):
        fc.split_backbone(SmallCNN(2), at=["layer9"])
    with pytest.raises(ValueError, match="in model order"):
        fc.split_backbone(SmallCNN(2), at=["layer2", "layer1"])
    with pytest.raises(TypeError, match="at must be a non-empty list"):
        fc.split_backbone(SmallCNN(2), at="layer1")
    with pytest.raises(ValueError, match="model: split_backbone cuts"):
        fc.split_backbone(nn.Sequential(nn.Linear(2, 2)), at=["0"])


def test_bad_trunks_and_taps_name_the_stage():
    gen = torch.Generator().manual_seed(0)
    trunk = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(8, 4)})
    flat = lambda: nn.Flatten()  # noqa: E731
    with pytest.raises(ValueError, match="stage 's1': tap 'zz' is not a trunk segment; segments: \\['a', 'b'\\]"):
        Cascade(Stage(nn.Linear(8, 2), Argmax(), [0, Stage(nn.Linear(8, 2), Argmax(), [1, 2], name="s1", tap="zz")],
                      name="s0", tap="a"), trunk=trunk)
    with pytest.raises(ValueError, match="ensemble 'e': tap 'a' names a trunk segment, but the cascade has no trunk"):
        Cascade(Stage(_head(2, gen), Argmax(), [0, Ensemble([nn.Linear(8, 2)], [1, 2], name="e", tap="a")], name="s0"))
    with pytest.raises(TypeError, match="stage 's0': tap must be the name of a trunk segment"):
        Stage(_head(2, gen), Argmax(), [0, 1], name="s0", tap=3)
    with pytest.raises(TypeError, match="trunk must be an nn.ModuleDict or an nn.Sequential"):
        Cascade(Stage(_head(2, gen), Argmax(), [0, 1], name="s0"), trunk=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least one segment"):
        Cascade(Stage(_head(2, gen), Argmax(), [0, 1], name="s0"), trunk=nn.ModuleDict())
    with pytest.raises(ValueError, match="differ from the trunk's segment names.*\\['a'\\]"):
        Cascade(Stage(_head(2, gen), Argmax(), [0, 1], name="a"), trunk=trunk)
    with pytest.raises(TypeError, match="stage 's0': module must be an nn.Module"):
        Stage(lambda v: v, Argmax(), [0, 1], name="s0")
    # a head fed the wrong segment: the error names the stage and its tap
    wrong = Cascade(Stage(nn.Sequential(flat(), nn.Linear(8, 2)), Argmax(), [0, 1], name="head", tap="b"), trunk=trunk)
    with pytest.raises(RuntimeError, match="stage 'head' failed on trunk segment 'b', shape \\(5, 4\\)"):
        wrong.predict(torch.randn(5, 16))
    bad_seg = Cascade(Stage(nn.Linear(4, 2), Argmax(), [0, 1], name="head", tap="b"), trunk=trunk)
    with pytest.raises(RuntimeError, match="trunk segment 'a' failed on an input of shape \\(5, 3\\)"):
        bad_seg.predict(torch.randn(5, 3))
    no_params = Cascade(Stage(nn.Identity(), Argmax(), [0, 1, 2, 3], name="head", tap="b"), trunk=trunk)
    with pytest.raises(ValueError, match="trunk segment 'a' is on cpu"):
        no_params.predict(torch.randn(5, 16, device="meta"))
    with pytest.raises(ValueError, match="taps: unknown stages \\['stage3'\\]"):
        av1_partition_cascade(_head(1, gen), _head(3, gen), _head(2, gen), [_head(4, gen)], taps={"stage3": "a"})


def test_with_setting_shares_the_modules():
    c = _av1(2, 0.5)
    d = c.with_setting({"stage1": 0.9})
    assert d.root.rule.threshold == 0.9 and c.root.rule.threshold == 0.5
    assert d.root.module is c.root.module and d.nodes[-1] is c.nodes[-1]
    x = _blocks(200, 1)
    assert torch.equal(d.predict(x), cascade_dense(d, x)) and not torch.equal(d.predict(x), c.predict(x))
    with pytest.raises(ValueError, match="stage 'stage2' has an Argmax rule"):
        c.with_setting({"stage2": 0.3})
    with pytest.raises(ValueError, match="unknown stages \\['nope'\\]"):
        c.with_setting({"nope": 0.3})


def test_av1_hierarchy_with_heads_on_a_trunk():
    torch.manual_seed(8)
    trunk = nn.Sequential()
    trunk.add_module("early", nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU()))
    trunk.add_module("late", nn.Sequential(nn.Linear(12, 12), nn.ReLU()))
    def lin(i, o):
        m = nn.Linear(i, o)
        m.weight.data *= 4
        return m.eval()

    c = av1_partition_cascade(lin(12, 1), lin(12, 3), lin(12, 2), [lin(12, 4) for _ in range(3)], threshold=0.45,
                              trunk=trunk, taps={"stage1": "early", "stage2": "late", "rect": "late", "ab": "late"})
    assert c.segments == ["early", "late"] and c.plan["stage2"].run == (1,) and c.plan["rect"].run == ()
    x = _blocks(400, 9)
    for mode in ("dynamic", "static"):
        assert torch.equal(c.predict(x, mode=mode), cascade_dense(c, x))
    assert len(set(c.predict(x).tolist())) >= 4


@gpu
@needs_cuda
def test_trunk_cascade_static_mode_never_syncs_and_captures():
    for seed in (1, 5):
        c = random_cascade(seed, segments=3).cuda()
        x = random_input(256, seed).cuda()
        dense = cascade_dense(c, x)
        assert torch.equal(c.predict(x), dense)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            labels = c.predict(x, mode="static")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(labels, dense)
        run = c.capture(256, x)
        x2 = random_input(256, seed + 50).cuda()
        assert torch.equal(run(x), dense) and torch.equal(run(x2), cascade_dense(c, x2))


def test_stage_targets_prefer_the_leaf_when_two_branches_lead_to_a_label():
    """A gate (NONE exits, the flat model behind it also predicts NONE) and a confident exit: the target
    of a NONE row is the exit branch, the rest go on."""
    gen = torch.Generator().manual_seed(0)
    flat = Stage(_head(3, gen), Argmax(), [0, 1, 2], name="flat")
    c = Cascade(Stage(_head(1, gen), Threshold(0.5), [0, flat], name="gate"))
    assert c.stage_targets(torch.tensor([0, 1, 2]))["gate"].tolist() == [0, 1, 1]
    exits = Cascade(Stage(_head(3, gen), Confident(0.8), [0, 1, 2, Stage(_head(3, gen), Argmax(), [2, 1, 0],
                                                                        name="late")], name="early"))
    t = exits.stage_targets(torch.tensor([0, 1, 2]))
    assert t["early"].tolist() == [0, 1, 2] and t["late"].tolist() == [2, 1, 0]


# ---------------------------------------------------------------------------------------------
# evaluation: one path, one routed and one dense pass per batch


def test_evaluation_report_matches_sklearn_and_names_the_branches():
    json = pytest.importorskip("json")
    skm = pytest.importorskip("sklearn.metrics")
    c = _av1(3, 0.5)
    x = _blocks(300, 4)
    truth = torch.randint(0, 8, (300,), generator=torch.Generator().manual_seed(3))
    rep = fc.evaluate(c, (x, truth), batch_size=64)
    pred = c.predict(x)
    assert torch.equal(rep.confusion, torch.from_numpy(skm.confusion_matrix(truth, pred, labels=list(range(8)))))
    assert rep.accuracy == pytest.approx(skm.accuracy_score(truth, pred), rel=1e-12)
    assert rep.macro_f1 == pytest.approx(skm.f1_score(truth, pred, average="macro", zero_division=0), rel=1e-12)
    assert rep.final.class_names == LABEL_NAMES[:8]  # the hierarchy names its labels
    assert rep.stages["stage1"].class_names == ("NONE", "PARTITION")
    assert rep.stages["rect"].class_names == ("HORZ", "VERT")
    assert rep.stages["ab"].class_names == ("HORZ_A", "HORZ_B", "VERT_A", "VERT_B")
    # the stage-2 confusion, from the definition: rows that reached stage 2 and whose truth is a partition
    reached = c.predict(x, return_details=True).reached(c, "stage2")
    t2 = c.stage_targets(truth)["stage2"]
    sel = reached & (t2 >= 0)
    own = c.root.kids[1].rule.decide(c.root.kids[1].module(x), "torch")
    assert torch.equal(rep.stages["stage2"].confusion,
                       torch.from_numpy(skm.confusion_matrix(t2[sel], own[sel], labels=[0, 1, 2])))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["final"]["class_names"][1] == "HORZ" and d["reached"]["stage1"] == 1.0 and d["loss"] is None
    assert "stage stage2: reached" in str(rep)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_evaluation_does_not_depend_on_the_batch_size(mode):
    c = _av1(5, 0.45)
    x = _blocks(257, 6)
    truth = torch.randint(0, 8, (257,), generator=torch.Generator().manual_seed(5))
    whole = c.evaluate(x, truth, mode=mode, batch_size=257).to_dict()
    for bs in (1, 7, 100):
        assert c.evaluate(x, truth, mode=mode, batch_size=bs).to_dict() == whole, bs
    # an iterable of batches (a DataLoader, say) gives the same report
    batches = [(x[i:i + 50], truth[i:i + 50]) for i in range(0, 257, 50)]
    assert fc.evaluate_cascade(c, batches, mode=mode).to_dict() == whole


def _count_calls(c: Cascade) -> dict:
    calls = {}
    parts = [(n.name, n.module) for n in c.nodes if isinstance(n, Stage)]
    parts += [(f"{n.name}.{k}", m) for n in c.nodes if isinstance(n, Ensemble) for k, m in enumerate(n.members)]
    parts += [(name, seg) for name, seg in (c.trunk or {}).items()]
    for name, m in parts:
        calls[name] = []
        m.register_forward_hook(lambda mod, inp, out, name=name: calls[name].append(inp[0].shape[0]))
    return calls


def test_evaluation_runs_each_part_once_routed_and_once_dense_per_batch():
    gen = torch.Generator().manual_seed(11)
    lin = lambda i, o: nn.Linear(i, o)  # noqa: E731
    trunk = nn.ModuleDict({"a": nn.Sequential(nn.Flatten(), lin(16, 12)), "b": lin(12, 12)})
    c = av1_partition_cascade(lin(12, 1), lin(12, 3), lin(12, 2), [lin(12, 4) for _ in range(3)], threshold=0.45,
                              trunk=trunk, taps={"stage1": "a", "stage2": "b", "rect": "b", "ab": "b"})
    calls = _count_calls(c)
    x = torch.randn(300, 1, 4, 4, generator=gen)
    truth = torch.randint(0, 8, (300,), generator=gen)
    c.evaluate(x, truth, batch_size=100)
    for name, rows in calls.items():
        one_row = [n for n in rows if n == 1]  # the FLOP count's pass, once per evaluation
        assert len(one_row) == 1, (name, rows)
        others = [n for n in rows if n != 1]
        dense = [n for n in others if n == 100]
        # per batch one dense call on all 100 rows and at most one routed call on the rows routed there
        assert len(others) <= 6 and len(dense) >= 3, (name, rows)
        if name in ("a", "stage1"):  # the root's part sees every row in both passes
            assert others == [100] * 6, (name, rows)


def test_evaluate_bad_input():
    c = _av1(0)
    x = _blocks(5)
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        c.evaluate(x, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        c.evaluate(x, torch.zeros(5, dtype=torch.int64), batch_size=0)
    with pytest.raises(ValueError, match="holds no batch"):
        fc.evaluate_cascade(c, [])
    with pytest.raises(TypeError, match="data must be a tuple"):
        fc.evaluate_cascade(c, x)
    with pytest.raises(ValueError, match="branch_names must name each of the 2 branches"):
        Stage(_head(1, torch.Generator()), Threshold(), [0, 1], branch_names=["a"])
    with pytest.raises(TypeError, match="class_names must be a sequence of str"):
        Cascade(Stage(_head(2, torch.Generator()), Argmax(), [0, 1]), class_names="ab")


def test_row_buckets_bound_the_shapes_a_node_meets_and_change_no_output():
    from fastcascade.cascade.buckets import expected_padded_rows

    sizes = [row_bucket(n, 8) for n in range(1, 2049)]
    assert sizes[:16] == list(range(1, 17)) and row_bucket(17, 8) == 18 and row_bucket(100, 8) == 104
    assert all(n <= m <= n + max(0, n - 1) // 8 for n, m in zip(range(1, 2049), sizes))  # under 1/8 more rows
    assert all(row_bucket(m, 8) == m for m in sizes) and len(set(sizes)) == 72  # a bucket is its own bucket
    assert [row_bucket(n, 0) for n in (1, 17, 999)] == [1, 17, 999]
    # the mean padding of counts spread over octaves: ln 2 / 16 at 8 per doubling
    n = torch.arange(256, 4096, dtype=torch.float64)
    padded = torch.tensor([float(row_bucket(int(k), 8)) for k in n])
    assert float(padded.sum() / n.sum()) == pytest.approx(float(expected_padded_rows(n, 8).sum() / n.sum()), rel=5e-3)
    assert torch.equal(expected_padded_rows(torch.tensor([3.0, 16.0]), 8), torch.tensor([3.0, 16.0]))
    # every output equal with and without padding; copies keep the setting; bad values named
    c = random_cascade(3, segments=2)
    x = random_input(500, 3)
    padded_out = c.predict(x, return_details=True)
    c.row_buckets = 0
    exact = c.predict(x, return_details=True)
    assert torch.equal(padded_out.labels, exact.labels) and torch.equal(padded_out.exit_stage, exact.exit_stage)
    assert padded_out.probs.keys() == exact.probs.keys()
    assert all(torch.equal(padded_out.probs[k].nan_to_num(-1), exact.probs[k].nan_to_num(-1)) for k in exact.probs)
    assert c.with_setting({}).row_buckets == 0
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="row_buckets must be an int >= 0"):
            fc.Cascade(c.root, trunk=c.trunk, row_buckets=bad)
