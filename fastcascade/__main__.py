"""``python -m fastcascade demo``: train and evaluate the AV1 partition cascade on the embedded dataset.
``python -m fastcascade selftest``: check every op on every backend here against the reference.

The command line only: the demo is fastcascade.demo, the self-test fastcascade.selftest.
"""

from __future__ import annotations

import argparse
import sys

from .demo import run_demo
from .selftest.cli import add_arguments as add_selftest_arguments
from .selftest.cli import run_cli as run_selftest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcascade", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and evaluate the AV1 partition cascade on the embedded dataset")
    demo.add_argument("--device", default=None,
                      help="cpu, cuda or cuda:N (default: cuda when visible, else cpu); a device this machine "
                           "lacks exits with status 2")
    demo.add_argument("--out", default=None,
                      help="run folder (default: ./runs/demo-<timestamp>); must not exist or be empty")
    demo.add_argument("--epochs", type=_positive, default=None,
                      help="epochs per model (default 6; 2 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="CI-sized run: 4000 train / 2000 val blocks, 2 epochs")
    demo.add_argument("--backbone", choices=("small-cnn", "resnet18"), default=None,
                      help="default: small-cnn on the CPU, timm resnet18 on CUDA")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--seeds", type=_positive, default=1,
                      help="train and measure this many seeds (--seed, --seed + 1, ...) and report every design's "
                           "test macro F1, accuracy and throughput ratio as mean ± std (default 1)")
    demo.add_argument("--ablation", choices=("stage1",), default=None,
                      help="stage1: also retrain the trunk's Stage-1 head with each part of the plan's recipe "
                           "(alpha 0.25, mining 3:1, the balanced sampler) removed in turn, and report what each "
                           "buys in the v6-trunk hierarchy tuned end to end")
    demo.add_argument("--batch-size", type=_positive, default=None, help="default 128; 64 with --quick")
    demo.add_argument("--width", type=_positive, default=16, help="channels of the small CNN's first layer")
    demo.add_argument("--stem-stride", type=int, choices=(1, 2), default=1,
                      help="stride of the small CNN's stem (default 1: full resolution; 2 moves layer1's "
                           "stride into the stem: as many FLOPs, faster on the CPU, less accurate)")
    demo.add_argument("--threads", type=_positive, default=None,
                      help="CPU threads (default 1 on the CPU: the convolutions on 16x16 blocks are too "
                           "small for intra-op threads to pay, and on a busy machine they cost several "
                           "times more)")
    demo.add_argument("--data", default=None,
                      help="your own dataset folder (<dir>/16x16/{train,val}.pt, see "
                           "fastcascade.data.load_block_dataset) instead of the embedded one")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    add_selftest_arguments(sub.add_parser("selftest", help="check every op on every backend here against the "
                                          "reference (exit 1 if any disagrees)"))
    args = parser.parse_args(argv)
    if args.command == "selftest":
        return run_selftest(args)
    try:
        run_demo(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as e:
        # bad input or a missing dependency: one line, no traceback
        print(f"python -m fastcascade demo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: the message names the path
        print(f"python -m fastcascade demo: error: {e}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


if __name__ == "__main__":
    sys.exit(main())
