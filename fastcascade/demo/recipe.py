"""The demo recipe (``python -m fastcascade demo``): train and evaluate the AV1 partition cascade on the embedded dataset.

Stage 1 (NONE vs PARTITION, sigmoid focal, gamma 2.5, temperature and threshold fitted on val), Stage 2
(SPLIT | RECT | AB, class-balanced softmax focal with label smoothing 0.1, pooled adapters on the frozen
Stage-1 backbone), the RECT specialist (HORZ | VERT), a 3-member AB ensemble (different seeds and
augmentations, hard vote), then the early-exit cascade end to end against a flat 8-class model trained on
as many rows. Prints the tables and writes the run folder (metrics.json, PNGs, checkpoints); the folder
appears only once the run is complete.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from .. import data as fd
from .._checks import device_arg, file_in_the_way
from .._io import write_json
from ..adapters import add_adapters, freeze_backbone
from ..calibration import fit_temperature, tune_threshold
from ..cascade import Cascade, cascade_dense
from ..losses import ClassBalancedFocalLoss, SoftmaxFocalLoss, sigmoid_focal_loss
from ..train import evaluate, fit
from .models import make_backbone, with_new_head
from .plots import plot_confusion, plot_curves

__all__ = ["run_demo"]

NUM_LABELS = fd.NUM_MAIN_CLASSES
LABEL_NAMES = list(fd.LABEL_NAMES[:NUM_LABELS])
# the demo's data has no 4-way partitions: RECT is HORZ | VERT
STAGE_NAMES = {k: list(v[:2] if k == "rect" else v) for k, v in fd.STAGE_CLASS_NAMES.items()}


class DihedralMixup:
    """RandomDihedral then mixup of the AB targets: returns soft (N, 4) targets (for a soft-target loss)."""

    def __init__(self, alpha: float, seed: int):
        self.alpha = alpha
        self.dihedral = fd.RandomDihedral(seed=seed)
        self.generator = self.dihedral.generator

    def __call__(self, blocks: torch.Tensor, labels: torch.Tensor):
        blocks, labels = self.dihedral(blocks, labels)
        return fd.mixup(blocks, fd.stage_targets(labels)["ab"], self.alpha, self.generator, num_classes=4)


def _stage(name: str):
    return lambda labels: fd.stage_targets(labels)[name]


def _load_data(args) -> tuple[fd.PartitionDataset, fd.PartitionDataset]:
    if args.data is not None:
        if pathlib.Path(args.data).expanduser().is_file():
            raise ValueError(f"--data {args.data}: a file; pass the dataset folder, which holds "
                             f"16x16/train.pt and 16x16/val.pt (one file would serve as both splits)")
        train = fd.load_block_dataset(args.data, "train", num_classes=NUM_LABELS)
        val = fd.load_block_dataset(args.data, "val", num_classes=NUM_LABELS)
    else:
        train, val = fd.load_partition_dataset("train"), fd.load_partition_dataset("val")
    for name, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise ValueError(f"the {name} split is empty")
        if int(ds.labels.max()) >= NUM_LABELS:
            raise ValueError(f"the {name} split holds labels >= {NUM_LABELS} (HORZ_4 / VERT_4): the demo "
                             f"cascade predicts the 8 main partition types only")
    return train, val


def _subset(ds, n: int, seed: int):
    if n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def _labels(ds) -> torch.Tensor:
    return ds.dataset.labels[torch.as_tensor(ds.indices)] if isinstance(ds, Subset) else ds.labels


def _blocks(ds) -> torch.Tensor:
    b = ds.dataset.blocks[torch.as_tensor(ds.indices)] if isinstance(ds, Subset) else ds.blocks
    return b.float() / 255 if b.dtype == torch.uint8 else b.float()


@torch.no_grad()
def _throughput(fn, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Blocks per second of fn(x): one warm-up call, then the best of `repeats` timed calls."""
    fn(x)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return x.shape[0] / best


def run_demo(args) -> dict:
    t_start = time.perf_counter()
    device = (device_arg(args.device, "--device") if args.device
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = args.backbone or ("resnet18" if device.type == "cuda" else "small-cnn")
    # what the run needs at its end, checked before it starts
    needed = {"matplotlib": "the plots"}
    if backbone == "resnet18":
        needed["timm"] = "the resnet18 backbone"
    for module, why in needed.items():
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is not installed, and the demo needs it for {why}: pip install {module}")
    quick = args.quick
    epochs = args.epochs or (2 if quick else 8)
    args.batch_size = args.batch_size or (64 if quick else 128)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    amp = torch.bfloat16 if device.type == "cuda" else None
    out = pathlib.Path(args.out or f"runs/demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ValueError(f"--out {out}: " + ("is a file" if blocker == out else f"{blocker} is a file")
                         + "; the run folder must be a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: the folder exists and is not empty; pick another")

    train, val = _load_data(args)  # data errors come before anything is written
    if quick:
        train, val = _subset(train, 4000, args.seed), _subset(val, 2000, args.seed + 1)
    y_train = _labels(train)
    print(f"fastcascade demo: {len(train)} train / {len(val)} val blocks, backbone {backbone}, device "
          f"{device}, {epochs} epochs per model{' (quick)' if quick else ''}")
    print(fd.format_distribution(y_train, NUM_LABELS))

    out.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM (`kill`) raises SystemExit(143) as Ctrl-C raises KeyboardInterrupt, so the cleanup below runs
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)) if in_main else None
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = _train_and_report(args, train, val, y_train, device, backbone, epochs, amp, quick, work)
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
    print(f"\nrun folder: {out} (metrics.json, confusion_*.png, learning_curves.png, checkpoints/)")
    print(f"total time: {result['timing']['total_s']:.1f} s")
    return result


def _train_and_report(args, train, val, y_train, device, backbone, epochs, amp, quick,
                      work: pathlib.Path) -> dict:
    ckpt = work / "checkpoints"
    common = dict(device=device, amp_dtype=amp, progress=args.progress, batch_size=args.batch_size)
    stage_counts = {k: torch.bincount(v[v != fd.IGNORE_INDEX], minlength=len(fd.STAGE_CLASS_NAMES[k]))
                    for k, v in fd.stage_targets(y_train).items()}
    histories, timing, rows_seen = {}, {}, 0

    def train_one(key, model, loss_fn, target, seed, **kw):
        nonlocal rows_seen
        t = time.perf_counter()
        names = STAGE_NAMES[target] if target else LABEL_NAMES
        hist, best = fit(model, loss_fn, train, val, kw.pop("epochs", epochs), seed=seed,
                         target_fn=_stage(target) if target else None, class_names=names,
                         out_dir=ckpt / key, name=key, **common, **kw)
        timing[f"train_{key}_s"] = time.perf_counter() - t
        histories[key] = hist
        n = int((_stage(target)(y_train) != fd.IGNORE_INDEX).sum()) if target else len(train)
        rows_seen += n * len(hist)
        best_epoch = max(range(len(hist)), key=lambda i: hist[i]["val"]["macro_f1"])
        print(f"  {key}: {len(hist)} epochs in {timing[f'train_{key}_s']:.1f} s, best epoch {best_epoch + 1} "
              f"(val macro F1 {hist[best_epoch]['val']['macro_f1']:.4f}) -> {best.relative_to(work)}")
        return model

    print("\n== training ==")
    t_cascade = time.perf_counter()
    # Stage 1: NONE vs PARTITION, one logit
    s1 = make_backbone(backbone, 1, args.seed, args.width)
    def stage1_loss(out, t):
        return sigmoid_focal_loss(out.reshape(-1), t.float(), alpha=None, gamma=2.5)

    s1 = train_one("stage1", s1, stage1_loss, "stage1", args.seed, lr=3e-3,
                   augment=fd.RandomDihedral(seed=args.seed))
    s1_logits, s1_t = _stage_logits(s1, val, "stage1", device)
    temperature = fit_temperature(s1_logits, s1_t)
    threshold, thr_metrics = tune_threshold(torch.sigmoid(s1_logits / temperature), s1_t, objective="f1")

    # Stage 2: adapters on the frozen Stage-1 backbone, class-balanced focal with label smoothing
    s2 = with_new_head(s1, 3, args.seed + 1)
    add_adapters(s2, bottleneck=16, kind="pooled", example_input=torch.zeros(1, 1, 16, 16, device=device))
    trainable = freeze_backbone(s2)
    cb = ClassBalancedFocalLoss(stage_counts["stage2"], beta=0.9999, gamma=2.0, label_smoothing=0.1)
    cb = cb.to(device)
    s2 = train_one("stage2", s2, cb, "stage2", args.seed + 1, param_groups={"adapter": 3e-3, "head": 3e-3},
                   sampler=None)

    # RECT specialist: fine-tunes a copy of the Stage-1 backbone, head first (one frozen epoch)
    rect = with_new_head(s1, 2, args.seed + 2)
    rect = train_one("rect", rect, SoftmaxFocalLoss(gamma=2.0), "rect", args.seed + 2,
                     param_groups={"head": 3e-3, "backbone": 1e-3}, freeze_epochs=1,
                     augment=fd.RandomDihedral(seed=args.seed + 2))

    # AB ensemble: three members, different seeds and augmentations (dihedral; flips only; dihedral + mixup)
    augments = [fd.RandomDihedral(seed=args.seed + 31),
                fd.RandomDihedral(p_transpose=0.0, seed=args.seed + 32),
                DihedralMixup(alpha=0.4, seed=args.seed + 33)]
    # the mixup member learns from soft targets: cross-entropy takes class probabilities
    losses = [SoftmaxFocalLoss(gamma=2.0), SoftmaxFocalLoss(gamma=2.0), F.cross_entropy]
    ab = []
    for k in range(3):
        m = with_new_head(s1, 4, args.seed + 3 + k)
        ab.append(train_one(f"ab{k + 1}", m, losses[k], "ab", args.seed + 3 + k, lr=2e-3, augment=augments[k],
                            sampler="class_balanced" if k == 1 else None))
    timing["train_cascade_s"] = time.perf_counter() - t_cascade
    cascade_rows = rows_seen

    # flat 8-class model with the same budget: as many training rows as all cascade models together
    flat_epochs = max(1, round(cascade_rows / len(train)))
    t_flat = time.perf_counter()
    flat = make_backbone(backbone, NUM_LABELS, args.seed + 9, args.width)
    flat_loss = ClassBalancedFocalLoss(torch.bincount(y_train, minlength=NUM_LABELS), beta=0.9999, gamma=2.0,
                                       label_smoothing=0.1).to(device)
    flat = train_one("flat", flat, flat_loss, None, args.seed + 9, lr=2e-3, epochs=flat_epochs,
                     augment=fd.RandomDihedral(seed=args.seed + 9))
    timing["train_flat_s"] = time.perf_counter() - t_flat

    # the cascade, end to end
    cascade = Cascade.av1_partition(s1, s2, rect, ab, threshold=threshold, temperature=temperature)
    cascade = cascade.to(device).eval()
    crep = evaluate(cascade, val, class_names=LABEL_NAMES, device=device)
    frep = evaluate(flat, val, class_names=LABEL_NAMES, device=device).final
    models = {"stage1": s1, "stage2": s2, "rect": rect, **{f"ab{k + 1}": m for k, m in enumerate(ab)}}
    standalone = {}
    for k, m in models.items():
        stage = "ab" if k.startswith("ab") else k
        rep = evaluate(m, val, target_fn=_stage(stage), class_names=STAGE_NAMES[stage], device=device)
        standalone[k] = rep.final

    print("\n== per-stage, standalone on the val rows that belong to each stage ==")
    for name, rep in standalone.items():
        print(f"\n-- {name} --\n{rep}")
    print(f"\nStage 1 threshold (tuned on val for F1, after temperature {temperature:.3f}): {threshold:.4f} "
          f"(precision {thr_metrics['precision']:.4f}, recall {thr_metrics['recall']:.4f}, "
          f"F1 {thr_metrics['f1']:.4f})")
    print(f"\n== cascade, end to end (early exit) ==\n{crep}")
    print("\nfraction of val blocks reaching each stage: "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in crep.reached.items()))
    print(f"\n== flat 8-class model ({flat_epochs} epochs: the cascade's budget of {cascade_rows} training "
          f"rows) ==\n{frep}")

    # throughput on the val blocks
    x = _blocks(val).to(device)
    repeats = 2 if quick else 3
    with torch.no_grad():
        tput = {"dynamic": _throughput(lambda v: cascade.predict(v, mode="dynamic"), x, device, repeats),
                "static": _throughput(lambda v: cascade.predict(v, mode="static"), x, device, repeats),
                "dense": _throughput(lambda v: cascade_dense(cascade, v), x, device, repeats),
                "flat": _throughput(lambda v: flat(v).argmax(1), x, device, repeats)}
        same = bool(torch.equal(cascade.predict(x, mode="dynamic"), cascade_dense(cascade, x))
                    and torch.equal(cascade.predict(x, mode="static"), cascade_dense(cascade, x)))
    print(f"\n== throughput on {x.shape[0]} val blocks ({device}, batch = all) ==")
    for k, v in tput.items():
        print(f"  {k:<8} {v:12,.0f} blocks/s")
    print(f"  dynamic and static labels equal the dense oracle: {same}")

    c, f = crep.final, frep
    print(f"\n== summary ==\n  cascade: accuracy {c.accuracy:.4f}, macro F1 {c.macro_f1:.4f}, weighted F1 "
          f"{c.weighted_f1:.4f}\n  flat:    accuracy {f.accuracy:.4f}, macro F1 {f.macro_f1:.4f}, weighted "
          f"F1 {f.weighted_f1:.4f}")

    plot_confusion(c.confusion, LABEL_NAMES, "cascade (val)", work / "confusion_cascade.png")
    plot_confusion(f.confusion, LABEL_NAMES, f"flat 8-class (val, {flat_epochs} epochs)",
                    work / "confusion_flat.png")
    for name, rep in crep.stages.items():
        plot_confusion(rep.confusion, list(rep.class_names), f"cascade stage {name} (in cascade)",
                        work / f"confusion_stage_{name}.png")
    plot_curves(histories, work / "learning_curves.png")

    return {
        "config": {"epochs": epochs, "flat_epochs": flat_epochs, "backbone": backbone, "device": str(device),
                   "seed": args.seed, "quick": quick, "batch_size": args.batch_size, "width": args.width,
                   "threads": torch.get_num_threads(),
                   "data": "embedded" if args.data is None else "own", "train_blocks": len(train),
                   "val_blocks": len(val), "adapter_trainable_params": trainable.trainable},
        "stage1": {"temperature": temperature, "threshold": threshold, "threshold_metrics": thr_metrics},
        "standalone": {k: v.to_dict() for k, v in standalone.items()},
        "cascade": crep.to_dict(),
        "flat": frep.to_dict(),
        "summary": {"cascade_accuracy": c.accuracy, "cascade_macro_f1": c.macro_f1,
                    "flat_accuracy": f.accuracy, "flat_macro_f1": f.macro_f1,
                    "cascade_training_rows": cascade_rows,
                    "flat_training_rows": flat_epochs * len(train)},
        "throughput_blocks_per_s": tput,
        "routing_matches_dense": same,
        "history": histories,
        "timing": timing,
    }


@torch.no_grad()
def _stage_logits(model: nn.Module, val, stage: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 logits (N,) and 0/1 targets on the val rows."""
    model.eval()
    t = _stage(stage)(_labels(val))
    x = _blocks(val)
    chunks = [model(x[i:i + 2048].to(device)).float().reshape(-1).cpu() for i in range(0, len(x), 2048)]
    logits = torch.cat(chunks)
    return logits, t
