"""Fused Dice + focal loss, forward + backward: fastcascade backends vs the reference (eager and
torch.compile) and MONAI's DiceFocalLoss (eager, when installed), in the same run.

Run: pytest bench/test_bench_dice_focal.py --benchmark-only  (bench/dice_focal_notes.md holds the numbers)
Bytes counted per step are the fewest the fused op moves: the forward reads logits and targets, the
backward reads them again and writes the gradient: 3·B·C·HW·s + 2·B·HW·8.
"""

import pytest
import torch
from bench_utils import DEVICE, fused_backends, record

import fastcascade as fc
from fastcascade import reference

# the size on a GPU; on the CPU a quarter of the batch and a quarter of the pixels
B, C, H, W = (16, 16, 384, 384) if DEVICE == "cuda" else (4, 16, 192, 192)
DTYPES = [torch.float32, torch.bfloat16]



_compiled_reference = torch.compile(reference.dice_focal_loss)


def _impls():
    impls = {
        "reference-eager": lambda x, t: reference.dice_focal_loss(x, t),
        "reference-compile": lambda x, t: _compiled_reference(x, t),
    }
    try:
        from monai.losses import DiceFocalLoss as MonaiDiceFocal

        # MONAI's focal term is the sigmoid one (see dice_focal_loss's docstring): same work class, not the
        # same value
        monai_loss = MonaiDiceFocal(to_onehot_y=True, softmax=True, smooth_nr=1.0, smooth_dr=1.0, batch=True,
                                    lambda_dice=0.5, lambda_focal=0.5)
        impls["monai-eager"] = lambda x, t: monai_loss(x, t[:, None])
    except ImportError:
        pass
    for b in fused_backends():
        impls[f"fastcascade-{b}"] = lambda x, t, b=b: fc.dice_focal_loss(x, t, backend=b)
    return impls


@pytest.mark.parametrize("impl", list(_impls()))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.headline
def test_dice_focal_fwd_bwd(benchmark, impl, dtype):
    benchmark.group = f"dice_focal fwd+bwd B={B} C={C} {H}x{W} {str(dtype)[6:]}"
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(B, C, H, W, generator=gen) * 3).to(DEVICE, dtype).requires_grad_(True)
    t = torch.randint(0, C, (B, H, W), generator=gen).to(DEVICE)
    fn = _impls()[impl]

    def step():
        x.grad = None
        fn(x, t).backward()

    record(benchmark, step, 3 * x.numel() * x.element_size() + 2 * t.numel() * 8)
