"""fastcascade.inference_form: a verified, folded copy of a model or a cascade; the original untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcascade as fc
from fastcascade.cascade import Argmax, Cascade, Ensemble, Stage, Threshold, cascade_dense, dense_outputs
from fastcascade.demo.models import GridPool, SmallCNN
from fastcascade.inference import fold_batchnorms


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from the defaults, so folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            bn.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            bn.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return _randomise_batchnorms(SmallCNN(8), seed)


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _stage1_head() -> nn.Sequential:
    """A head on layer1's 32x8x8 features with a conv + batch norm of its own (folded with the trunk)."""
    return _randomise_batchnorms(nn.Sequential(nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                               GridPool(2), nn.Flatten(1), nn.Linear(32, 1)), seed=3)


def _gate(flat: SmallCNN, whole_flat_stage: bool = False) -> Cascade:
    """The demo's gate design: a Stage-1 head on layer1, then the rest of the trunk and the flat head; with
    whole_flat_stage the second stage is the whole flat model on the cascade's input (so the trunk's segments
    are children of that stage's module too)."""
    trunk, head = fc.split_backbone(flat, at=["layer1", "layer2"])
    second = (Stage(flat, Argmax(), range(8), name="flat") if whole_flat_stage
              else Stage(head, Argmax(), range(8), name="flat", tap="layer3"))
    cascade = Cascade(Stage(_stage1_head(), Threshold(0.5), [0, second], name="gate", tap="layer1"), trunk=trunk)
    # the threshold at the median probability of some blocks, so that both branches are taken
    p = torch.sigmoid(dense_outputs(cascade.eval(), torch.rand(256, 1, 16, 16))["gate"])
    return cascade.with_setting({"gate": p.median().item()})


def test_a_model_keeps_its_outputs_without_batch_norm():
    model = _cnn()
    model.layer2.eval()  # mixed modes: restored as they were
    modes = {n: m.training for n, m in model.named_modules()}
    x, fresh = torch.rand(32, 1, 16, 16), torch.rand(64, 1, 16, 16)
    served = fc.inference_form(model, x)
    assert served is not model and _batchnorms(model) == 4 and _batchnorms(served) == 0
    assert not served.training and not any(m.training for m in served.modules())
    assert {n: m.training for n, m in model.named_modules()} == modes
    with torch.no_grad():
        ref = model.eval()(fresh)
        out = served(fresh)
    assert not torch.equal(out, ref)  # folding did change the arithmetic ...
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # ... not the function


def test_a_cascade_over_a_shared_trunk_keeps_every_part():
    flat = _cnn().eval()
    cascade = _gate(flat).eval()
    x, fresh = torch.rand(32, 1, 16, 16), torch.rand(200, 1, 16, 16)
    served = fc.inference_form(cascade, x)
    assert isinstance(served, Cascade) and _batchnorms(served) == 0 and _batchnorms(cascade) == 5
    want, got = dense_outputs(cascade, fresh), dense_outputs(served, fresh)
    assert set(got) == {"gate", "flat"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    labels = cascade.predict(fresh)
    assert 0 < int((labels == 0).sum()) < len(labels)  # both branches taken
    for mode in ("dynamic", "static"):
        assert torch.equal(served.predict(fresh, mode=mode), labels)
    assert torch.equal(cascade_dense(served, fresh), labels)


def test_modules_the_cascade_shares_stay_shared_in_the_copy():
    flat = _cnn().eval()
    cascade = _gate(flat, whole_flat_stage=True)
    served = fc.inference_form(cascade, torch.rand(16, 1, 16, 16))
    copy_flat = served.nodes[1].module
    assert isinstance(copy_flat, SmallCNN) and copy_flat is not flat
    assert served.trunk["layer1"][0] is copy_flat.stem and served.trunk["layer1"][1] is copy_flat.layer1
    assert served.trunk["layer2"] is copy_flat.layer2
    # the folded convolution is one module, reached from the trunk and from the flat stage
    assert isinstance(copy_flat.stem[0], nn.Conv2d) and served.trunk["layer1"][0][0] is copy_flat.stem[0]
    assert served.root.kids[1] is served.nodes[1]  # the tree's lists and the registered children agree
    # the original's sharing is untouched: its trunk still holds its flat model's (unfolded) modules
    assert cascade.trunk["layer2"] is flat.layer2 and isinstance(flat.layer2[1], nn.BatchNorm2d)


def test_the_original_is_unchanged_and_still_trains():
    model = _cnn()
    x = torch.rand(32, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = fc.inference_form(model, x)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in served.parameters())
    copy_state = {k: v.clone() for k, v in served.state_dict().items()}
    with torch.no_grad():
        served_out = served(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = F.cross_entropy(model(x), torch.randint(0, 8, (32,)))
    loss.backward()
    opt.step()
    assert not torch.equal(model.stem[0].weight, before["stem.0.weight"])
    assert not torch.equal(model.stem[1].running_mean, before["stem.1.running_mean"])  # train mode: stats move
    assert all(torch.equal(v, copy_state[k]) for k, v in served.state_dict().items())
    with torch.no_grad():
        assert torch.equal(served(x), served_out)


def test_linear_then_batchnorm1d_folds():
    torch.manual_seed(1)
    mlp = _randomise_batchnorms(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)))
    x = torch.randn(40, 12)
    served = fc.inference_form(mlp, x)
    assert _batchnorms(served) == 0 and isinstance(served[0], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(served(x), mlp.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_uint8_example_is_read_as_pixels_in_0_1():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append((x.dtype, float(x.max())))
            return x

    model = _cnn()
    model.stem.insert(0, Recorder())
    pixels = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    served = fc.inference_form(model, pixels)  # a uint8 tensor would fail in the convolution
    assert seen and all(dtype == torch.float32 and top <= 1.0 for dtype, top in seen)
    x = pixels.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(served(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert _batchnorms(fc.inference_form(model, x)) == 0  # a float example works the same


def test_bad_arguments_are_named():
    model, x = _cnn(), torch.rand(4, 1, 16, 16)
    for bad in (model.state_dict(), lambda v: v, None):
        with pytest.raises(TypeError, match="model must be an nn.Module"):
            fc.inference_form(bad, x)
    with pytest.raises(TypeError, match="example must be a tensor"):
        fc.inference_form(model, x.tolist())
    for empty in (torch.empty(0, 1, 16, 16), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="example must hold at least one row"):
            fc.inference_form(model, empty)
    for name, value in (("rtol", -1e-3), ("atol", float("nan")), ("rtol", True), ("atol", "1e-4")):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative number"):
            fc.inference_form(model, x, **{name: value})


class BatchNormFirst(nn.Module):
    """A Sequential lists conv then bn, but forward normalises the input itself and runs only the conv."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        with torch.no_grad():
            self.seq[1].running_mean.fill_(3.0)
        self.shift = 3.0

    def forward(self, x):
        return self.seq[0](x - self.shift).flatten(1)


def test_a_forward_that_does_not_follow_its_sequential_is_caught():
    x = torch.rand(8, 1, 16, 16)
    with pytest.raises(RuntimeError, match=r"the output changed by up to .* after folding 1 batch norms"):
        fc.inference_form(BatchNormFirst(), x)
    # in a cascade, the message names the stage
    cascade = Cascade(Stage(nn.Sequential(BatchNormFirst(), nn.Linear(4 * 16 * 16, 2)), Argmax(), [0, 1], name="odd"))
    with pytest.raises(RuntimeError, match=r"stage 'odd' changed by up to"):
        fc.inference_form(cascade, x)


def test_a_batchnorm_not_right_after_its_conv_is_left_alone():
    torch.manual_seed(2)
    model = _randomise_batchnorms(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(1)))
    x = torch.randn(8, 1, 6, 6)
    served = fc.inference_form(model, x)
    assert _batchnorms(served) == 1 and isinstance(served[2], nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(served(x), model.eval()(x))


def test_a_random_forward_is_caught_and_other_outputs_are_compared():
    class Noisy(nn.Module):
        def forward(self, x):
            return {"logits": F.dropout(x, 0.5, training=True), "size": (x.shape[0], "rows")}

    with pytest.raises(RuntimeError, match=r"the output\['logits'\] changed .* no batch norm was folded"):
        fc.inference_form(Noisy(), torch.rand(64, 3))

    class Counter(nn.Module):  # a non-tensor output that differs between the two runs
        calls = 0

        def forward(self, x):
            Counter.calls += 1
            return x, Counter.calls

    with pytest.raises(RuntimeError, match=r"the output\[1\] differs in the copy: 2 against the original's 1"):
        fc.inference_form(Counter(), torch.rand(4, 3))

    class Shape(nn.Module):  # an output whose structure depends on the call
        calls = 0

        def forward(self, x):
            Shape.calls += 1
            return {"a": x} if Shape.calls == 1 else {"b": x}

    with pytest.raises(RuntimeError, match=r"the copy's outputs are \[\"the output\['b'\]\"\]"):
        fc.inference_form(Shape(), torch.rand(4, 3))


def test_an_ensemble_and_its_members_are_checked_and_folded():
    torch.manual_seed(4)
    members = [_randomise_batchnorms(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), k)
               for k in range(3)]
    cascade = Cascade(Stage(nn.Linear(6, 1), Threshold(0.5), [Ensemble(members, [1, 2, 3], name="ens"), 0],
                            name="gate"))
    x = torch.randn(50, 6)
    served = fc.inference_form(cascade, x)
    assert _batchnorms(served) == 0 and cascade.training  # the original's mode is kept; compared in eval mode:
    cascade.eval()
    torch.testing.assert_close(dense_outputs(served, x)["ens"], dense_outputs(cascade, x)["ens"], rtol=1e-4, atol=1e-5)
    assert torch.equal(served.predict(x), cascade.predict(x))


def test_a_second_call_folds_nothing_more_and_changes_nothing():
    model, x = _cnn(), torch.rand(16, 1, 16, 16)
    once = fc.inference_form(model, x)
    twice = fc.inference_form(once, x)
    assert twice is not once and fold_batchnorms(twice) == 0
    with torch.no_grad():
        assert torch.equal(twice(x), once(x))
    assert fold_batchnorms(_cnn().eval()) == 4


def test_the_copy_is_deterministic():
    model, x = _cnn(), torch.rand(16, 1, 16, 16)
    a, b = fc.inference_form(model, x), fc.inference_form(model, x)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
