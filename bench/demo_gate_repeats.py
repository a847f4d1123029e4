"""Repeat the demo's throughput measurement of `gate` against `flat` on a finished demo run folder.

    python -P bench/demo_gate_repeats.py runs/demo-<timestamp> [--repeats 8]

Rebuilds the two designs from the run's checkpoints and metrics.json (the flat model with batch norm
folded, the Stage-1 trunk head at the chosen gate threshold and fitted temperature) and calls
fastcascade.demo.context.throughputs, the demo's own timing (each design at its fastest batch size, in
turns, best of 3 rounds), `--repeats` times on the test split, one thread. Prints each repeat's blocks/s
and the gate / flat ratio, then the sorted ratios: the spread a single demo run's ratio comes from.
"""

import argparse
import json
import pathlib
import statistics

import torch
from torch import nn

import fastcascade as fc
from fastcascade import data as fd
from fastcascade.cascade import Argmax, Cascade, Stage, Threshold
from fastcascade.demo.context import NUM_LABELS, blocks_of, throughputs
from fastcascade.demo.heads import HIDDEN
from fastcascade.demo.models import GridPool, SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=pathlib.Path, help="a demo run folder (small-cnn backbone, embedded data)")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    m = json.loads((args.run / "metrics.json").read_text())
    if m["config"]["backbone"] != "small-cnn" or m["config"]["data"] != "embedded":
        raise SystemExit("the run must use the small-cnn backbone and the embedded data")
    torch.set_num_threads(1)
    x = blocks_of(fd.load_partition_dataset("test"))
    flat = SmallCNN(NUM_LABELS, m["config"]["width"], stem_stride=m["config"].get("stem_stride", 1))
    fc.load_checkpoint(args.run / "checkpoints" / "flat" / "best.pt", flat)
    flat = fc.inference_form(flat, x[:256])
    trunk, head = fc.split_backbone(flat, at=m["config"]["segments"][:-1])
    first, last = next(iter(trunk)), list(trunk)[-1]
    with torch.no_grad():
        c, h = trunk[first](x[:1]).shape[1:3]
    cells = min(4, h)
    mlp = nn.Sequential(nn.Linear(c * cells * cells, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    fc.load_checkpoint(args.run / "checkpoints" / "trunk_stage1" / "best.pt", mlp)
    stage1 = nn.Sequential(GridPool(cells), nn.Flatten(1), *mlp).eval()
    rule = Threshold(m["designs"]["gate"]["setting"]["gate"], m["timing"]["temperatures"]["trunk stage1"])
    flat_stage = Stage(head, Argmax(), range(NUM_LABELS), name="flat", tap=last)
    gate = Cascade(Stage(stage1, rule, [fd.NONE, flat_stage], name="gate", tap=first), trunk=trunk).eval()
    fns = {"flat": lambda v: flat(v).argmax(1), "gate": gate.predict}
    ratios = []
    with torch.no_grad():
        for rep in range(args.repeats):
            out = throughputs(fns, x, torch.device("cpu"), 3)
            ratios.append(out["gate"][0] / out["flat"][0])
            print(f"repeat {rep}: flat {out['flat'][0]:,.0f} blocks/s (batch {out['flat'][1]}), gate "
                  f"{out['gate'][0]:,.0f} (batch {out['gate'][1]}): {ratios[-1]:.2f}x", flush=True)
    ratios.sort()
    print("gate / flat blocks/s, sorted:", " ".join(f"{r:.2f}" for r in ratios),
          f"| median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
