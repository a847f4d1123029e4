"""Pooled residual adapter, forward + backward: fastcascade backends vs the eager module and
torch.compile of it, same run. Bytes counted: read x, write y, read grad_y, write grad_x. Also a
Stage-2 training step (frozen ResNet-18 + pooled adapters), fused vs eager adapters.

Run: pytest bench/test_bench_pooled_adapter.py --benchmark-only
"""

import pytest
import torch
from bench_utils import DEVICE, headline, module_backends, record

import fastcascade as fc

# (B, C, H, W): ResNet-18 stages on 16x16 blocks at B=4096, and a 14x14 map
SHAPES = [headline((4096, 64, 4, 4)), (4096, 128, 2, 2), (4096, 256, 1, 1), (4096, 512, 1, 1), (256, 256, 14, 14)]
if DEVICE == "cpu":
    SHAPES = [headline((512, 64, 4, 4)), (512, 512, 1, 1), (32, 256, 14, 14)]
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]



@pytest.mark.parametrize("impl", list(module_backends()))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pooled_adapter_fwd_bwd(benchmark, impl, dtype, shape):
    B, C, H, W = shape
    benchmark.group = f"pooled_adapter fwd+bwd {B}x{C}x{H}x{W} {str(dtype)[6:]} r=64"
    backend = module_backends()[impl]
    m = fc.ResidualAdapter(C, 64, "pooled", init_std=0.02, backend="torch" if backend == "compile" else backend)
    m = m.to(DEVICE)
    fn = torch.compile(m) if backend == "compile" else m
    x = torch.randn(shape, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_(True)

    def step():
        x.grad = None
        for p in m.parameters():
            p.grad = None
        fn(x).sum().backward()

    record(benchmark, step, 4 * x.numel() * x.element_size())


# A Stage-2 training step: frozen timm ResNet-18 (one input channel) + pooled adapters after its four
# stages + a 3-way head, B=4096 16x16 blocks (bf16 autocast on a GPU), adapters fused vs eager.
STEP_BATCH = 4096 if DEVICE == "cuda" else 256


@pytest.mark.parametrize("impl", ["adapters-eager", "adapters-fastcascade"])
def test_stage2_training_step(benchmark, impl):
    import timm

    benchmark.group = f"stage-2 training step, resnet18 + 4 pooled adapters, B={STEP_BATCH} 16x16"
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1)
    fc.add_adapters(model, bottleneck=64, kind="pooled", backend="torch" if impl == "adapters-eager" else "auto")
    fc.freeze_backbone(model)
    model = model.to(DEVICE).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.rand(STEP_BATCH, 1, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (STEP_BATCH,), device=DEVICE)
    amp = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = fc.softmax_focal_loss(model(x), y, gamma=2.0)
        loss.backward()
        opt.step()

    record(benchmark, step, x.numel() * x.element_size())
