"""One small case of every op, forward and backward, on one backend: what scripts/gpu_check.sh runs under
compute-sanitizer (memcheck, then racecheck) on a GPU, the hardware twin of the CUDA emulation's checks.

    python3 -P scripts/sanitize_cases.py                  # the CUDA kernels (needs a GPU)
    python3 -P scripts/sanitize_cases.py --backend cpu    # the same cases on the C++ CPU kernels

The cases are the first "small" fp32 case of each op in the families' case tables
(fastcascade.selftest.cases). Prints one line per op; exits non-zero on any error.
"""

from __future__ import annotations

import argparse

import torch

from fastcascade.selftest.cases import FAMILIES
from fastcascade.selftest.execute import Upstream, execute


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "cpu", "triton"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.backend in ("cuda", "triton") else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    for stem, table in FAMILIES.items():
        seen = set()
        for case in table.selftest_cases([torch.float32], ("small",), True):
            if case.op in seen:
                continue
            seen.add(case.op)
            outs = execute(case, args.backend, case.make(gen, device), Upstream(1))
            if device.type == "cuda":
                torch.cuda.synchronize()  # a fault surfaces here, named after its op
            print(f"{stem:15s} {case.key}: {len(outs)} outputs", flush=True)


if __name__ == "__main__":
    main()
