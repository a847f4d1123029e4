"""Segmentation helpers: reports, test-time augmentation, k-fold splits, class weights."""

import numpy as np
import pytest
import torch
from torch import nn

import fastcascade as fc
from fastcascade.data import NUM_CLASSES, PARTITION_RECTS, partition_map

from conftest import seeded

ALL_TRANSFORMS = tuple(fc.TTA_TRANSFORMS)


# ---------------------------------------------------------------------------------------------
# segmentation_report


def test_segmentation_report_matches_counting_by_hand():
    g = seeded("report")
    target = torch.randint(0, 4, (3, 9, 7), generator=g)
    noise = torch.randint(0, 4, (3, 9, 7), generator=g)
    pred = torch.where(torch.rand(3, 9, 7, generator=g) < 0.7, target, noise)
    target[0, 0, :3] = 255
    rep = fc.segmentation_report(pred, target, 4, ignore_index=255, class_names=["a", "b", "c", "d"])
    keep = target != 255
    for c in range(4):
        p, t = pred[keep] == c, target[keep] == c
        inter, union = (p & t).sum().item(), (p | t).sum().item()
        assert rep.iou[c].item() == pytest.approx(inter / union)
        assert rep.dice[c].item() == pytest.approx(2 * inter / (p.sum() + t.sum()).item())
        assert rep.precision[c].item() == pytest.approx(inter / p.sum().item())
        assert rep.recall[c].item() == pytest.approx(inter / t.sum().item())
    assert rep.miou == pytest.approx(rep.iou.mean().item())
    assert rep.class_names == ("a", "b", "c", "d")
    # Scores (B, K, H, W) give the report of their argmax.
    logits = torch.randn(3, 4, 9, 7, generator=g)
    assert torch.equal(fc.segmentation_report(logits, target, 4, 255).confusion,
                       fc.segmentation_report(logits.argmax(1), target, 4, 255).confusion)


def test_segmentation_report_bad_input():
    with pytest.raises(ValueError, match="pred: expected 3 score channels"):
        fc.segmentation_report(torch.randn(2, 4, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="pred: scores must be"):
        fc.segmentation_report(torch.randn(2, 3, 5, 6), torch.zeros(2, 5, 5, dtype=torch.long), 3)


# ---------------------------------------------------------------------------------------------
# test-time augmentation


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot_transforms_are_torch_rot90(k):
    x = torch.randn(2, 3, 5, 7, generator=seeded("rot", k))
    assert torch.equal(fc.tta_transform(x, f"rot{90 * k}"), torch.rot90(x, k, (-2, -1)))


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_inverse_undoes_transform(name):
    x = torch.randn(2, 3, 5, 7, generator=seeded("inv", name))
    y = fc.tta_transform(x, name)
    assert torch.equal(fc.tta_inverse(y, name), x)
    if name != "identity":  # the transform moves pixels (or, for transposes of a 5x7 image, the shape)
        assert y.shape != x.shape or not torch.equal(y, x)


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_segmentation_tta_maps_each_prediction_back(name):
    # A model whose output is its input's channels: after mapping back, every transform must give x's softmax.
    x = torch.randn(2, 4, 6, 6, generator=seeded("back", name))
    probs = fc.tta_predict(nn.Identity(), x, transforms=(name,))
    torch.testing.assert_close(probs, x.softmax(1))  # softmax may round differently at a moved position
    # A position-dependent model is not equivariant: if the inverse were wrong (or missing) for this
    # transform, the mapped-back prediction would not be the position map of the original frame.
    x = torch.randn(1, 1, 5, 5)

    class Position(nn.Module):  # logit of class 1 = the input's top-left pixel, placed at the top-left
        def forward(self, t):
            out = torch.zeros(t.shape[0], 2, *t.shape[2:])
            out[:, 1, 0, 0] = 10.0
            return out

    probs = fc.tta_predict(Position(), x, transforms=(name,))
    expected = torch.zeros(5, 5)
    expected[0, 0] = 1.0
    expected = fc.tta_inverse(expected, name)
    assert torch.equal((probs[0, 1] > 0.9).float(), expected)


def test_equivariant_model_same_with_and_without_tta():
    conv = nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 8, 8, generator=seeded("equi"))
    with torch.no_grad():
        plain = conv(x).softmax(1)
    for reduce in ("mean", "max"):
        torch.testing.assert_close(fc.tta_predict(conv, x, transforms=ALL_TRANSFORMS, reduce=reduce), plain)


def test_tta_non_square_rot90_and_averaging():
    x = torch.randn(2, 3, 4, 6, generator=seeded("nonsq"))
    conv = nn.Conv2d(3, 2, 3, padding=1)   # not equivariant: the TTA mean differs from the plain prediction
    probs = fc.tta_predict(conv, x)
    assert probs.shape == (2, 2, 4, 6)
    with torch.no_grad():
        each = [fc.tta_inverse(conv(fc.tta_transform(x, n)).softmax(1), n)
                for n in ("identity", "hflip", "vflip", "rot90")]
    torch.testing.assert_close(probs, torch.stack(each).mean(0))
    assert not torch.allclose(probs, each[0])


def _region_sets(block: torch.Tensor) -> set:
    """The partition of a block's pixels into regions of equal value, as a set of frozensets of (row, col)."""
    regions = {}
    for (r, c), v in np.ndenumerate(block.numpy()):
        regions.setdefault(v, set()).add((r, c))
    return {frozenset(s) for s in regions.values()}


def _block_of(label: int) -> torch.Tensor:
    return partition_map(label).float()


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_av1_label_maps_follow_the_partition_geometry(name):
    m = fc.AV1_TTA_LABEL_MAPS[name]
    assert sorted(m.tolist()) == list(range(NUM_CLASSES))
    for label in PARTITION_RECTS:
        moved = fc.tta_transform(_block_of(label), name)
        assert _region_sets(moved) == _region_sets(_block_of(int(m[label]))), (name, label)
    if name.startswith("rot"):  # the same through torch.rot90 itself
        k = int(name[3:]) // 90
        for label in PARTITION_RECTS:
            assert _region_sets(torch.rot90(_block_of(label), k)) == _region_sets(_block_of(int(m[label])))


def test_rot90_label_map_is_not_an_involution():
    # A rot90 map equal to its inverse (e.g. a plain transpose) would be wrong for the AB types.
    m = fc.AV1_TTA_LABEL_MAPS["rot90"]
    assert not torch.equal(m[m], torch.arange(NUM_CLASSES))
    assert torch.equal(m[fc.AV1_TTA_LABEL_MAPS["rot270"]], torch.arange(NUM_CLASSES))


class PartitionOracle(nn.Module):
    """Classifies a (B, 1, 16, 16) block by which partition's sub-blocks its constant regions are."""

    def forward(self, x):
        templates = [_region_sets(_block_of(label)) for label in range(NUM_CLASSES)]
        logits = torch.full((x.shape[0], NUM_CLASSES), -5.0)
        for i in range(x.shape[0]):
            logits[i, templates.index(_region_sets(x[i, 0]))] = 5.0
        return logits


def test_classification_tta_with_av1_label_maps():
    labels = torch.arange(NUM_CLASSES)
    # Each sub-block a distinct random level so the oracle sees only the geometry.
    g = seeded("oracle")
    blocks = torch.stack([_block_of(int(lb)) * 10 + torch.rand((), generator=g) for lb in labels])[:, None]
    oracle = PartitionOracle()
    plain = oracle(blocks).softmax(1)
    probs = fc.tta_predict(oracle, blocks, transforms=ALL_TRANSFORMS, task="classification",
                           label_maps=fc.AV1_TTA_LABEL_MAPS)
    torch.testing.assert_close(probs, plain)
    assert torch.equal(probs.argmax(1), labels)
    # Without the label swaps the transformed predictions land on the wrong classes.
    unmapped = fc.tta_predict(oracle, blocks, transforms=ALL_TRANSFORMS, task="classification")
    assert not torch.allclose(unmapped, plain)


def test_classification_tta_prefix_of_label_maps():
    # An 8-class (main labels) model uses the first 8 entries: HORZ_4 / VERT_4 never enter them.
    x = torch.randn(3, 1, 16, 16)
    head = nn.Sequential(nn.Flatten(), nn.Linear(256, 8))
    probs = fc.tta_predict(head, x, task="classification", label_maps=fc.AV1_TTA_LABEL_MAPS)
    assert probs.shape == (3, 8)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_tta_bad_input():
    conv = nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="x: expected a .B, C, H, W."):
        fc.tta_predict(conv, x[0])
    with pytest.raises(ValueError, match="transforms: unknown transform 'rot45'"):
        fc.tta_predict(conv, x, transforms=("rot45",))
    with pytest.raises(ValueError, match="task must be"):
        fc.tta_predict(conv, x, task="detection")
    with pytest.raises(ValueError, match="reduce must be"):
        fc.tta_predict(conv, x, reduce="median")
    head = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    bad = {n: torch.tensor([0, 0, 1]) for n in ALL_TRANSFORMS}
    with pytest.raises(ValueError, match=r"label_maps\['identity'\]: .* permutation"):
        fc.tta_predict(head, x, task="classification", label_maps=bad)
    with pytest.raises(ValueError, match="label_maps: no map for transform 'rot90'"):
        fc.tta_predict(head, x, transforms=("identity", "rot90"), task="classification",
                       label_maps={"identity": torch.arange(3)})


# ---------------------------------------------------------------------------------------------
# k-fold splits


def _check_partition(splits, n, k):
    assert len(splits) == k
    vals = torch.cat([v for _, v in splits])
    assert torch.equal(vals.sort().values, torch.arange(n))          # each sample validated exactly once
    for tr, va in splits:
        assert tr.dtype == va.dtype == torch.int64
        assert not set(tr.tolist()) & set(va.tolist())
        assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(n))


def test_kfold_plain_coverage_sizes_determinism():
    splits = fc.kfold_splits(10, k=3, seed=1)
    _check_partition(splits, 10, 3)
    assert sorted(v.numel() for _, v in splits) == [3, 3, 4]
    again = fc.kfold_splits(10, k=3, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(splits, again))
    other = fc.kfold_splits(10, k=3, seed=2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(splits, other))


def test_kfold_stratified():
    y = torch.tensor([0] * 12 + [1] * 6 + [2] * 3)
    splits = fc.kfold_splits(len(y), k=3, stratify=y)
    _check_partition(splits, len(y), 3)
    for _, va in splits:
        assert torch.bincount(y[va], minlength=3).tolist() == [4, 2, 1]


def test_kfold_groups_never_straddle():
    g = seeded("groups")
    groups = torch.randint(0, 9, (60,), generator=g)
    splits = fc.kfold_splits(groups, k=3, seed=0)
    _check_partition(splits, 60, 3)
    for tr, va in splits:
        assert not set(groups[tr].tolist()) & set(groups[va].tolist())
    sizes = [v.numel() for _, v in splits]
    assert max(sizes) - min(sizes) <= torch.bincount(groups).max()
    assert all(torch.equal(a[1], b[1]) for a, b in zip(splits, fc.kfold_splits(groups.tolist(), k=3, seed=0)))


def test_kfold_stratified_groups():
    # 12 groups: 6 of class 0 and 6 of class 1 (one class per group): each fold gets 2 + 2 groups.
    groups = torch.arange(12).repeat_interleave(5)
    y = (torch.arange(12) % 2).repeat_interleave(5)
    splits = fc.kfold_splits(groups, k=3, stratify=y, seed=3)
    _check_partition(splits, 60, 3)
    for tr, va in splits:
        assert not set(groups[tr].tolist()) & set(groups[va].tolist())
        assert torch.bincount(y[va], minlength=2).tolist() == [10, 10]


def test_kfold_bad_input():
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        fc.kfold_splits(10, k=1)
    with pytest.raises(ValueError, match="k: cannot make 3 folds of 2 samples"):
        fc.kfold_splits(2, k=3)
    with pytest.raises(ValueError, match="k: cannot make 3 folds of 2 groups"):
        fc.kfold_splits([0, 0, 1, 1], k=3)
    with pytest.raises(ValueError, match=r"stratify: expected one entry per sample \(5\)"):
        fc.kfold_splits(5, k=2, stratify=[0, 1])
    with pytest.raises(ValueError, match="n_or_groups"):
        fc.kfold_splits(torch.zeros(2, 2, dtype=torch.long), k=2)


# ---------------------------------------------------------------------------------------------
# class weights


def test_pixel_class_counts():
    masks = torch.tensor([[[0, 0, 1], [2, 255, 1]], [[1, 1, 1], [1, 0, 255]]])
    assert fc.pixel_class_counts(masks, 4, ignore_index=255).tolist() == [3, 6, 1, 0]
    per_image = fc.pixel_class_counts(masks, 4, ignore_index=255, per_image=True)
    assert per_image.tolist() == [[2, 2, 1, 0], [1, 4, 0, 0]]
    with pytest.raises(ValueError, match=r"masks hold ids outside \[0, num_classes = 4\).*\[255\]"):
        fc.pixel_class_counts(masks, 4)
    with pytest.raises(ValueError, match="masks must hold integer"):
        fc.pixel_class_counts(masks.float(), 4)


def test_class_weights_inverse_and_balanced():
    counts = torch.tensor([900, 90, 10, 0])
    w = fc.class_weights_from_pixel_counts(counts, "inverse_frequency")
    raw = torch.tensor([1 / 900, 1 / 90, 1 / 10, 0.0])
    torch.testing.assert_close(w, (raw * 4 / raw.sum()).float())
    torch.testing.assert_close(fc.class_weights_from_pixel_counts(counts, "class_balanced", beta=0.99),
                               fc.class_balanced_weights(counts, beta=0.99))
    torch.testing.assert_close(fc.class_weights_from_pixel_counts(counts, "inverse_sqrt_frequency"),
                               fc.inverse_frequency_weights(counts, power=0.5))
    with pytest.raises(ValueError, match=r"counts: classes \[3\] have no pixels"):
        fc.class_weights_from_pixel_counts(counts, ignore_zero=False)
    with pytest.raises(ValueError, match="method must be one of"):
        fc.class_weights_from_pixel_counts(counts, "sqrt")


def test_class_weights_median_frequency_eigen_fergus():
    # Image 0: 100 pixels (class 0: 80, class 1: 20); image 1: 100 pixels (class 0: 50, class 2: 50).
    per_image = torch.tensor([[80, 20, 0, 0], [50, 0, 50, 0]])
    w = fc.class_weights_from_pixel_counts(per_image, "median_frequency")
    f = torch.tensor([130 / 200, 20 / 100, 50 / 100])    # pixels / pixels of images where the class appears
    med = f.median()                                    # odd count: the middle one (0.5)
    torch.testing.assert_close(w, torch.cat([med / f, torch.zeros(1)]).float())
    # (C,) totals: frequency over all pixels; even number of present classes: the mean of the middle two.
    w2 = fc.class_weights_from_pixel_counts(torch.tensor([60, 30, 10, 0, 0]), "median_frequency")
    f2 = torch.tensor([0.6, 0.3, 0.1])
    torch.testing.assert_close(w2, torch.cat([f2[1] / f2, torch.zeros(2)]).float())
    w3 = fc.class_weights_from_pixel_counts(torch.tensor([40, 30, 20, 10]), "median_frequency")
    torch.testing.assert_close(w3, (0.25 / torch.tensor([0.4, 0.3, 0.2, 0.1])).float())
