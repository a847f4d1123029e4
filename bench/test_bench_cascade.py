"""The seed cascade end to end: six ResNet-18 backbones (stage1, stage2, rect, three
AB members; timm, one input channel) on 16x16 luma blocks. Blocks/s of fastcascade's dynamic, static
and CUDA-graph modes against dense evaluation (every stage on every block, then select) and eager
boolean-mask indexing (x[mask] per branch: a nonzero() and a host sync per branch). The stage-1
threshold is set to the batch's 65th percentile of sigmoid(logit), so about 35% of the blocks pass
stage 1, as in the embedded dataset; the fraction reaching each stage is recorded with the timings.
Then a shared trunk: one resnet18 cut into segments, a gate on layer1 in front of its own head, against
the flat model alone (blocks/s and FLOPs per block).

Run: pytest bench/test_bench_cascade.py --benchmark-only
"""

import pytest
import timm
import torch
from bench_utils import DEVICE, headline, median_seconds

import fastcascade as fc
from fastcascade.cascade import cascade_dense

BATCHES = [headline(256), headline(1024), 8192] if DEVICE == "cuda" else [headline(256)]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _backbone(k: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("resnet18", pretrained=False, num_classes=k, in_chans=1)
    return m.to(DEVICE, DTYPE).to(memory_format=torch.channels_last).eval()


def _cascade(x: torch.Tensor) -> fc.Cascade:
    stage1 = _backbone(1, 0)
    with torch.no_grad():
        p = torch.sigmoid(stage1(x).float().reshape(-1))
    threshold = torch.quantile(p, 0.65).item()
    return fc.data.av1_partition_cascade(stage1, _backbone(3, 1), _backbone(2, 2), [_backbone(4, s) for s in (3, 4, 5)],
                                    threshold=threshold)


@torch.no_grad()
def _masked(cascade: fc.Cascade, x: torch.Tensor) -> torch.Tensor:
    """Eager early exit with boolean masks: what cascade code does without device-side routing."""
    from fastcascade.cascade import Ensemble, Leaf

    labels = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)

    def run(node, idx):
        xs = x[idx]
        if isinstance(node, Ensemble):
            probs = torch.stack([torch.softmax(m(xs).float(), 1) for m in node.members]).mean(0)
            labels[idx] = node.label_table.to(x.device)[probs.argmax(1)]
            return
        out = node.outputs(xs)
        branch = node.rule.decide(out, "torch")
        for b, child in enumerate(node.kids):
            sub = idx[branch == b]  # nonzero: a host sync per branch
            if sub.numel() == 0:
                continue
            if isinstance(child, Leaf):
                labels[sub] = child.label
            else:
                run(child, sub)

    run(cascade.root, torch.arange(x.shape[0], device=x.device))
    return labels


@pytest.mark.parametrize("mode", ["dense", "masked", "dynamic", "static", "graph"])
@pytest.mark.parametrize("batch", BATCHES)
def test_av1_cascade_throughput(benchmark, mode, batch):
    if mode == "graph" and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    benchmark.group = f"av1 cascade, 6x resnet18, B={batch} 16x16 {str(DTYPE)[6:]}"
    x = torch.rand(batch, 1, 16, 16, device=DEVICE).to(DTYPE).contiguous(memory_format=torch.channels_last)
    cascade = _cascade(x)
    fns = {
        "dense": lambda: cascade_dense(cascade, x),
        "masked": lambda: _masked(cascade, x),
        "dynamic": lambda: cascade.predict(x),
        "static": lambda: cascade.predict(x, mode="static"),
    }
    if mode == "graph":
        fns["graph"] = cascade.capture(batch, x)
        fn = lambda: fns["graph"](x)  # noqa: E731
    else:
        fn = fns[mode]
    details = cascade.predict(x, return_details=True)
    assert torch.equal(fn(), cascade_dense(cascade, x))
    seconds = median_seconds(fn, reps=5 if DEVICE == "cpu" else 20, warmup=1 if DEVICE == "cpu" else 3)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
        median_ms=seconds * 1e3, blocks_per_s=batch / seconds,
        reached={n: round(details.reached(cascade, n).float().mean().item(), 4) for n in cascade.node_names})
    benchmark.pedantic(fn, rounds=1, iterations=1)


def _trunk_gate(x: torch.Tensor) -> tuple[fc.Cascade, torch.nn.Module]:
    """One resnet18 cut into a shared trunk (layer1 | layer2 | layer4): a NONE-vs-rest head on layer1 in front
    of the model's own head on layer4. The gate's threshold lets about 35% of the blocks through."""
    flat = _backbone(8, 6)
    trunk, head = fc.split_backbone(flat, at=["layer1", "layer2"])
    torch.manual_seed(7)
    gate = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(256, 1))
    gate = gate.to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        p = torch.sigmoid(gate(trunk["layer1"](x)).float().reshape(-1))
    rest = fc.Stage(head, fc.Argmax(), range(8), name="flat", tap="layer4")
    root = fc.Stage(gate, fc.Threshold(torch.quantile(p, 0.65).item()), [0, rest], name="gate", tap="layer1")
    return fc.Cascade(root, trunk=trunk), flat


@pytest.mark.parametrize("mode", ["flat", "dense", "dynamic", "static", "graph"])
@pytest.mark.parametrize("batch", BATCHES)
def test_trunk_gate_throughput(benchmark, mode, batch):
    """The shared-trunk gate against the flat model it gates: blocks/s and FLOPs per block (flop_counter)."""
    if mode == "graph" and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    benchmark.group = f"trunk gate, resnet18, B={batch} 16x16 {str(DTYPE)[6:]}"
    x = torch.rand(batch, 1, 16, 16, device=DEVICE).to(DTYPE).contiguous(memory_format=torch.channels_last)
    cascade, flat = _trunk_gate(x)
    fns = {"flat": lambda: flat(x).argmax(1), "dense": lambda: cascade_dense(cascade, x),
           "dynamic": lambda: cascade.predict(x), "static": lambda: cascade.predict(x, mode="static")}
    if mode == "graph":
        graph = cascade.capture(batch, x)
        fn = lambda: graph(x)  # noqa: E731
    else:
        fn = fns[mode]
    if mode != "flat":
        assert torch.equal(fn(), cascade_dense(cascade, x))
    seconds = median_seconds(torch.no_grad()(fn), reps=5 if DEVICE == "cpu" else 20, warmup=1 if DEVICE == "cpu" else 3)
    cost = fc.cascade_cost(cascade, x)
    flops = fc.flops_per_row(flat, x) if mode == "flat" else cost.dense if mode == "dense" else cost.expected(x)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
        median_ms=seconds * 1e3, blocks_per_s=batch / seconds, flops_per_block=flops,
        reached=round(cascade.predict(x, return_details=True).reached(cascade, "flat").float().mean().item(), 4))
    benchmark.pedantic(fn, rounds=1, iterations=1)
