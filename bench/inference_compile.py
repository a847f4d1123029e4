"""Does torch.compile help the demo's designs in inference form on one CPU thread? (bench/inference_notes.md)

    python -P bench/inference_compile.py --config compile     # torch.compile(dynamic=True)
    python -P bench/inference_compile.py --config freezing    # the same with torch._inductor.config.freezing

Builds the demo's small CNN (fastcascade.demo.models.SmallCNN(8), seed 0, random batch-norm statistics so
that folding changes the weights) and the demo's "gate" design over it (the flat model cut into a trunk at
layer1 / layer2 by fastcascade.split_backbone; a Stage-1-like head on layer1: GridPool(4), an MLP of 64
hidden units, one logit, its threshold set to the median probability on the timed rows so half of them exit
at layer1; the other half run the rest of the trunk and the flat head). Both go through
fastcascade.inference_form (the eager baseline), then a copy of each is compiled: the flat model as one
module, the cascade per trunk segment and per stage module (dynamic=True: the cascade's sub-batches change
size with every batch). Each variant runs on all rows in batches of 128, 512 and 2048 (16x16 one-channel
blocks, uniform in [0, 1]); the first pass of each (variant, batch size) is timed on its own (it holds the
compilation), then `--repeats` rounds time every (variant, batch size) in turn and the median is reported.
One thread; inductor's cache in a fresh folder (cold compiles) unless --warm-cache; compile_threads = 1.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # before torch reads it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

import copy

import torch
from torch import nn

import fastcascade as fc
from fastcascade.cascade import Argmax, Cascade, Stage, Threshold
from fastcascade.demo.models import GridPool, SmallCNN

BATCH_SIZES = (128, 512, 2048)


def build(rows: int):
    torch.manual_seed(0)
    flat = SmallCNN(8)
    with torch.no_grad():
        for bn in (m for m in flat.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    flat.eval()
    x = torch.rand(rows, 1, 16, 16)
    trunk, head = fc.split_backbone(flat, at=["layer1", "layer2"])
    first, last = next(iter(trunk)), list(trunk)[-1]
    stage1 = nn.Sequential(GridPool(4), nn.Flatten(1), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 1)).eval()
    with torch.no_grad():
        p = torch.sigmoid(stage1(trunk[first](x)).reshape(-1))
    flat_stage = Stage(head, Argmax(), range(8), name="flat", tap=last)
    gate = Cascade(Stage(stage1, Threshold(p.median().item()), [0, flat_stage], name="gate", tap=first), trunk=trunk)
    return fc.inference_form(flat, x[:256]), fc.inference_form(gate.eval(), x[:256]), x


def compiled(flat: nn.Module, gate: Cascade):
    cflat, cgate = copy.deepcopy(flat), copy.deepcopy(gate)
    cflat = torch.compile(cflat, dynamic=True)
    for name in list(cgate.trunk):
        cgate.trunk[name] = torch.compile(cgate.trunk[name], dynamic=True)
    for node in cgate.nodes:
        node.module = torch.compile(node.module, dynamic=True)
    return cflat, cgate


def one_pass(fn, chunks) -> float:
    t = time.perf_counter()
    for c in chunks:
        fn(c)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("compile", "freezing"), required=True)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's cache folder (warm compiles)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    torch._dynamo.config.recompile_limit = 64  # nn.Sequential.forward is one code object for every segment
    if args.config == "freezing":
        torch._inductor.config.freezing = True
    flat, gate, x = build(args.rows)
    cflat, cgate = compiled(flat, gate)
    fns = {"flat eager": lambda v: flat(v).argmax(1), "flat compiled": lambda v: cflat(v).argmax(1),
           "gate eager": gate.predict, "gate compiled": cgate.predict}
    chunks = {b: list(x.split(b)) for b in BATCH_SIZES}
    first, times = {}, {(k, b): [] for k in fns for b in BATCH_SIZES}
    with torch.no_grad():
        for k, fn in fns.items():
            for b in BATCH_SIZES:
                first[k, b] = one_pass(fn, chunks[b])
                print(f"first pass {k:<14} batch {b:>5}: {first[k, b]:7.2f} s", flush=True)
        for b in BATCH_SIZES:
            for k in ("flat", "gate"):
                same = torch.cat([fns[f"{k} eager"](c) for c in chunks[b]]).eq(
                    torch.cat([fns[f"{k} compiled"](c) for c in chunks[b]])).float().mean().item()
                print(f"labels equal, {k} batch {b}: {same:.4f}")
        for _ in range(args.repeats):
            for (k, b), ts in times.items():
                ts.append(one_pass(fns[k], chunks[b]))
    stats = dict(torch._dynamo.utils.counters["stats"])
    print(f"\n{args.config}: torch {torch.__version__}, {args.rows} rows, median of {args.repeats} rounds, "
          f"1 thread; dynamo stats {stats}")
    print("| variant | " + " | ".join(f"blocks/s @{b}" for b in BATCH_SIZES) + " | first passes (s) |")
    print("|---|" + "---:|" * (len(BATCH_SIZES) + 1))
    out = {}
    for k in fns:
        bps = [args.rows / statistics.median(times[k, b]) for b in BATCH_SIZES]
        out[k] = {"blocks_per_s": dict(zip(BATCH_SIZES, bps)), "first_pass_s": {b: first[k, b] for b in BATCH_SIZES}}
        print(f"| {k} | " + " | ".join(f"{v:,.0f}" for v in bps)
              + f" | {' / '.join(f'{first[k, b]:.2f}' for b in BATCH_SIZES)} |")
    for k in ("flat", "gate"):
        print(f"{k}: compiled / eager blocks/s: " + ", ".join(
            f"@{b} {out[k + ' compiled']['blocks_per_s'][b] / out[k + ' eager']['blocks_per_s'][b]:.2f}x"
            for b in BATCH_SIZES))
    print(json.dumps({"config": args.config, "rows": args.rows, "repeats": args.repeats, "results": out}))


if __name__ == "__main__":
    main()
