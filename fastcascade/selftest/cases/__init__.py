"""One case table per op family: the inputs every consumer checks an op at.

A module per family, named by its stem (focal, dice_focal, pooled_adapter, pixel_adapter, routing,
metrics), holds the shapes, dtypes, layouts and edge values of that family and three views of them:

- the tests' tables (tests/test_<stem>.py parametrizes over them; rows with ``test=True``);
- ``selftest_cases(dtypes, tiers, quick)``: the self-test's cases (rows by ``tier``);
- ``GATE``: the sm_90 compile gate's cases (tests/test_triton_compile.py), the Triton ops' own arguments
  as meta tensors, benchmark shapes marked ``bench`` (no register spills allowed there).

A new edge case goes into its family's table once. It ships in the wheel because the self-test needs it.
"""

from __future__ import annotations

import torch

from . import dice_focal, focal, metrics, pixel_adapter, pooled_adapter, routing
from .common import DTYPE_NAMES, EDGE_SIZES, Case, GateCase, Meta, Shape, for_tests, in_tiers, public_api

__all__ = ["DTYPE_NAMES", "EDGE_SIZES", "FAMILIES", "Case", "GateCase", "Meta", "Shape", "all_cases",
           "for_tests", "gate_cases", "in_tiers", "public_api"]

# stem -> case table, in the order the self-test runs them; the keys are fastcascade._ops.FAMILIES's
FAMILIES = {"focal": focal, "dice_focal": dice_focal, "pooled_adapter": pooled_adapter,
            "pixel_adapter": pixel_adapter, "routing": routing, "metrics": metrics}
# where low precision matters, the quick run still checks bf16 at the small shapes
_LOW_PRECISION_SMALL = {"focal", "dice_focal", "pooled_adapter", "pixel_adapter"}


def all_cases(quick: bool, device: torch.device) -> list:
    """Every family's self-test cases: small and awkward shapes, and on a GPU (unless quick) the
    benchmark-sized ones; fp32 and bf16 (quick: fp32, plus bf16 at the small shapes of the losses and
    adapters)."""
    tiers = ("small", "awkward") + (() if quick or device.type != "cuda" else ("bench",))
    float_dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    lowp_small = [torch.bfloat16] if quick else []
    cases = []
    for stem, table in FAMILIES.items():
        cases += table.selftest_cases(float_dtypes, tiers, quick)
        if stem in _LOW_PRECISION_SMALL and lowp_small:
            cases += table.selftest_cases(lowp_small, ("small",), quick)
    order = {"small": 0, "awkward": 1, "bench": 2}  # every op's small shape first: a broken kernel shows early
    return sorted(cases, key=lambda c: order[c.tier])


def gate_cases() -> list:
    """Every family's compile-gate cases."""
    return [case for table in FAMILIES.values() for case in table.GATE]
