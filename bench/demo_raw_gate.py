"""Probe the demo's raw-block gate (fastcascade.demo.gate): time, FLOPs and Stage-1 quality against the flat model.

    python -P bench/demo_raw_gate.py [--quick] [--widths 4 8] [--repeats 15] [--no-train]

One thread. Times each RawGate width (with and without its block-variance input) and the flat model
(SmallCNN(8), batch norm folded, as the demo times it) on 512 and 2,048 rows of the test split, in turns,
the median of `--repeats`; prints FLOPs per block (fastcascade.flops_per_row) beside them. Then trains each
gate as the demo does (train_raw_gates on the embedded data's train split; --quick: the demo's --quick
subsets and 2 epochs) and prints, on val, the Stage-1 F1 / precision / recall at logit 0 and how many rows a
threshold sends out as NONE at a NONE precision of at least 0.9 (and 0.95); then the same threshold on test.
The block variance alone (a threshold on it) is the reference a learned gate has to beat.

The gates in front of the flat model and the v6 hierarchy, tuned and timed, are the demo's designs raw<w> and
raw<w>-v6 (python -m fastcascade demo).
"""

import argparse
import pathlib
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

import fastcascade as fc
from fastcascade import data as fd
from fastcascade import flops_per_row
from fastcascade.demo.context import Run, blocks_of, labels_of
from fastcascade.demo.gate import RawGate, train_raw_gates
from fastcascade.demo.models import SmallCNN


def _subset(ds, n, seed):
    if n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return torch.utils.data.Subset(ds, idx.tolist())


@torch.no_grad()
def time_models(models: dict, x: torch.Tensor, sizes, repeats: int) -> dict:
    """{(name, size): median seconds per block} over all of x in batches of size, every (model, size) in turns."""
    chunks = {b: [x[i:i + b] for i in range(0, len(x), b)] for b in sizes}
    times = {(k, b): [] for k in models for b in sizes}
    for _ in range(repeats + 1):  # the first round warms up
        for k, b in times:
            t = time.perf_counter()
            for c in chunks[b]:
                models[k](c)
            times[k, b].append((time.perf_counter() - t) / len(x))
    return {key: statistics.median(v[1:]) for key, v in times.items()}


def none_out(logits: torch.Tensor, t: torch.Tensor, precision: float):
    """The largest threshold whose rows below it (called NONE) are NONE with at least `precision`:
    (threshold, fraction of rows sent out, fraction of PARTITION rows sent out by mistake)."""
    order = logits.argsort()
    none = (t[order] == 0).float()
    prec = none.cumsum(0) / torch.arange(1, len(t) + 1)
    ok = (prec >= precision).nonzero()
    if len(ok) == 0:
        return float("-inf"), 0.0, 0.0
    k = int(ok.max()) + 1
    thr = float(logits[order[k - 1]])
    lost = float((t[order[:k]] == 1).sum()) / max(1, int((t == 1).sum()))
    return thr, k / len(t), lost


def f1_prec_rec(pred_part: torch.Tensor, t: torch.Tensor) -> dict:
    out = {}
    for name, c in (("none", 0), ("part", 1)):
        p, y = pred_part == c, t == c
        tp = float((p & y).sum())
        prec, rec = tp / max(1.0, float(p.sum())), tp / max(1.0, float(y.sum()))
        out[name] = (2 * prec * rec / max(1e-12, prec + rec), prec, rec)
    out["macro_f1"] = (out["none"][0] + out["part"][0]) / 2
    return out


def auc(scores: torch.Tensor, t: torch.Tensor) -> float:
    """ROC AUC of scores for PARTITION (t == 1) against NONE (ties count half)."""
    pos, neg = scores[t == 1], scores[t == 0]
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def report(name: str, logits_v, tv, logits_t, tt) -> None:
    m = f1_prec_rec((logits_v > 0).long(), tv)
    line = (f"  {name:<14} val AUC {auc(logits_v, tv):.4f} macro F1 {m['macro_f1']:.4f} | NONE F1/P/R {m['none'][0]:.3f}/{m['none'][1]:.3f}/"
            f"{m['none'][2]:.3f} | PART F1/P/R {m['part'][0]:.3f}/{m['part'][1]:.3f}/{m['part'][2]:.3f}")
    print(line)
    for p in (0.9, 0.95):
        thr, frac, lost = none_out(logits_v, tv, p)
        ft = float((logits_t < thr).float().mean()) if thr > float("-inf") else 0.0
        sent = logits_t < thr
        pt = float((tt[sent] == 0).float().mean()) if sent.any() else float("nan")
        lost_t = float((tt[sent] == 1).sum()) / max(1, int((tt == 1).sum()))
        print(f"      NONE precision >= {p}: val sends out {frac:.1%} (PARTITION lost {lost:.1%}); same threshold on "
              f"test: {ft:.1%} out, NONE precision {pt:.3f}, PARTITION lost {lost_t:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, val, test = (fd.load_partition_dataset(s, verbose=False) for s in ("train", "val", "test"))
    if args.quick:
        train, val, test = _subset(train, 4000, args.seed), _subset(val, 2000, args.seed + 1), _subset(test, 2000, 2)
    xt = blocks_of(fd.load_partition_dataset("test", verbose=False))
    ex = xt[:1]

    flat = fc.inference_form(SmallCNN(8).eval(), xt[:256])
    models = {"flat": flat}
    for w in args.widths:
        for var in (True, False):
            models[f"gate{w}" + ("" if var else "-novar")] = fc.inference_form(RawGate(w, var).eval(), xt[:256])
    models["variance"] = RawGate(1).eval().log_variance  # the gate's variance input alone
    models["torch.var"] = lambda v: v.flatten(1).var(1)
    secs = time_models(models, xt[:2048], (512, 2048), args.repeats)
    fl = flops_per_row(flat, ex)
    print(f"one thread, {args.repeats} repeats in turns, medians; flat = SmallCNN(8) width 16, batch norm folded")
    print(f"  {'model':<14} {'FLOPs/block':>12} {'x flat':>7} | {'us/block @512':>14} {'x flat':>7} | "
          f"{'us/block @2048':>15} {'x flat':>7}")
    for k, m in models.items():
        f = flops_per_row(m, ex) if isinstance(m, torch.nn.Module) else 0
        print(f"  {k:<14} {f:>12,} {f / fl:>7.2%} | {secs[k, 512] * 1e6:>14.2f} {secs[k, 512] / secs['flat', 512]:>7.2%} | "
              f"{secs[k, 2048] * 1e6:>15.2f} {secs[k, 2048] / secs['flat', 2048]:>7.2%}")
    if args.no_train:
        return

    with tempfile.TemporaryDirectory() as work:
        run_args = SimpleNamespace(seed=args.seed, batch_size=64 if args.quick else 128, progress=False)
        run = Run(run_args, train, val, test, torch.device("cpu"), "small-cnn", 2 if args.quick else 6, None,
                  args.quick, pathlib.Path(work))
        gates = train_raw_gates(run, widths=tuple(args.widths))
        for w in gates:
            print(f"    gate{w} trained in {run.timing[f'train_gate{w}_s']:.1f} s")
        run.work = pathlib.Path(work) / "novar"
        novar = train_raw_gates(run, widths=tuple(args.widths), variance=False)
        tv, tt = (fd.stage_targets(labels_of(d))["stage1"] for d in (val, test))
        xv, xtt = blocks_of(val), blocks_of(test)
        print(f"\nStage 1 on val ({len(tv)} rows, {float((tv == 0).float().mean()):.1%} NONE) and test "
              f"({len(tt)} rows, {float((tt == 0).float().mean()):.1%} NONE)")
        with torch.no_grad():
            lv, lt = (torch.log(x.flatten(1).var(1) + 1e-4) for x in (xv, xtt))
            report("variance only", lv, tv, lt, tt)  # threshold on log variance; 'logit 0' is meaningless here
            for w in gates:
                for name, g in ((f"gate{w}", gates[w]), (f"gate{w}-novar", novar[w])):
                    g.eval()
                    report(name, g(xv).reshape(-1), tv, g(xtt).reshape(-1), tt)


if __name__ == "__main__":
    main()
