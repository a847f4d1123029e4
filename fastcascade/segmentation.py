"""Segmentation helpers: mIoU reports, test-time augmentation, k-fold splits and class weights.

    report = segmentation_report(logits.argmax(1), masks, num_classes=16, ignore_index=255)
    probs = tta_predict(model.eval(), images)                          # (B, K, H, W), dihedral TTA
    probs = tta_predict(block_classifier, blocks, task="classification", label_maps=maps)  # maps: tta_label_map
    for train_idx, val_idx in kfold_splits(image_ids, k=3): ...        # no image in both sides
    weights = class_weights_from_pixel_counts(pixel_class_counts(masks, 16), "median_frequency")

Transforms are the symmetries of the square, named as torch calls them: "hflip" = x.flip(-1), "vflip" =
x.flip(-2), "transpose" = x.transpose(-1, -2), "rot90" / "rot180" / "rot270" = torch.rot90(x, k, (-2, -1))
(counter-clockwise for k = 1). Each is a sequence of the three elementary ones, and so is its label map:
a class whose meaning changes under a flip (an AV1 partition VERT_A block flipped left-right is VERT_B)
follows its sample through the same sequence of the elementary ops' label tables (tta_label_map;
fastcascade.data.AV1_TTA_LABEL_MAPS are the AV1 partition labels' maps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._checks import tensor_arg
from .losses import class_balanced_weights, inverse_frequency_weights
from .metrics import ClassificationReport, classification_report

__all__ = [
    "TTA_TRANSFORMS",
    "class_weights_from_pixel_counts",
    "kfold_splits",
    "pixel_class_counts",
    "segmentation_report",
    "tta_inverse",
    "tta_label_map",
    "tta_predict",
    "tta_transform",
]

# Each transform as the elementary ops applied in order (hflip: flip(-1), vflip: flip(-2), transpose).
TTA_TRANSFORMS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "hflip": ("hflip",),
    "vflip": ("vflip",),
    "transpose": ("transpose",),
    "rot90": ("hflip", "transpose"),     # torch.rot90(x, 1, (-2, -1))
    "rot180": ("hflip", "vflip"),        # torch.rot90(x, 2, (-2, -1))
    "rot270": ("transpose", "hflip"),    # torch.rot90(x, 3, (-2, -1))
}
_ELEMENTARY = {"hflip": lambda x: x.flip(-1), "vflip": lambda x: x.flip(-2),
               "transpose": lambda x: x.transpose(-1, -2)}


def _check_tta_input(x, name: str) -> None:
    tensor_arg(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}")


def _transform_name(name) -> str:
    if name not in TTA_TRANSFORMS:
        raise ValueError(f"transforms: unknown transform {name!r}; expected one of {sorted(TTA_TRANSFORMS)}")
    return name


def tta_transform(x: torch.Tensor, name: str) -> torch.Tensor:
    """x (..., H, W) under transform `name` (a view where torch gives one)."""
    _check_tta_input(x, "x")
    for op in TTA_TRANSFORMS[_transform_name(name)]:
        x = _ELEMENTARY[op](x)
    return x


def tta_inverse(y: torch.Tensor, name: str) -> torch.Tensor:
    """Undo tta_transform on y (..., H', W'): the elementary ops are involutions, so run them reversed."""
    _check_tta_input(y, "y")
    for op in reversed(TTA_TRANSFORMS[_transform_name(name)]):
        y = _ELEMENTARY[op](y)
    return y


def tta_label_map(name: str, tables: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """int64 (K,) map m of transform `name`: a sample of class c becomes class m[c] once transformed.

    tables: the (K,) maps of the elementary ops {"hflip", "vflip", "transpose"} that `name` uses (e.g.
    fastcascade.data.HFLIP_LABELS / VFLIP_LABELS / TRANSPOSE_LABELS for AV1 partition labels), composed
    in the order the ops are applied."""
    if not isinstance(tables, Mapping) or not tables:
        raise TypeError(f"tables must be a non-empty dict elementary op -> (K,) label map, got {tables!r}")
    ops = TTA_TRANSFORMS[_transform_name(name)]
    k = len(next(iter(tables.values())))
    m = torch.arange(k)
    for op in ops:
        if op not in tables:
            raise ValueError(f"tables: transform {name!r} needs the {op!r} table, got keys {sorted(tables)}")
        m = torch.as_tensor(tables[op], dtype=torch.int64)[m]
    return m


# ---------------------------------------------------------------------------------------------
# reports


def segmentation_report(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int | None = None,
                        class_names: Sequence[str] | None = None) -> ClassificationReport:
    """mIoU and per-class IoU / Dice / precision / recall of a segmentation (fastcascade.confusion_matrix).

    pred: class ids shaped like target (B, H, W), or scores (B, K, H, W) (logits or probabilities,
    argmax over dim 1). target: int class ids (B, H, W); pixels equal to ignore_index are skipped.
    report.miou averages IoU over the classes present in target or prediction.
    """
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a torch.Tensor, got {type(pred).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if pred.is_floating_point():
        if (pred.dim() != target.dim() + 1 or pred.shape[0] != target.shape[0]
                or pred.shape[2:] != target.shape[1:]):
            raise ValueError("pred: scores must be (B, K, H, W) for target (B, H, W), got "
                             f"{tuple(pred.shape)} and target {tuple(target.shape)}")
        if pred.shape[1] != num_classes:
            raise ValueError(f"pred: expected {num_classes} score channels (num_classes), "
                             f"got {pred.shape[1]}")
        pred = pred.argmax(1)
    return classification_report(pred, target, num_classes, class_names, ignore_index)


# ---------------------------------------------------------------------------------------------
# test-time augmentation


def _check_label_maps(label_maps, transforms, k: int) -> dict[str, torch.Tensor]:
    maps = {}
    for name in transforms:
        if name not in label_maps:
            raise ValueError(f"label_maps: no map for transform {name!r} (has {sorted(label_maps)})")
        m = torch.as_tensor(label_maps[name])
        if m.dtype != torch.int64 or m.dim() != 1 or m.numel() < k:
            raise ValueError(f"label_maps[{name!r}]: expected an int64 (K,) map with K >= {k} (the model's "
                             f"classes), got {m.dtype} {tuple(m.shape)}")
        m = m[:k]
        # A model with fewer classes than the table (e.g. 8 main AV1 classes of 10) keeps a prefix: it must
        # still be a permutation of range(k), or probabilities would leave the model's classes.
        if not torch.equal(m.sort().values, torch.arange(k)):
            raise ValueError(f"label_maps[{name!r}]: its first {k} entries must be a permutation of "
                             f"range({k}), got {m.tolist()}")
        maps[name] = m
    return maps


def tta_predict(model, x: torch.Tensor, transforms: Sequence[str] = ("identity", "hflip", "vflip", "rot90"),
                task: str = "segmentation", label_maps: Mapping[str, torch.Tensor] | None = None,
                reduce: str = "mean", activation: str = "softmax") -> torch.Tensor:
    """Test-time augmentation: run model on each transform of x, map each prediction back, combine.

    x: (B, C, H, W) images (or blocks). For each name in transforms (see TTA_TRANSFORMS),
    out = model(tta_transform(x, name)) and, after `activation` over dim 1 ("softmax", "sigmoid" or
    "none" for a model that returns probabilities):
      task="segmentation": out (B, K, H', W') is mapped back with tta_inverse (a rot90 prediction is
        rotated back) to (B, K, H, W);
      task="classification": out (B, K); the class of a transformed sample is label_maps[name][class of
        the original], so column c of the result is column label_maps[name][c] of out (e.g.
        fastcascade.data.AV1_TTA_LABEL_MAPS for partition classifiers: an hflipped VERT_A block is VERT_B).
        label_maps=None: classes that do not change under the transforms.
    reduce: "mean" (of the probabilities) or "max". Returns float probabilities (B, K[, H, W]) on x's
    device, without gradient. The model's train/eval mode is left as it is: call model.eval() first.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a (B, C, H, W) tensor, got {got}")
    if isinstance(transforms, str) or not isinstance(transforms, Sequence) or len(transforms) == 0:
        raise ValueError(f"transforms: expected a non-empty sequence of names from {sorted(TTA_TRANSFORMS)}, "
                         f"got {transforms!r}")
    transforms = [_transform_name(t) for t in transforms]
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if activation not in ("softmax", "sigmoid", "none"):
        raise ValueError(f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}")
    if task == "classification" and label_maps is not None:
        if not isinstance(label_maps, Mapping):
            raise TypeError("label_maps must be a dict transform -> (K,) label map, got "
                            f"{type(label_maps).__name__}")
        missing = [t for t in transforms if t not in label_maps]
        if missing:  # before running the model; the maps themselves are checked once K is known
            raise ValueError(f"label_maps: no map for transform {missing[0]!r} (has {sorted(label_maps)})")
    acc = None
    with torch.no_grad():
        for name in transforms:
            out = model(tta_transform(x, name).contiguous())
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise TypeError(f"model must return a floating tensor, got {type(out).__name__}")
            out = out.float()
            if activation == "softmax":
                out = out.softmax(1)
            elif activation == "sigmoid":
                out = out.sigmoid()
            if task == "segmentation":
                if out.dim() != 4:
                    raise ValueError("model: segmentation outputs must be (B, K, H, W), got "
                                     f"{tuple(out.shape)}")
                out = tta_inverse(out, name)
                if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
                    raise ValueError(f"model: output {tuple(out.shape)} does not map back onto x's "
                                     f"(B, H, W) = {(x.shape[0],) + tuple(x.shape[2:])} under {name!r}")
            else:
                if out.dim() != 2 or out.shape[0] != x.shape[0]:
                    raise ValueError(f"model: classification outputs must be (B, K), got {tuple(out.shape)}")
                if label_maps is not None:
                    m = _check_label_maps(label_maps, [name], out.shape[1])[name]
                    out = out.index_select(1, m.to(out.device))
            if acc is None:
                acc = out.clone()
            elif reduce == "mean":
                acc += out
            else:
                torch.maximum(acc, out, out=acc)
    return acc / len(transforms) if reduce == "mean" else acc


# ---------------------------------------------------------------------------------------------
# k-fold splits


def _labels_arg(t, name: str, n: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected one entry per sample ({n}), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name}: expected integer ids, got dtype {t.dtype}")
    return t.long()


def kfold_splits(n_or_groups, k: int = 3, seed: int = 0,
                 stratify=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k folds as a list of (train_idx, val_idx) sorted int64 tensors; each sample is in exactly one val_idx.

    n_or_groups: the number of samples n, or a (n,) sequence of group ids (e.g. the source image of each
        crop): then whole groups go to one fold, so no group is in both train and val.
    stratify: optional (n,) class ids: each fold gets close to the same share of every class (exactly
        within one sample per class without groups; greedily, as scikit-learn's StratifiedGroupKFold,
        with groups).
    Deterministic: the same arguments give the same folds (torch.Generator seeded with `seed`).
    """
    if isinstance(n_or_groups, bool):
        raise TypeError("n_or_groups must be an int or a sequence of group ids, got bool")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    if isinstance(n_or_groups, int):
        n, groups = n_or_groups, None
        if n < 0:
            raise ValueError(f"n_or_groups: the number of samples must be >= 0, got {n}")
    else:
        groups = torch.as_tensor(n_or_groups)
        if groups.dim() != 1:
            raise ValueError(f"n_or_groups: expected an int or a 1-D sequence of group ids, got shape "
                             f"{tuple(groups.shape)}")
        n = groups.shape[0]
        groups = _labels_arg(groups, "n_or_groups (groups)", n)
    y = None if stratify is None else _labels_arg(stratify, "stratify", n)
    gen = torch.Generator().manual_seed(int(seed))
    fold = torch.empty(n, dtype=torch.int64)
    if groups is None:
        if n < k:
            raise ValueError(f"k: cannot make {k} folds of {n} samples")
        perm = torch.randperm(n, generator=gen)
        if y is not None:
            # Shuffled, then sorted by class (stable): dealing the order round-robin gives each fold
            # floor or ceil of every class's share, and of the total.
            perm = perm[torch.sort(y[perm], stable=True).indices]
        fold[perm] = torch.arange(n) % k
    else:
        uniq, inv = torch.unique(groups, return_inverse=True)
        g = uniq.numel()
        if g < k:
            raise ValueError(f"k: cannot make {k} folds of {g} groups (n_or_groups holds {g} distinct ids)")
        order = torch.randperm(g, generator=gen)
        if y is None:
            cls = torch.zeros(n, dtype=torch.int64)
        else:
            cls = torch.unique(y, return_inverse=True)[1]
        c = int(cls.max()) + 1 if n else 1
        gc = torch.zeros(g, c, dtype=torch.float64).index_put_((inv, cls), torch.ones(n, dtype=torch.float64),
                                                                accumulate=True)
        # Largest groups first (random among equals) so the small ones can even out the folds.
        order = order[torch.sort(-gc.sum(1)[order], stable=True).indices]
        counts = torch.zeros(k, c, dtype=torch.float64)
        group_fold = torch.empty(g, dtype=torch.int64)
        total = gc.sum(0).clamp(min=1)
        for gi in order.tolist():
            # trial[f]: the (k, c) counts if this group went to fold f.
            trial = counts.unsqueeze(0) + torch.eye(k, dtype=torch.float64).unsqueeze(2) * gc[gi]
            # Spread of each class's share across folds (stratification), then of fold sizes.
            spread = (trial / total).std(1, unbiased=False).mean(1) if y is not None else torch.zeros(k)
            size = trial.sum(2).std(1, unbiased=False)
            best = min(range(k), key=lambda f: (round(float(spread[f]), 12), float(size[f]), f))
            counts[best] += gc[gi]
            group_fold[gi] = best
        fold = group_fold[inv]
    splits = []
    for f in range(k):
        val = (fold == f).nonzero().flatten()
        if val.numel() == 0:
            raise ValueError(f"k: fold {f} came out empty; use fewer folds")
        splits.append(((fold != f).nonzero().flatten(), val))
    return splits


# ---------------------------------------------------------------------------------------------
# class weights


def pixel_class_counts(masks: torch.Tensor, num_classes: int, ignore_index: int | None = None,
                       per_image: bool = False) -> torch.Tensor:
    """int64 pixel counts per class of integer masks (N, H, W) (any shape with N first when per_image):
    (C,), or (N, C) per image with per_image=True (what median-frequency balancing wants). Pixels equal
    to ignore_index are skipped; any other id outside [0, C) raises ValueError."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
        raise ValueError(f"masks must hold integer class ids, got dtype {masks.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if per_image and masks.dim() < 1:
        raise ValueError("masks: per_image needs a leading image dimension (N, ...), got a 0-d tensor")
    m = masks.long()
    kept = m != ignore_index if ignore_index is not None else torch.ones_like(m, dtype=torch.bool)
    bad = kept & ((m < 0) | (m >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"masks hold ids outside [0, num_classes = {num_classes})"
                         f"{f' (ignore_index = {ignore_index})' if ignore_index is not None else ''}: "
                         f"{m[bad].unique()[:8].tolist()}")
    if not per_image:
        return torch.bincount(m[kept], minlength=num_classes)
    n = m.shape[0]
    img = torch.arange(n, device=m.device).view((n,) + (1,) * (m.dim() - 1)).expand_as(m)
    flat = img[kept] * num_classes + m[kept]
    return torch.bincount(flat, minlength=n * num_classes).view(n, num_classes)


_WEIGHT_METHODS = ("inverse_frequency", "inverse_sqrt_frequency", "median_frequency", "class_balanced")


def class_weights_from_pixel_counts(counts, method: str = "inverse_frequency", beta: float = 0.9999,
                                    ignore_zero: bool = True) -> torch.Tensor:
    """float32 (C,) class weights (for DiceFocalLoss / softmax_focal_loss `weight`) from pixel counts.

    counts: (C,) pixels per class, or (N, C) per image (pixel_class_counts(..., per_image=True)).
    method:
      "inverse_frequency": w_c proportional to 1 / n_c, "inverse_sqrt_frequency": 1 / sqrt(n_c) (both
        fastcascade.inverse_frequency_weights, normalised to sum to C);
      "class_balanced": effective number of samples (Cui et al. 2019, fastcascade.class_balanced_weights
        with beta; for pixels beta must be very close to 1, since n_c is large);
      "median_frequency": Eigen & Fergus (2015): w_c = median(f) / f_c with f_c = pixels of class c /
        pixels of the images where c is present (needs (N, C) counts; with (C,) counts, / all pixels),
        the median over the present classes (so the median class weighs 1).
    A class with no pixels gets weight 0 with ignore_zero=True (e.g. one absent from a fold); with
    ignore_zero=False it raises ValueError instead.
    """
    if method not in _WEIGHT_METHODS:
        raise ValueError(f"method must be one of {_WEIGHT_METHODS}, got {method!r}")
    c = torch.as_tensor(counts)
    if c.is_complex() or c.dtype == torch.bool or c.dim() not in (1, 2) or c.shape[-1] == 0:
        raise ValueError(f"counts: expected (C,) or (N, C) non-negative pixel counts, got {c.dtype} "
                         f"{tuple(c.shape)}")
    c = c.to(torch.float64)
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError("counts: expected finite counts >= 0")
    total = c.sum(0) if c.dim() == 2 else c
    if not bool((total > 0).any()):
        raise ValueError("counts: no class has any pixel")
    absent = total == 0
    if bool(absent.any()) and not ignore_zero:
        raise ValueError(f"counts: classes {absent.nonzero().flatten().tolist()} have no pixels "
                         "(pass ignore_zero=True to give them weight 0)")
    if method == "inverse_frequency":
        return inverse_frequency_weights(total, power=1.0)
    if method == "inverse_sqrt_frequency":
        return inverse_frequency_weights(total, power=0.5)
    if method == "class_balanced":
        return class_balanced_weights(total, beta=beta)
    if c.dim() == 2:
        # Pixels of the images in which each class appears at all.
        image_pixels = c.sum(1, keepdim=True).expand_as(c)
        denom = torch.where(c > 0, image_pixels, torch.zeros_like(c)).sum(0)
    else:
        denom = torch.full_like(total, float(total.sum()))
    freq = torch.where(absent, torch.ones_like(total), total / denom.clamp(min=1))
    # The usual median (numpy's: the mean of the middle two for an even count); torch.median takes the lower.
    s = freq[~absent].sort().values
    med = (s[(s.numel() - 1) // 2] + s[s.numel() // 2]) / 2
    w = torch.where(absent, torch.zeros_like(freq), med / freq)
    return w.to(torch.float32)
