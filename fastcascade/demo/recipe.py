"""The demo recipe (``python -m fastcascade demo``): train the AV1 partition cascades on the embedded dataset and
compare them with the flat model.

Trains the seed's v6 hierarchy with its own backbones (fastcascade.demo.hierarchy), a flat 8-class model on as
many rows, heads on the flat model's frozen backbone used as a shared trunk (fastcascade.demo.heads) and small
gates on the raw block (fastcascade.demo.gate); then compares the designs (fastcascade.demo.designs) on the test
split at operating points tuned on val on FLOPs and on measured latency: macro F1, accuracy, FLOPs per block,
measured and predicted blocks/s. With --seeds N it does all of that for N seeds and reports means and standard
deviations. Prints the tables and writes the run folder (metrics.json, frontier.png and the other PNGs,
checkpoints; per seed in seed-<s>/ with several seeds); the folder appears only once the run is complete.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time

import torch
from torch.utils.data import Subset

from .. import data as fd
from .._checks import device_arg, file_in_the_way
from .._io import write_json
from ..cascade import split_backbone, steady_allocator
from ..inference import inference_form
from ..metrics import classification_report
from ..train import evaluate
from .ablation import stage1_ablation
from .context import LABEL_NAMES, NUM_LABELS, STAGE_NAMES, Run, blocks_of, labels_of, stage_target
from .designs import build_designs, measure
from .gate import train_raw_gates
from .heads import train_trunk_heads, trunk_features
from .hierarchy import train_flat, train_own_hierarchy
from .plots import plot_confusion, plot_curves, plot_frontier, plot_thresholds
from .report import (
    aggregate,
    aggregate_numbers,
    format_ablation,
    format_calibration,
    format_stages,
    format_summary,
    format_table,
    format_thresholds,
    target_check,
)
from .stage1 import STAGE1_MIN_RECALL, stage_table_of, threshold_ways
from .timing import timed_batch_sizes

__all__ = ["run_demo"]

# where the flat model's backbone is cut into the shared trunk's segments
SEGMENT_ENDS = {"small-cnn": ["layer1", "layer2"], "resnet18": ["layer1", "layer2"]}


def _load_data(args) -> tuple[fd.PartitionDataset, fd.PartitionDataset, fd.PartitionDataset]:
    if args.data is not None:
        if pathlib.Path(args.data).expanduser().is_file():
            raise ValueError(f"--data {args.data}: a file; pass the dataset folder, which holds "
                             f"16x16/train.pt and 16x16/val.pt (one file would serve as both splits)")
        train = fd.load_block_dataset(args.data, "train", num_classes=NUM_LABELS)
        val = fd.load_block_dataset(args.data, "val", num_classes=NUM_LABELS)
        try:
            test = fd.load_block_dataset(args.data, "test", num_classes=NUM_LABELS)
        except FileNotFoundError:
            print("no test.pt: the numbers are reported on val, which also chose the operating points")
            test = val
    else:
        train, val, test = (fd.load_partition_dataset(s) for s in ("train", "val", "test"))
    for name, ds in (("train", train), ("val", val), ("test", test)):
        if len(ds) == 0:
            raise ValueError(f"the {name} split is empty")
        if int(ds.labels.max()) >= NUM_LABELS:
            raise ValueError(f"the {name} split holds labels >= {NUM_LABELS} (HORZ_4 / VERT_4): the demo "
                             f"cascade predicts the 8 main partition types only")
    return train, val, test


def _subset(ds, n: int, seed: int):
    if n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def run_demo(args) -> dict:
    t_start = time.perf_counter()
    device = (device_arg(args.device, "--device") if args.device
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = args.backbone or ("resnet18" if device.type == "cuda" else "small-cnn")
    # what the run needs, checked before it starts: module -> (what for, its pip name)
    needed = {"matplotlib": ("the plots", "matplotlib")}
    if args.data is None:
        needed["skimage"] = ("the embedded dataset's photographs", "scikit-image")
    if backbone == "resnet18":
        needed["timm"] = ("the resnet18 backbone", "timm")
        if args.stem_stride != 1:
            raise ValueError("--stem-stride applies to the small-cnn backbone only (resnet18 keeps timm's stem)")
    for module, (why, package) in needed.items():
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is not installed, and the demo needs it for {why}: pip install {package}")
    quick = args.quick
    epochs = args.epochs or (2 if quick else 6)
    args.batch_size = args.batch_size or (64 if quick else 128)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    # designs are timed and their latency models measured in this process: on the CPU, glibc's adaptive malloc
    # thresholds would make a part's time depend on what ran before it (fastcascade.steady_allocator)
    steady = steady_allocator() if device.type == "cpu" else None
    amp = torch.bfloat16 if device.type == "cuda" else None
    out = pathlib.Path(args.out or f"runs/demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ValueError(f"--out {out}: " + ("is a file" if blocker == out else f"{blocker} is a file")
                         + "; the run folder must be a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: the folder exists and is not empty; pick another")

    train, val, test = _load_data(args)  # data errors come before anything is written
    if quick:
        train, val, test = _subset(train, 4000, args.seed), _subset(val, 2000, args.seed + 1), _subset(test, 2000, args.seed + 2)
    y_train = labels_of(train)
    print(f"fastcascade demo: {len(train)} train / {len(val)} val / {len(test)} test blocks, backbone {backbone}, device "
          f"{device}, {epochs} epochs per model{' (quick)' if quick else ''}")
    print(fd.format_distribution(y_train, NUM_LABELS))

    out.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM (`kill`) raises SystemExit(143) as Ctrl-C raises KeyboardInterrupt, so the cleanup below runs
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)) if in_main else None
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        seeds = [args.seed + k for k in range(args.seeds)]
        runs = []
        for seed in seeds:
            one = copy.copy(args)
            one.seed = seed
            folder = work / f"seed-{seed}" if len(seeds) > 1 else work
            if len(seeds) > 1:
                print(f"\n######## seed {seed} ({len(runs) + 1} of {len(seeds)}) ########")
            runs.append(_train_and_report(one, train, val, test, device, backbone, epochs, amp, quick, folder))
        result = _over_seeds(runs, seeds)
        result["config"]["steady_allocator"] = steady
        result["timing"]["total_s"] = time.perf_counter() - t_start
        write_json(result, work / "metrics.json")
        if out.exists():
            out.rmdir()  # empty (checked above)
        work.rename(out)  # the run folder appears complete or not at all
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print(f"\nrun folder: {out} (metrics.json, frontier.png, confusion_*.png, learning_curves.png, checkpoints/)")
    print(f"total time: {result['timing']['total_s']:.1f} s")
    return result


def _train_and_report(args, train, val, test, device, backbone, epochs, amp, quick, work: pathlib.Path) -> dict:
    run = Run(args, train, val, test, device, backbone, epochs, amp, quick, work)
    print("\n== training ==")
    t = time.perf_counter()
    own = train_own_hierarchy(run)
    run.timing["train_cascade_s"] = time.perf_counter() - t
    cascade_rows = sum(run.rows.values())
    # the flat 8-class model with the same budget: as many training rows as the own-backbone hierarchy
    t = time.perf_counter()
    flat = train_flat(run, cascade_rows)
    run.timing["train_flat_s"] = time.perf_counter() - t
    t = time.perf_counter()
    trunk, flat_head = split_backbone(flat, at=SEGMENT_ENDS[backbone])
    features = trunk_features(run, trunk)
    heads = train_trunk_heads(run, trunk, features)
    run.timing["train_trunk_heads_s"] = time.perf_counter() - t
    t = time.perf_counter()
    raw_gates = train_raw_gates(run)
    run.timing["train_raw_gates_s"] = time.perf_counter() - t

    print("\n== per-stage models of the own-backbone hierarchy, standalone on the test rows of each stage ==")
    standalone = {}
    for k, m in own.models().items():
        stage = "ab" if k.startswith("ab") else k
        standalone[k] = evaluate(m, test, target_fn=stage_target(stage), class_names=STAGE_NAMES[stage],
                                 device=device).final
        print(f"  {k:<7} macro F1 {standalone[k].macro_f1:.4f}, accuracy {standalone[k].accuracy:.4f}")

    t = time.perf_counter()
    for m in (flat, *own.models().values(), *raw_gates.values()):
        m.eval()  # the temperatures are fitted on the models' eval-mode logits
    designs = build_designs(run, own, flat, trunk, flat_head, heads, raw_gates)
    # every design is timed in inference form: a checked copy with batch norm folded into the convolutions (a
    # cascade's copy keeps its trunk and heads shared as the design shares them)
    example = blocks_of(val)[:256].to(device)
    for d in designs:
        d.model = inference_form(d.model, example)
    results = measure(run, designs)
    for r in results.values():
        r["stage_table"] = stage_table_of(r["test"]["final"]["confusion"]).to_dict()
    run.timing["compare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    xv, yv = blocks_of(val).to(device), labels_of(val).to(device)
    xt, yt = blocks_of(test).to(device), labels_of(test)
    by_name = {d.name: d.model for d in designs}
    thresholds = {name: threshold_ways(by_name[name], run, xv, yv, xt, yt) for name in ("v6-trunk", "v6-own")}
    run.timing["thresholds_s"] = time.perf_counter() - t
    ablation = None
    if getattr(args, "ablation", None) == "stage1":
        t = time.perf_counter()
        ablation = stage1_ablation(run, trunk, heads, features)
        run.timing["ablation_s"] = time.perf_counter() - t
    y_test = labels_of(test)
    none = classification_report(torch.zeros_like(y_test), y_test, NUM_LABELS)
    always_none = {"macro_f1": none.macro_f1, "accuracy": none.accuracy}
    _print_results(results, always_none, len(test), quick)

    work.mkdir(parents=True, exist_ok=True)
    plot_frontier(results, work / "frontier.png")
    for key, r in results.items():
        if key == "flat" or key.endswith("@latency"):
            name = key.split("@")[0]
            plot_confusion(torch.tensor(r["test"]["final"]["confusion"]), LABEL_NAMES, f"{name} (test)",
                           work / f"confusion_{name}.png")
    for name, rep in results["v6-trunk@latency"]["test"]["stages"].items():
        plot_confusion(torch.tensor(rep["confusion"]), rep["class_names"], f"v6-trunk stage {name} (test, in cascade)",
                       work / f"confusion_v6-trunk_stage_{name}.png")
    plot_curves(run.histories, work / "learning_curves.png")
    plot_thresholds(thresholds, work / "stage1_thresholds.png")

    return {
        "config": {"epochs": epochs, "flat_epochs": len(run.histories["flat"]), "backbone": backbone,
                   "device": str(device), "seed": args.seed, "quick": quick, "batch_size": args.batch_size,
                   "width": args.width, "stem_stride": args.stem_stride, "threads": torch.get_num_threads(),
                   "data": "embedded" if args.data is None else "own", "train_blocks": len(train),
                   "val_blocks": len(val), "test_blocks": len(test), "segments": list(trunk),
                   "raw_gate_widths": sorted(raw_gates), "adapter_trainable_params": own.adapter_params},
        "designs": results,
        "always_none": always_none,
        "standalone": {k: v.to_dict() for k, v in standalone.items()},
        "stage1": {"calibration": run.calibration, "thresholds": thresholds, "ablation": ablation},
        "summary": {"flat_macro_f1": results["flat"]["macro_f1"], "flat_accuracy": results["flat"]["accuracy"],
                    "cascade_training_rows": cascade_rows, "flat_training_rows": run.rows["flat"],
                    **{f"{k}_macro_f1": v["macro_f1"] for k, v in results.items() if k != "flat"}},
        "throughput_blocks_per_s": {k: v["blocks_per_s"] for k, v in results.items()},
        "routing_matches_dense": all(v.get("routing_matches_dense", True) for v in results.values()),
        "history": run.histories,
        "training_warnings": run.warnings,
        "timing": run.timing,
    }


def _over_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """The first seed's result, with every seed's designs, the aggregate over seeds and the target check."""
    agg = aggregate([r["designs"] for r in runs])
    check = target_check(agg)
    print(f"\n== over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): mean ± std on "
          f"test; x flat blocks/s: per seed the median of per-round ratios ==")
    print(format_summary(agg))
    t = check["target"]
    print(f"  target (mean macro F1 >= flat's, >= {t['throughput_ratio']}x its blocks/s, that speed-up predicted within "
          f"{100 * t['prediction_error']:.0f}%): " + (f"met by {', '.join(check['designs_meeting'])}" if check["met"]
                                                   else "not met")
          + (f"; stretch ({t['stretch_ratio']}x) met by {', '.join(check['stretch_met'])}" if check["stretch_met"]
             else ""))
    tables = {k: [fd.StageTable.from_dict(r["designs"][k]["stage_table"]) for r in runs] for k in runs[0]["designs"]}
    print("\n== the plan's stage table (test, from each design's final 8-class predictions; mean ± std over seeds) ==")
    print(fd.format_stage_table(tables))
    stage1 = aggregate_numbers([r["stage1"] for r in runs])
    print("\n== Stage 1: temperature fitted on val, calibration on test ==")
    print(format_calibration(stage1["calibration"]))
    print(f"\n== Stage 1's threshold chosen on val three ways (Stage 1's own F1 on the plan's grid 0.40-0.70: v5's "
          f"way; precision with recall >= {STAGE1_MIN_RECALL} on the same grid; end to end for macro F1), on test ==")
    print(format_thresholds(stage1["thresholds"]))
    if stage1["ablation"] is not None:
        print("\n== Stage-1 ablation: the trunk's Stage-1 head without each part of the recipe, in v6-trunk tuned "
              "end to end (test) ==")
        print(format_ablation(stage1["ablation"]))
    first = runs[0]
    return {**first, "config": {**first["config"], "seeds": seeds},
            "seeds": {str(s): {"designs": r["designs"], "summary": r["summary"], "stage1": r["stage1"],
                               "training_warnings": r["training_warnings"]}
                      for s, r in zip(seeds, runs)},
            "aggregate": agg, "stage_tables": {k: fd.aggregate_stage_tables(v) for k, v in tables.items()},
            "stage1_aggregate": stage1, "target": check}


def _print_results(results: dict, always_none: dict, n_test: int, quick: bool) -> None:
    print(f"\n== designs on the {n_test} test blocks, at operating points tuned on val on FLOPs and on latency "
          f"(dynamic mode; blocks/s at each one's fastest batch size of {', '.join(map(str, timed_batch_sizes(quick)))}"
          f", medians of rounds; predicted: its latency model) ==")
    print(format_table(results, always_none))
    for key, r in results.items():
        if key.endswith("@latency"):
            print(f"\n-- {r['design']} (tuned on latency): {r['description']} --")
            print(f"  val (tuning split): macro F1 {r['val']['macro_f1']:.4f} at a predicted "
                  f"{1 / r['val']['seconds_per_block']:,.0f} blocks/s, of a frontier of {len(r['frontier_val'])} points")
            print(format_stages(r))
    same = all(r.get("routing_matches_dense", True) for r in results.values())
    print(f"\ndynamic and static labels equal the dense oracle for every design: {same}")
    print(f"always NONE: macro F1 {always_none['macro_f1']:.4f}, accuracy {always_none['accuracy']:.4f}")
