"""The seed cascade end to end: six ResNet-18 backbones (stage1, stage2, rect, three
AB members; timm, one input channel) on 16x16 luma blocks. Blocks/s of fastcascade's dynamic, static
and CUDA-graph modes against dense evaluation (every stage on every block, then select) and eager
boolean-mask indexing (x[mask] per branch: a nonzero() and a host sync per branch). The stage-1
threshold is set to the batch's 65th percentile of sigmoid(logit), so about 35% of the blocks pass
stage 1, as in the embedded dataset; the fraction reaching each stage is recorded with the timings.

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
    return fc.Cascade.av1_partition(stage1, _backbone(3, 1), _backbone(2, 2), [_backbone(4, s) for s in (3, 4, 5)],
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
