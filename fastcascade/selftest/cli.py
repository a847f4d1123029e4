"""``python -m fastcascade selftest``: the command line of the self-test."""

from __future__ import annotations

import sys

from .run import selftest

# ---------------------------------------------------------------------------------------------
# command line (python -m fastcascade selftest)


def add_arguments(parser) -> None:
    """The selftest subcommand's flags, on an argparse parser."""
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: small and awkward shapes, fewer dtypes, no torch.compile timing; "
                             "without a GPU the Triton kernels run under the interpreter")
    parser.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                        help="also write the results as JSON to PATH (rewritten atomically after every row)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    parser.add_argument("--timing-budget", type=float, default=None, metavar="SECONDS",
                        help="start no further timing after SECONDS from the start (the correctness rows "
                             "always run): for a run that must fit a time slot")


def run_cli(args) -> int:
    """Runs the selftest for parsed arguments: prints the table; 0 when every row passes, 1 when any backend
    disagrees with the reference or is nondeterministic, 2 for bad arguments."""
    try:
        result = selftest(device=args.device, quick=args.quick, json_path=args.json_path,
                          timing_budget=args.timing_budget)
    except ValueError as e:
        print(f"python -m fastcascade selftest: error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0 if result.ok else 1
