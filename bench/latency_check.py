"""Does fastcascade's latency model predict what a cascade costs when it runs? Predicted against measured.

The demo's small CNN (fastcascade.demo.models.SmallCNN, batch norm folded by fastcascade.inference_form when
it exists) cut into the demo's trunk, with a Stage-1 head after the first segment as a gate in front of the
flat head (the demo's "gate" design) and a raw-block gate (a 2-conv CNN on the block) in front of the flat
model; random weights, random 16x16 blocks, and the gate's threshold set so that a chosen fraction of the
rows exits early; and one design tuned on latency (fastcascade.tune_cascade(cost="latency")): the raw-block
gate at the best macro F1 within half the flat model's predicted time, on synthetic labels (NONE where the
block is smooth). For each design and exit fraction: the seconds per row fastcascade.LatencyModel predicts
at the run batch size, and the seconds per row measured by running Cascade.predict over the rows in batches
of that size (median of rounds; all designs and fractions take turns in every round, so a burst of load from
elsewhere hits them alike); and the speed-up over the flat model, predicted (the two latency models') and
measured. The latency models are measured in the same process first, every design's parts in the same rounds
(fastcascade.measure_latencies).

    python bench/latency_check.py [--device cpu|cuda] [--threads 1] [--batch 512] [--rows 8192] [--rounds 7]
                                  [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
from torch import nn

import fastcascade as fc
from fastcascade.demo.models import GridPool, SmallCNN


def _head(d_in: int, k: int, cells: int) -> nn.Module:
    return nn.Sequential(GridPool(cells), nn.Flatten(1), nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, k))


def _raw_gate(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(),
                         GridPool(2), nn.Flatten(1), nn.Linear(4 * width, 1))


def designs(device) -> tuple[nn.Module, dict[str, fc.Cascade]]:
    torch.manual_seed(0)
    flat = SmallCNN(8).eval()
    with torch.no_grad():  # batch norm statistics that matter when folded
        for m in flat.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    if hasattr(fc, "inference_form"):
        flat = fc.inference_form(flat, torch.rand(64, 1, 16, 16))
    flat = flat.to(device)
    trunk, head = fc.split_backbone(flat, at=["layer1", "layer2"])
    last = list(trunk)[-1]

    def flat_stage():
        return fc.Stage(head, fc.Argmax(), range(8), name="flat", tap=last)

    gate = fc.Cascade(fc.Stage(_head(32 * 16, 1, 4).to(device), fc.Threshold(0.5), [0, flat_stage()], name="gate",
                               tap="layer1"), trunk=trunk)
    raw = fc.Cascade(fc.Stage(_raw_gate(4).to(device), fc.Threshold(0.5),
                              [0, fc.Stage(flat, fc.Argmax(), range(8), name="flat")], name="raw4"))
    return flat, {"gate": gate.eval(), "raw-gate": raw.eval()}


def _at_fraction(cascade: fc.Cascade, x: torch.Tensor, exit_fraction: float) -> fc.Cascade:
    """The cascade with its root threshold at the quantile that sends exit_fraction of x to branch 0."""
    root = cascade.root
    with torch.no_grad():
        h = x
        if root.tap is not None:
            for name, seg in cascade.trunk.items():
                h = seg(h)
                if name == root.tap:
                    break
        p = torch.sigmoid(root.module(h).reshape(-1).double())
    t = float(torch.quantile(p, exit_fraction)) if 0 < exit_fraction < 1 else float(exit_fraction)
    return cascade.with_setting({root.name: min(max(t, 0.0), 1.0)})


def _measure(fns: dict, x: torch.Tensor, batch: int, rounds: int, device) -> dict[str, float]:
    """Median seconds per row of each fn over x in batches, rounds taken in turns (one warm-up pass each)."""
    chunks = [x[i:i + batch] for i in range(0, x.shape[0] - batch + 1, batch)]  # full batches only
    times = {k: [] for k in fns}

    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for c in chunks:
            fn(c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in fns.values():
        once(fn)
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(once(fn))
    rows = len(chunks) * batch
    return {k: statistics.median(v) / rows for k, v in times.items()}


@torch.no_grad()
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per part and size of the latency model")
    ap.add_argument("--fractions", default="0,0.5,0.8,0.95")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steady = fc.steady_allocator() if device.type == "cpu" else None
    flat, cascades = designs(device)
    x = torch.rand(args.rows, 1, 16, 16, device=device) ** 2  # skewed like luma detail
    sizes = sorted({1, 16, 64, 256, args.batch, max(1, args.batch // 2), 2 * args.batch})
    t0 = time.perf_counter()
    measure = getattr(fc, "measure_latencies", None)
    if measure is None:  # an older fastcascade: one model after another
        lats = {k: fc.measure_latency(m, x[:256], batch_sizes=sizes, repeats=args.repeats)
                for k, m in {"flat": flat, **cascades}.items()}
    else:  # every design's parts in the same rounds
        lats = measure({"flat": flat, **cascades}, x[:256], batch_sizes=sizes, repeats=args.repeats)
    lat_flat = lats.pop("flat")
    t_measure = time.perf_counter() - t0
    fractions = [float(f) for f in args.fractions.split(",")]
    fns, predicted = {"flat": lambda v: flat(v).argmax(1)}, {"flat": lat_flat.seconds_per_row(None, batch_size=args.batch)}
    for k, c in cascades.items():
        for f in fractions:
            cf = _at_fraction(c, x, f)
            fns[(k, f)] = cf.predict
            predicted[(k, f)] = lats[k].seconds_per_row(cf, x, batch_size=args.batch)
    # one tuned design: synthetic labels, NONE (0) where the block's variance is low, else the flat model's guess
    var = x.flatten(1).var(1)
    y = torch.where(var < var.median(), torch.zeros_like(var, dtype=torch.int64), flat(x).argmax(1).clamp(min=1))
    tuned = fc.tune_cascade(cascades["raw-gate"], x, y, cost="latency", latency=lats["raw-gate"],
                            run_batch_size=args.batch, budget=0.5, baseline=lat_flat)
    key = ("raw-gate tuned", float((tuned.cascade.predict(x, return_details=True).exit_stage == 0).double().mean()))
    fns[key] = tuned.cascade.predict
    predicted[key] = lats["raw-gate"].seconds_per_row(tuned.cascade, x, batch_size=args.batch)
    measured = _measure(fns, x, args.batch, args.rounds, device)
    # the same predictions without the runner part (whole calls less their parts), to see what it adds
    bare = {}
    for k in fns:
        if isinstance(k, tuple):
            lat = lats["raw-gate" if k[0].startswith("raw") else "gate"]
            zero = fc.cascade.latency.PartTiming(lat.batch_sizes, (0.0,) * len(lat.batch_sizes),
                                                 (0.0,) * len(lat.batch_sizes))
            no_runner = dataclasses.replace(lat, parts={**lat.parts, "runner": zero})
            c = fns[k].__self__
            bare[k] = no_runner.seconds_per_row(c, x, batch_size=args.batch)
        else:
            bare[k] = predicted[k]
    rows = []
    print(f"device {device} ({fc.cascade.latency.environment(device)['device_name']}), threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, batch {args.batch}, {args.rows} rows, "
          f"{args.rounds} rounds; latency models measured in {t_measure:.1f} s; steady allocator: {steady}")
    print(f"{'design':<14} {'exit':>5} {'predicted us/row':>17} {'measured us/row':>16} {'measured/pred':>13} "
          f"{'x flat (pred)':>13} {'x flat (meas)':>13} {'x flat meas/pred':>16} {'no runner: meas/pred':>20}")
    for k in fns:
        name, f = (k, None) if isinstance(k, str) else k
        r = measured[k] / predicted[k]
        speedup = {"predicted": predicted["flat"] / predicted[k], "measured": measured["flat"] / measured[k]}
        rows.append({"design": name, "exit_fraction": f, "predicted_s_per_row": predicted[k],
                     "measured_s_per_row": measured[k], "ratio": r, "speedup_vs_flat": speedup["measured"],
                     "predicted_speedup_vs_flat": speedup["predicted"],
                     "speedup_measured_over_predicted": speedup["measured"] / speedup["predicted"],
                     "ratio_without_runner": measured[k] / bare[k]})
        print(f"{name:<14} {'' if f is None else f'{f:.2f}':>5} {predicted[k] * 1e6:17.2f} {measured[k] * 1e6:16.2f} "
              f"{r:13.3f} {speedup['predicted']:13.2f} {speedup['measured']:13.2f} "
              f"{speedup['measured'] / speedup['predicted']:16.3f} {measured[k] / bare[k]:20.3f}")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    worst_speedup = max(abs(r["speedup_measured_over_predicted"] - 1) for r in rows)
    print(f"largest |measured / predicted - 1|: {worst:.3f} (seconds per row); {worst_speedup:.3f} (speed-up over flat)")
    out = {"env": fc.cascade.latency.environment(device), "batch": args.batch, "rows": rows, "worst": worst,
           "worst_speedup": worst_speedup, "steady_allocator": steady}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
