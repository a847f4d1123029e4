"""Metrics: the confusion-matrix op on every backend against scikit-learn and the reference,
the report's scores against scikit-learn, opcheck, torch.compile, determinism, bad input."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import backend_params, fused_backend_params, seeded
from sklearn import metrics as skm

import fastcascade as fc
from fastcascade import _ops, reference
from fastcascade.selftest.cases import metrics as table

BACKENDS = backend_params()
FUSED = fused_backend_params()
INTERPRETED_AOT = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="AOT tracing of Triton kernels needs a GPU (not the interpreter)")


def _sk_confusion(pred, target, C, ignore_index=None):
    p, t = pred.reshape(-1).numpy(), target.reshape(-1).numpy()
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if len(t) == 0:  # scikit-learn refuses empty inputs
        return torch.zeros(C, C, dtype=torch.int64)
    return torch.from_numpy(skm.confusion_matrix(t, p, labels=np.arange(C)).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# confusion_matrix


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("pdtype,tdtype", table.DTYPE_PAIRS, ids=str)
def test_confusion_matrix_matches_sklearn(backend, device, pdtype, tdtype):
    gen = seeded("confusion", pdtype, tdtype)
    cases = list(table.SIZES) + ([table.CPU_CHUNKED] if backend != "triton" else [])
    for n, C in cases:
        target = torch.randint(0, C, (n,), generator=gen)
        pred = torch.where(torch.rand(n, generator=gen) < 0.6, target, torch.randint(0, C, (n,), generator=gen))
        for ignore in [None, -100, C - 1]:
            t = target.clone()
            if ignore == -100 and n:
                t[torch.rand(n, generator=gen) < 0.2] = -100
            cm = fc.confusion_matrix(pred.to(pdtype).to(device), t.to(tdtype).to(device), C, ignore, backend=backend)
            assert cm.dtype == torch.int64 and cm.shape == (C, C) and cm.device.type == device
            want = _sk_confusion(pred, t, C, ignore)
            assert torch.equal(cm.cpu(), want), (n, C, ignore)
            assert torch.equal(cm.cpu(), reference.confusion_matrix(pred, t, C, ignore))
            kept = n if ignore is None else int((t != ignore).sum())
            assert int(cm.sum()) == kept


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_confusion_matrix_of_segmentation_maps_and_strided_inputs(backend, device):
    gen = seeded("segmentation")
    C = 5
    target = torch.randint(0, C, (2, 33, 17), generator=gen, dtype=torch.uint8)
    target[:, :3] = 255  # a void border
    pred = torch.randint(0, C, (2, 17, 33), generator=gen).transpose(1, 2)  # non-contiguous int64
    want = _sk_confusion(pred.contiguous(), target.long(), C, 255)
    cm = fc.confusion_matrix(pred.to(device), target.to(device), C, ignore_index=255, backend=backend)
    assert torch.equal(cm.cpu(), want)
    assert int(cm.sum()) == int((target != 255).sum())
    # every other element of a larger tensor, and bool ids
    cm2 = fc.confusion_matrix(pred[:, ::2].to(device), target.long()[:, ::2].to(device), C, 255, backend=backend)
    assert torch.equal(cm2.cpu(), _sk_confusion(pred[:, ::2].contiguous(), target.long()[:, ::2].contiguous(), C, 255))
    b = torch.rand(50, generator=gen) > 0.5
    cmb = fc.confusion_matrix(b.to(device), (~b).to(device), 2, backend=backend)
    assert cmb.cpu().tolist() == [[0, int(b.sum())], [int((~b).sum()), 0]]


@pytest.mark.parametrize("backend,device", [p for p in FUSED if p.values[0] == "triton"])
def test_kernel_skips_out_of_range_ids_as_cuda_does(backend, device):
    """What the device kernels do without FASTCASCADE_CHECK (the API raises first on the CPU)."""
    op = _ops.op("confusion_matrix", backend)
    pred = torch.tensor([0, 1, 2, 3, -1, 1, 2, 9], device=device)
    target = torch.tensor([0, 1, -5, 1, 1, 7, -100, 2], device=device)
    for C in [3, 70]:
        cm = op(pred, target, C, -100).cpu()
        assert torch.equal(cm, reference.confusion_matrix(pred.cpu(), target.cpu(), C, -100))
        if C == 3:
            assert int(cm.sum()) == 2 and cm[0, 0] == 1 and cm[1, 1] == 1
        else:  # 3, 7 and 9 are classes now
            assert int(cm.sum()) == 5 and cm[1, 3] == 1 and cm[7, 1] == 1 and cm[2, 9] == 1


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_ids_raise_on_cpu(backend, device):
    if device != "cpu":
        pytest.skip("CUDA skips such elements without a sync (test_gpu_*)")
    ok = torch.tensor([0, 1, 2])
    for pred, target, which in [([0, 3, 1], ok, "pred"), ([0, 1, 2], [0, -1, 1], "target"), ([-2, 0, 1], ok, "pred")]:
        with pytest.raises(ValueError, match=rf"{which} holds .*outside \[0, num_classes = 3\)"):
            fc.confusion_matrix(torch.tensor(pred), torch.as_tensor(target), 3, backend=backend)
    # an ignored target's pred is not looked at
    cm = fc.confusion_matrix(torch.tensor([0, 9]), torch.tensor([0, -100]), 3, -100, backend=backend)
    assert cm.sum() == 1
    with pytest.raises(RuntimeError, match=r"pred holds 3 at element 1, outside \[0, num_classes = 3\)"):
        torch.ops.fastcascade.confusion_matrix(torch.tensor([0, 3, 1]), ok, 3, None)
    with pytest.raises(RuntimeError, match=r"target holds -1 at element 2, outside \[0, num_classes = 3\) and not ign"):
        torch.ops.fastcascade.confusion_matrix(ok, torch.tensor([0, 1, -1]), 3, -100)


# ---------------------------------------------------------------------------------------------
# ClassificationReport against scikit-learn


def _skewed_labels(gen, n, C):
    """Targets and predictions where class C-1 is in neither, class C-2 is predicted but never true and
    class C-3 is true but never predicted."""
    target = torch.randint(0, C - 2, (n,), generator=gen)
    pred = torch.where(torch.rand(n, generator=gen) < 0.5, target, torch.randint(0, C - 1, (n,), generator=gen))
    pred = torch.where(pred == C - 3, torch.zeros_like(pred), pred)
    return pred, target


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_report_matches_sklearn(backend, device):
    gen = seeded("report")
    for n, C in [(1, 3), (40, 6), (5000, 8)]:
        pred, target = _skewed_labels(gen, n, C) if C >= 4 else (torch.tensor([1]), torch.tensor([1]))
        r = fc.classification_report(pred.to(device), target.to(device), C, backend=backend)
        y, yh = target.numpy(), pred.numpy()
        labels = np.arange(C)
        p, rc, f, s = skm.precision_recall_fscore_support(y, yh, labels=labels, zero_division=0)
        np.testing.assert_allclose(r.precision.numpy(), p, rtol=1e-12, atol=0)
        np.testing.assert_allclose(r.recall.numpy(), rc, rtol=1e-12, atol=0)
        np.testing.assert_allclose(r.f1.numpy(), f, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(r.support.numpy(), s)
        np.testing.assert_allclose(r.iou.numpy(), skm.jaccard_score(y, yh, labels=labels, average=None,
                                                                    zero_division=0), rtol=1e-12)
        assert torch.equal(r.dice, r.f1)
        assert r.accuracy == pytest.approx(skm.accuracy_score(y, yh), rel=1e-12)
        # averages: scikit-learn's default labels (the classes in y_true or y_pred)
        assert r.macro_f1 == pytest.approx(skm.f1_score(y, yh, average="macro", zero_division=0), rel=1e-12)
        assert r.weighted_f1 == pytest.approx(skm.f1_score(y, yh, average="weighted", zero_division=0), rel=1e-12)
        assert r.macro_precision == pytest.approx(skm.precision_score(y, yh, average="macro", zero_division=0),
                                                  rel=1e-12)
        assert r.macro_recall == pytest.approx(skm.recall_score(y, yh, average="macro", zero_division=0), rel=1e-12)
        assert r.miou == pytest.approx(skm.jaccard_score(y, yh, average="macro", zero_division=0), rel=1e-12)
        if C >= 4:  # the skew is there, so the averaging set matters
            assert r.support[C - 2] == 0 and r.confusion[:, C - 3].sum() == 0 and r.confusion[:, C - 1].sum() == 0
            assert r.macro_f1 != pytest.approx(float(r.f1.mean()))


def test_report_with_ignore_index_matches_sklearn_on_kept_rows():
    gen = seeded("report-ignore")
    pred, target = _skewed_labels(gen, 3000, 7)
    target[torch.rand(3000, generator=gen) < 0.3] = -1
    r = fc.classification_report(pred, target, 7, ignore_index=-1)
    keep = (target != -1).numpy()
    y, yh = target.numpy()[keep], pred.numpy()[keep]
    assert r.accuracy == pytest.approx(skm.accuracy_score(y, yh), rel=1e-12)
    assert r.macro_f1 == pytest.approx(skm.f1_score(y, yh, average="macro", zero_division=0), rel=1e-12)
    assert int(r.support.sum()) == keep.sum()


def test_report_dict_and_table():
    names = ["NONE", "HORZ", "VERT", "SPLIT"]
    cm = torch.tensor([[50, 2, 1, 0], [3, 20, 0, 0], [0, 1, 9, 0], [0, 0, 0, 0]])
    r = fc.ClassificationReport.from_confusion(cm, class_names=names)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["class_names"] == names and d["confusion"] == cm.tolist() and d["support"] == 86
    assert d["per_class"]["HORZ"]["precision"] == pytest.approx(20 / 23)
    assert d["per_class"]["SPLIT"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0, "dice": 0.0,
                                       "support": 0}
    assert d["accuracy"] == pytest.approx(79 / 86)
    assert d["macro_f1"] == pytest.approx(float(r.f1[:3].mean()))  # SPLIT is in neither: not averaged
    text = str(r)
    for name in names + ["accuracy", "macro avg", "weighted avg"]:
        assert name in text
    row = next(line for line in text.splitlines() if line.strip().startswith("HORZ"))
    assert row.split()[1:] == [f"{20 / 23:.4f}", f"{20 / 23:.4f}", f"{40 / 46:.4f}", f"{20 / 26:.4f}", "23"]
    empty = fc.ClassificationReport.from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert empty.accuracy == empty.macro_f1 == empty.weighted_f1 == empty.miou == 0.0
    assert empty.class_names == ("0", "1", "2")


def test_confusion_accumulates_over_batches():
    gen = seeded("accumulate")
    pred, target = torch.randint(0, 4, (1000,), generator=gen), torch.randint(0, 4, (1000,), generator=gen)
    cm = torch.zeros(4, 4, dtype=torch.int64)
    for p, t in zip(pred.split(300), target.split(300)):
        cm += fc.confusion_matrix(p, t, 4)
    assert torch.equal(cm, fc.confusion_matrix(pred, target, 4))


# ---------------------------------------------------------------------------------------------
# opcheck, compile, determinism


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 4, (37,), generator=gen)
    p = torch.randint(0, 4, (37,), generator=gen)
    yield (p.to(device), t.to(device), 4, None)
    yield (p.int().view(37, 1).to(device), t.to(device).view(37, 1), 5, 3)
    yield (torch.randint(0, 70, (9, 4), generator=gen).int().to(device),
           torch.randint(0, 70, (9, 4), generator=gen).to(device), 70, -1)


@pytest.mark.parametrize("backend,device", FUSED)
def test_metrics_opcheck(backend, device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(_ops.op("confusion_matrix", backend), args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _aot_params():
    return [pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
            for p in FUSED]


@pytest.mark.parametrize("backend,device", _aot_params())
def test_metrics_opcheck_aot(backend, device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(_ops.op("confusion_matrix", backend), args,
                              test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("backend,device", _aot_params() + [pytest.param("torch", "cpu", id="torch")])
def test_confusion_matrix_compiles_fullgraph(backend, device):
    """An evaluation step: logits -> argmax -> confusion matrix, accumulated, in one graph."""
    torch._dynamo.reset()
    gen = seeded("compile")

    def step(cm, logits, target):
        return cm + fc.confusion_matrix(logits.argmax(1), target, 6, ignore_index=-100, backend=backend)

    logits = torch.randn(300, 6, generator=gen).to(device)
    target = torch.randint(0, 6, (300,), generator=gen)
    target[::7] = -100
    target = target.to(device)
    cm0 = torch.zeros(6, 6, dtype=torch.int64, device=device)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(cm0, logits, target)
    assert torch.equal(got, step(cm0, logits, target))
    assert torch.equal(got.cpu(), _sk_confusion(logits.argmax(1).cpu(), target.cpu(), 6, -100))


@pytest.mark.parametrize("backend,device", FUSED)
def test_confusion_matrix_is_deterministic(backend, device):
    gen = seeded("determinism")
    n = 300000 if backend != "triton" else 20000
    pred, target = torch.randint(0, 8, (n,), generator=gen).to(device), torch.randint(0, 8, (n,), generator=gen)
    target = target.to(device)
    runs = []
    threads = torch.get_num_threads()
    for nt in [1, max(2, threads)]:
        torch.set_num_threads(nt)
        try:
            runs.append(fc.confusion_matrix(pred, target, 8, backend=backend))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and int(runs[0].sum()) == n


def test_every_metrics_op_runs_on_meta_tensors():
    suffixes = ("", "_triton") if _ops.HAS_TRITON else ("",)
    if _ops.HAS_TRITON:
        _ops.load_triton_ops()
    meta = {"device": "meta"}
    for suffix in suffixes:
        op = getattr(torch.ops.fastcascade, "confusion_matrix" + suffix)
        cm = op(torch.empty(2, 7, dtype=torch.int32, **meta), torch.empty(2, 7, dtype=torch.int64, **meta), 5, None)
        assert cm.shape == (5, 5) and cm.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input_names_the_argument(backend, device):
    p = torch.tensor([0, 1, 2, 1], device=device)
    cases = [
        (lambda: fc.confusion_matrix(p.float(), p, 3, backend=backend), ValueError, "pred must be an integer tensor"),
        (lambda: fc.confusion_matrix(p, p.double(), 3, backend=backend), ValueError, "target must be an integer"),
        (lambda: fc.confusion_matrix(p.tolist(), p, 3, backend=backend), TypeError, "pred must be a torch.Tensor"),
        (lambda: fc.confusion_matrix(p, p[:3], 3, backend=backend), ValueError, "pred and target must have the same shape"),
        (lambda: fc.confusion_matrix(p, p[:, None], 3, backend=backend), ValueError, "same shape"),
        (lambda: fc.confusion_matrix(p, p, 0, backend=backend), ValueError, r"num_classes must be in \[1, 46340\]"),
        (lambda: fc.confusion_matrix(p, p, 3.0, backend=backend), TypeError, "num_classes must be an int"),
        (lambda: fc.confusion_matrix(p, p, 3, 1.5, backend=backend), TypeError, "ignore_index must be an int or None"),
        (lambda: fc.confusion_matrix(p, p, 3, backend="fast"), ValueError, "backend must be one of"),
        (lambda: fc.classification_report(p, p, 3, ["a", "b"], backend=backend), ValueError,
         "class_names must name each of the 3 classes"),
        (lambda: fc.classification_report(p, p, 3, "abc", backend=backend), TypeError, "class_names must be a sequence"),
        (lambda: fc.ClassificationReport.from_confusion(torch.zeros(3, 2, dtype=torch.long)), ValueError, "square"),
        (lambda: fc.ClassificationReport.from_confusion(torch.zeros(3, 3)), ValueError, "integer counts"),
        (lambda: fc.ClassificationReport.from_confusion(-torch.ones(2, 2, dtype=torch.long)), ValueError, ">= 0"),
        (lambda: fc.ClassificationReport.from_confusion([[1]]), TypeError, "cm must be a torch.Tensor"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    if device == "cpu":
        with pytest.raises(ValueError, match="pred and target must be on the same device"):
            fc.confusion_matrix(p, p.to("meta"), 3)


def test_op_level_checks_for_direct_callers():
    op = torch.ops.fastcascade.confusion_matrix
    p = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="pred must be int32 or int64"):
        op(p.float(), p, 3, None)
    with pytest.raises(RuntimeError, match="target must be int32 or int64"):
        op(p, p.to(torch.uint8), 3, None)
    with pytest.raises(RuntimeError, match="pred and target must have the same shape"):
        op(p, p[:2], 3, None)
    with pytest.raises(RuntimeError, match="num_classes must be >= 1"):
        op(p, p, 0, None)


# ---------------------------------------------------------------------------------------------
# GPU only: no host sync, out-of-range ids skipped, FASTCASCADE_CHECK, large N

GPU_FUSED = [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])
             for b in ["cuda", "triton"]]


@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_confusion_matrix_never_syncs_the_host(backend):
    pred = torch.randint(0, 8, (1 << 20,), device="cuda")
    target = torch.randint(0, 8, (1 << 20,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cms = [fc.confusion_matrix(pred, target, C, ignore_index=0, backend=backend) for C in (8, 16, 200)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = reference.confusion_matrix(pred.cpu(), target.cpu(), 8, 0)
    assert all(torch.equal(cm.cpu()[:8, :8], want) for cm in cms)


@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_out_of_range_ids_are_skipped_and_checkable(backend, monkeypatch):
    pred = torch.tensor([0, 1, 2, 3, -1, 1, 2, 9], device="cuda")
    target = torch.tensor([0, 1, -5, 1, 1, 7, -100, 2], device="cuda")
    for C in [3, 200]:
        cm = fc.confusion_matrix(pred, target, C, -100, backend=backend)
        assert torch.equal(cm.cpu(), reference.confusion_matrix(pred.cpu(), target.cpu(), C, -100))
    monkeypatch.setenv("FASTCASCADE_CHECK", "1")
    with pytest.raises(ValueError, match="outside"):
        fc.confusion_matrix(pred, target, 3, -100, backend=backend)


@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_large_inputs_every_path(backend):
    gen = seeded("gpu-large")
    # CUDA: 8, 4, 2 and 1 shared-memory histograms per block, then global atomics; Triton: histograms
    # for C <= 32, atomics above
    for n, C in [((1 << 24) + 3, 8), (1 << 22, 40), (1 << 22, 60), (1 << 22, 100), (1 << 22, 120), (1 << 20, 1000)]:
        target = torch.randint(0, C, (n,), generator=gen)
        pred = torch.randint(0, C, (n,), generator=gen, dtype=torch.int32)
        got = fc.confusion_matrix(pred.cuda(), target.cuda(), C, backend=backend)
        assert torch.equal(got.cpu(), reference.confusion_matrix(pred, target, C)), (n, C)
