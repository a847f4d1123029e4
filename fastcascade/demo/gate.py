"""A gate on the raw block: a few-channel CNN that answers Stage 1 (NONE vs PARTITION) before any backbone runs.

The trunk designs' Stage 1 sits after the flat model's first segment, so every block pays the full-resolution
stem and layer1 (on one CPU core ~44% of the flat model's time) before a NONE can leave. RawGate reads the
raw block instead: two stride-2 convolutions (16x16 -> 8x8 -> 4x4, `width` channels, batch norm that
fastcascade.inference_form folds away), a 2x2 average pool (GridPool: a matrix product) and a linear layer to one
logit, which also reads the block's log variance (flat blocks are the surest NONE in AV1 partitioning).

Measured with bench/demo_raw_gate.py (2026-12-07; one thread on a shared 2-core machine; medians of 9-15
repeats taken in turns on 2,048 test blocks; the flat model is SmallCNN(8) at the demo's width 16; every
model with batch norm folded, as the demo times them):

    model              FLOPs/block  x flat   time x flat, 512-row batches   2,048-row batches
    flat (SmallCNN(8))   2,445,312   100%          100% (~30 us/block)        100% (~61 us/block)
    RawGate(4)              10,786   0.44%         5.2%                       2.1-5.0%
    RawGate(8)              29,762   1.22%         5.6-5.8%                   2.5-4.2%
    the same, variance=False: 3.5-3.6% / 4.6-4.8% (512 rows), 1.5-1.6% / 2.1-2.3% (2,048 rows)
    the variance input alone: 0.8-0.9% / 0.2-0.3%; torch.var would take 5.1% / 2.5%
(RawGate(4)'s 5% at 2,048 rows came when it ran right after the flat model in each turn; timed beside the
other gates alone it took 1.25 us/block.)

Stage 1 on val (2,399 blocks, 68% NONE), trained as train_raw_gates does (6 epochs, 3-4 s a gate): the
variance is most of what a raw gate knows. A threshold on the variance alone has ROC AUC 0.649 and sends
13.8% of the blocks out as NONE at a NONE precision of 0.9. RawGate(4): AUC 0.666, macro F1 0.601 at logit
0, 14.2% out at that precision; RawGate(8): 0.657, 0.605, 4.0%. Without the variance input: AUC 0.636
(4) and 0.615 (8), at most 2.1% out. (The own hierarchy's Stage 1, a SmallCNN of width 16: AUC 0.72, 12%.)
In front of a default run's flat model (seed 0, test macro F1 0.2990), tuned on val for macro F1 like the
demo's designs, the gates send out far more than that as NONE, and the flat model's mistakes on those rows
go with them. Gate seeds 0 / 1 / 2 (test macro F1, share of the test blocks out, blocks/s x flat, best of
5 timing rounds): RawGate(8) 0.3000 / 0.2832 / 0.3028, 64% / 71% / 57%, 2.06x / 2.45x / 1.71x;
RawGate(4) 0.2891 / 0.2816 / 0.2747, 67% / 65% / 78%, 2.20x / 2.14x / 3.39x.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import data as fd
from .context import Run
from .models import GridPool
from .stage1 import Stage1Recipe

__all__ = ["GATE_RECIPE", "GATE_WIDTHS", "RawGate", "train_raw_gates"]

GATE_WIDTHS = (4, 8)
#: how the gates train: sigmoid focal loss, gamma 2.5, no alpha, no mining, no sampler. Not the plan's Stage-1
#: recipe (STAGE1_RECIPE, which the v6 hierarchy's Stage 1 uses): with it the gates cost raw4 and raw8 tuned on
#: latency 0.019 and 0.017 test macro F1 (3 seeds, the same flat model behind them, 2026-12-07)
GATE_RECIPE = Stage1Recipe(alpha=None, hard_negative_ratio=None, sampler=None)
# the block's log variance, roughly standardised (on the embedded training blocks: mean -7.1, std 1.95) so
# one learning rate suits it and the pooled features
_LOGVAR_CENTER, _LOGVAR_SCALE, _VAR_FLOOR = -7.0, 2.0, 1e-4


def _conv(cin: int, cout: int) -> nn.Sequential:
    # Conv -> BatchNorm in one Sequential: the layout fastcascade.inference_form folds
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _check_width(width) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected a positive int (the gate's channels), got {width!r}")
    return width


class RawGate(nn.Module):
    """Stage 1 on the raw (N, 1, 16, 16) block in [0, 1]: one logit per row, (N, 1); > 0 means PARTITION.

    conv 3x3 stride 2 (1 -> width) + BN + ReLU, conv 3x3 stride 2 (width -> width) + BN + ReLU, average pool
    to 2x2 (one cell per quadrant), then a linear layer on those 4 * width values and (variance=True) the
    block's standardised log variance."""

    def __init__(self, width: int, variance: bool = True):
        super().__init__()
        self.width = _check_width(width)
        self.variance = bool(variance)
        self.conv1 = _conv(1, width)
        self.conv2 = _conv(width, width)
        self.pool = GridPool(2)
        self.mean = GridPool(1)  # the block's mean (and mean square) as a matrix product
        self.fc = nn.Linear(4 * width + int(self.variance), 1)
        if self.variance:
            # start as a threshold on the variance (more variance: PARTITION), the cue the CNN then refines:
            # from a random start, --quick's 2 epochs on 4,000 rows left an 8-channel gate at val AUC 0.59
            # (0.64 from this start)
            with torch.no_grad():
                self.fc.weight[0, -1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.conv2(self.conv1(x))).flatten(1)
        if self.variance:
            h = torch.cat([h, self.log_variance(x)], 1)
        return self.fc(h)

    def log_variance(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1): each block's log variance, standardised (the gate's hand-made input)."""
        # E[x^2] - E[x]^2 with two matrix products: torch.var costs ~18x more on one core. Centring on 0.5
        # first (one more pass, ~0.5% of the flat model's time) cuts the cancellation's rounding on flat bright
        # blocks from ~1e-6 to ~1e-8; the clamp keeps what is left from going negative. Always in float32:
        # under bf16 autocast (the demo on a GPU) the cancellation would swamp the variance of most blocks
        with torch.autocast(x.device.type, enabled=False):
            f = x.float() - 0.5
            m, q = self.mean(f).flatten(1), self.mean(f * f).flatten(1)
            v = torch.log((q - m * m).clamp_min(0) + _VAR_FLOOR)
        return (v - _LOGVAR_CENTER) / _LOGVAR_SCALE

    def extra_repr(self) -> str:
        return f"width={self.width}, variance={self.variance}"


def train_raw_gates(run: Run, widths=GATE_WIDTHS, *, epochs: int | None = None, batch_size: int = 128,
                    variance: bool = True) -> dict[int, RawGate]:
    """One RawGate per width, trained for Stage 1's target (GATE_RECIPE, target "stage1", random dihedral
    transforms, lr 3e-3) on the run's train split and selected on val; recorded
    under "gate<width>" (histories, timings, checkpoints). Returns {width: gate at its best epoch}; fold its
    batch norms (fastcascade.inference_form(gate.eval(), example)) before timing it.

    epochs: default the run's; batch_size: 128 (a gate trains on the full embedded split in ~0.5 s an epoch
    at one thread; larger batches leave too few steps for --quick's 4,000 rows and 2 epochs); variance: the
    gates' log-variance input (RawGate's `variance`)."""
    widths = [_check_width(w) for w in widths]
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths: expected distinct widths (each names a checkpoint), got {widths!r}")
    seed = run.args.seed + 70
    gates = {}
    for k, w in enumerate(widths):
        torch.manual_seed(seed + k)
        gate = RawGate(w, variance).to(run.device)
        kw = {} if epochs is None else {"epochs": epochs}
        gates[w] = run.fit(f"gate{w}", gate, GATE_RECIPE.loss, "stage1", seed + k, lr=3e-3, batch_size=batch_size,
                           augment=fd.RandomDihedral(seed=seed + k), **GATE_RECIPE.fit_options(), **kw)
    return gates
