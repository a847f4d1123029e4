"""fastcascade.data: the labeller, the embedded dataset, augmentation, stage targets, own-dataset files."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import seeded

import fastcascade.data as fd
from fastcascade.data import (
    HFLIP_LABELS,
    IGNORE_INDEX,
    LABEL_NAMES,
    NONE,
    NUM_CLASSES,
    NUM_MAIN_CLASSES,
    PARTITION_RECTS,
    STAGE_CLASS_NAMES,
    TRANSPOSE_LABELS,
    VFLIP_LABELS,
    label_blocks,
    partition_map,
)

# SHA-256 of the default dataset (split "all"): labels as int64 bytes, blocks as uint8 bytes. A change
# here means the dataset changed: bump LABELLER_VERSION / DATASET_VERSION (they key users' caches).
PINNED_LABELS_SHA256 = "e3343ca84693349b960749647afc45228a599acaf3bf1f6af4fc05895eaf4dbe"
PINNED_BLOCKS_SHA256 = "c956bdf153cb15e30320addf419098aa5e4b8ea6beab2ebeec88f3341d0ebfb8"

TRANSFORMS = {  # name -> (block transform on (..., 16, 16), label table)
    "hflip": (lambda x: x.flip(-1), HFLIP_LABELS),
    "vflip": (lambda x: x.flip(-2), VFLIP_LABELS),
    "transpose": (lambda x: x.transpose(-1, -2), TRANSPOSE_LABELS),
}


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fastcascade-data")


@pytest.fixture(scope="module")
def full(cache_dir):
    """The default dataset, built once for this module into a temporary cache."""
    return fd.load_partition_dataset("all", cache_dir=cache_dir)


def painted(labels: torch.Tensor, gen: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Blocks that are flat on each sub-block of the given partitions, with well-separated random
    levels (and optional noise): the partition a block was painted with fits it best. The four strips
    of HORZ_4 / VERT_4 alternate dark and light: a monotone staircase is close to a smooth ramp, which
    one 16x16 transform codes cheaply (NONE), as an encoder's transform would."""
    n = len(labels)
    steps = torch.tensor([20.0, 60.0, 100.0, 140.0, 180.0, 220.0])
    levels = steps[torch.rand(n, 6, generator=gen).argsort(dim=1)]
    four = (labels == fd.HORZ_4) | (labels == fd.VERT_4)
    s = levels[:, :4].sort(dim=1).values
    levels[:, :4] = torch.where(four[:, None], s[:, [0, 2, 1, 3]], levels[:, :4])
    maps = torch.stack([partition_map(k) for k in range(NUM_CLASSES)])
    out = levels.gather(1, maps[labels].flatten(1)).view(n, 1, 16, 16)
    out += noise * torch.randn(out.shape, generator=gen)
    return out.round().clamp(0, 255).to(torch.uint8)


def structured_blocks(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks of many kinds: painted partitions with noise and gradients, pure noise, flat
    blocks, and blocks that are exactly symmetric (where tie-breaking must keep the symmetry)."""
    lab = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    base = painted(lab, gen, noise=0.0).float()
    ramp = torch.linspace(-1, 1, 16)
    grad = (torch.randn(n, 1, 1, 1, generator=gen) * ramp.view(1, 1, 16, 1)
            + torch.randn(n, 1, 1, 1, generator=gen) * ramp.view(1, 1, 1, 16)) * 30
    noise = torch.randn(n, 1, 16, 16, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 40
    blocks = base + grad + noise
    k = n // 8
    blocks[:k] = torch.rand(k, 1, 16, 16, generator=gen) * 255                      # pure noise
    blocks[k:2 * k] = torch.rand(k, 1, 1, 1, generator=gen) * 255                   # flat
    sym = blocks[2 * k:3 * k]
    blocks[2 * k:3 * k] = (sym + sym.transpose(-1, -2)) / 2                          # transpose-symmetric
    sym = blocks[3 * k:4 * k]
    blocks[3 * k:4 * k] = (sym + sym.flip(-1) + sym.flip(-2) + sym.flip(-1, -2)) / 4  # flip-symmetric
    return blocks.round().clamp(0, 255).to(torch.uint8)


def canonical(pmap: torch.Tensor) -> tuple:
    """A partition map relabelled by first appearance in raster order: equal iff same partition."""
    first = {}
    return tuple(first.setdefault(v, len(first)) for v in pmap.flatten().tolist())


# ------------------------------------------------------------------------------------------- labeller

def test_importing_fastcascade_does_not_import_skimage(tmp_path):
    code = "import sys, fastcascade, fastcascade.data; print('skimage' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_partition_geometry_tiles_the_block():
    for label in range(NUM_CLASSES):
        pmap = partition_map(label)
        assert (pmap >= 0).all(), LABEL_NAMES[label]
        assert sum(h * w for _, _, h, w in PARTITION_RECTS[label]) == 256, LABEL_NAMES[label]
    # libaom: the A types split the first (top / left) half, the B types the second.
    assert len(set(partition_map(fd.HORZ_A)[:8].flatten().tolist())) == 2
    assert len(set(partition_map(fd.HORZ_B)[8:].flatten().tolist())) == 2
    assert len(set(partition_map(fd.VERT_A)[:, :8].flatten().tolist())) == 2
    assert len(set(partition_map(fd.VERT_B)[:, 8:].flatten().tolist())) == 2


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_label_tables_follow_the_geometry(name):
    """Transforming a partition's sub-block map gives the map of the mapped label, for every label."""
    f, table = TRANSFORMS[name]
    assert sorted(table.tolist()) == list(range(NUM_CLASSES))
    assert torch.equal(table[table], torch.arange(NUM_CLASSES))  # each transform is an involution
    for label in range(NUM_CLASSES):
        assert canonical(f(partition_map(label))) == canonical(partition_map(int(table[label]))), (
            f"{name}: {LABEL_NAMES[label]} -> {LABEL_NAMES[int(table[label])]}")


@pytest.mark.parametrize("include_4way", [False, True])
@pytest.mark.parametrize("qp", [22, 32, 42])
def test_painted_partition_gets_its_label(qp, include_4way):
    """A block flat on each sub-block of partition k (distinct levels) is labelled k."""
    n_cls = NUM_CLASSES if include_4way else NUM_MAIN_CLASSES
    gen = seeded("painted", qp, include_4way)
    lab = torch.arange(n_cls).repeat(20)
    assert torch.equal(label_blocks(painted(lab, gen), qp=qp, include_4way=include_4way), lab)


@pytest.mark.parametrize("include_4way", [False, True])
@pytest.mark.parametrize("qp", [12, 32, 51])
def test_labeller_symmetry_random_blocks(qp, include_4way):
    gen = seeded("symmetry", qp, include_4way)
    blocks = structured_blocks(2000, gen)
    labels = label_blocks(blocks, qp=qp, include_4way=include_4way)
    assert len(labels.unique()) >= 6  # the blocks exercise many labels, not just NONE / SPLIT
    for name, (f, table) in TRANSFORMS.items():
        assert torch.equal(label_blocks(f(blocks), qp=qp, include_4way=include_4way), table[labels]), name
    rotated = blocks.transpose(-1, -2).flip(-1)  # a rotation: the composed tables
    assert torch.equal(label_blocks(rotated, qp=qp, include_4way=include_4way),
                       HFLIP_LABELS[TRANSPOSE_LABELS[labels]])


@pytest.mark.parametrize("include_4way", [False, True])
def test_labeller_symmetry_real_blocks(full, include_4way):
    blocks = full.blocks[::3]  # a third of every image keeps the test quick
    labels = label_blocks(blocks, include_4way=include_4way)
    for name, (f, table) in TRANSFORMS.items():
        assert torch.equal(label_blocks(f(blocks), include_4way=include_4way), table[labels]), name


def test_float_blocks_match_uint8(full):
    blocks = full.blocks[:2000]
    assert torch.equal(label_blocks(blocks.float() / 255), label_blocks(blocks))
    assert torch.equal(label_blocks(blocks.double() / 255), label_blocks(blocks))


def test_costs_are_returned_in_label_order(full):
    labels, costs = label_blocks(full.blocks[:500], include_4way=True, return_costs=True)
    assert costs.shape == (500, NUM_CLASSES) and costs.dtype == torch.int64
    assert torch.equal(costs.gather(1, labels[:, None])[:, 0], costs.min(dim=1).values)


def test_higher_qp_means_larger_partitions(full):
    blocks = full.blocks[::3]
    none_share = [(label_blocks(blocks, qp=qp) == NONE).float().mean().item() for qp in (20, 32, 44)]
    assert none_share[0] < none_share[1] < none_share[2]


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 16, 16, dtype=torch.uint8), "shape"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "shape"),
    (torch.zeros(2, 1, 16, 16, dtype=torch.int32), "dtype"),
    (torch.full((2, 1, 16, 16), 2.0), r"\[0, 1\]"),
    (torch.full((2, 1, 16, 16), float("nan")), r"\[0, 1\]"),
])
def test_label_blocks_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        label_blocks(bad)


def test_label_blocks_bad_qp():
    with pytest.raises(ValueError, match="qp"):
        label_blocks(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), qp=60)


def test_label_blocks_empty_batch():
    assert label_blocks(torch.zeros(0, 1, 16, 16, dtype=torch.uint8)).shape == (0,)


# ------------------------------------------------------------------------------------------- dataset

def test_dataset_is_deterministic_and_pinned(full, capsys):
    rebuilt = fd.build_partition_dataset()
    assert torch.equal(rebuilt["blocks"], full.blocks)
    assert torch.equal(rebuilt["labels"], full.labels)
    assert torch.equal(rebuilt["image_ids"], full.image_ids)
    assert full.blocks.dtype == torch.uint8 and full.blocks.shape[1:] == (1, 16, 16)
    assert full.labels.dtype == torch.int64
    print(f"labels {sha256(full.labels)}\nblocks {sha256(full.blocks)}")
    assert sha256(full.labels) == PINNED_LABELS_SHA256
    assert sha256(full.blocks) == PINNED_BLOCKS_SHA256


def test_every_main_class_holds_at_least_one_percent(full, cache_dir):
    print("\n" + full.distribution())
    for split in ("all", "train", "val", "test"):
        ds = full if split == "all" else fd.load_partition_dataset(split, cache_dir=cache_dir)
        share = ds.class_counts().float() / len(ds)
        assert share.shape == (NUM_MAIN_CLASSES,)
        low = {LABEL_NAMES[k]: round(share[k].item(), 4) for k in range(NUM_MAIN_CLASSES) if share[k] < 0.01}
        assert not low, f"{split}: classes under 1%: {low}"


def test_split_is_by_image(full, cache_dir):
    train = fd.load_partition_dataset("train", cache_dir=cache_dir)
    val = fd.load_partition_dataset("val", cache_dir=cache_dir)
    test = fd.load_partition_dataset("test", cache_dir=cache_dir)
    train_ids, val_ids, test_ids = (set(d.image_ids.tolist()) for d in (train, val, test))
    assert not train_ids & val_ids and not train_ids & test_ids and not val_ids & test_ids
    assert {full.image_names[i] for i in val_ids} == set(fd.VAL_IMAGES)
    assert {full.image_names[i] for i in test_ids} == set(fd.TEST_IMAGES)
    assert train_ids | val_ids | test_ids == set(full.image_ids.tolist()) == set(range(len(fd.IMAGES)))
    assert len(train) + len(val) + len(test) == len(full)
    # the val and test blocks are exactly the blocks of their images, in order
    for ds, ids in ((val, val_ids), (test, test_ids)):
        keep = torch.isin(full.image_ids, torch.tensor(sorted(ids)))
        assert torch.equal(ds.blocks, full.blocks[keep]) and torch.equal(ds.labels, full.labels[keep])
        assert 0.05 < len(ds) / len(full) < 0.2
    assert test.meta["split"] == "test"


def test_cache_is_reused_keyed_and_rebuilt_when_broken(full, cache_dir, tmp_path, monkeypatch):
    files = sorted(cache_dir.glob("partition16-*.pt"))
    assert len(files) == 1 and not list(cache_dir.glob(".*tmp"))
    monkeypatch.setattr(fd.dataset, "build_partition_dataset", lambda *a: pytest.fail("rebuilt from cache"))
    assert torch.equal(fd.load_partition_dataset("all", cache_dir=cache_dir).labels, full.labels)
    monkeypatch.undo()
    # FASTCASCADE_DATA_DIR is the default cache; a truncated file there is rebuilt, not trusted.
    monkeypatch.setenv("FASTCASCADE_DATA_DIR", str(tmp_path))
    broken = tmp_path / files[0].name
    broken.write_bytes(files[0].read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="cannot be read.*rebuilding"):
        ds = fd.load_partition_dataset("all", verbose=False)
    assert torch.equal(ds.labels, full.labels) and torch.equal(ds.blocks, full.blocks)
    assert broken.read_bytes() == files[0].read_bytes()
    # other labeller settings get another file (a stub labeller: the key is what is tested here)
    monkeypatch.setattr(fd.dataset, "label_blocks", lambda b, qp, include_4way: torch.zeros(len(b)).long())
    other = fd.load_partition_dataset("val", qp=40, verbose=False)
    assert len(list(tmp_path.glob("partition16-*.pt"))) == 2
    assert other.meta["labeller"]["qp"] == 40.0


def test_dataset_items(full):
    block, label = full[3]
    assert block.shape == (1, 16, 16) and block.dtype == torch.float32
    assert torch.equal(block, full.blocks[3].float() / 255) and label == full.labels[3]
    loader = torch.utils.data.DataLoader(full, batch_size=64)
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 16, 16) and yb.dtype == torch.int64
    assert full.class_counts().sum() == len(full)
    assert sum(n for n, _ in fd.label_distribution(full.labels, NUM_MAIN_CLASSES).values()) == len(full)


def test_bad_split(cache_dir):
    with pytest.raises(ValueError, match="split"):
        fd.load_partition_dataset("holdout", cache_dir=cache_dir)


# -------------------------------------------------------------------------------------- augmentation

def test_transforms_move_blocks_and_labels_together(full):
    blocks, labels = full.blocks[:3000], full.labels[:3000]
    for fn in (fd.hflip, fd.vflip, fd.transpose):
        b2, l2 = fn(blocks, labels)
        assert torch.equal(label_blocks(b2), l2), fn.__name__


def test_random_dihedral(full):
    blocks, labels = full.blocks[:4000], full.labels[:4000]
    b1, l1 = fd.random_dihedral(blocks, labels, seeded("dihedral"))
    b2, l2 = fd.random_dihedral(blocks, labels, seeded("dihedral"))
    assert torch.equal(b1, b2) and torch.equal(l1, l2)
    assert torch.equal(label_blocks(b1), l1)
    # every one of the 8 symmetries occurs: identify each sample's transform by brute force
    d4 = [lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(-1, -2)]
    d4 += [lambda x, f=f: f(x.transpose(-1, -2)) for f in d4]
    x = torch.arange(256).view(1, 1, 16, 16).expand(64, 1, 16, 16)
    y, _ = fd.random_dihedral(x, torch.zeros(64, dtype=torch.int64), seeded("d4"))
    seen = {next(i for i, g in enumerate(d4) if torch.equal(g(x[0]), y[j])) for j in range(64)}
    assert seen == set(range(8))
    b0, l0 = fd.random_dihedral(blocks, labels, seeded("none"), 0.0, 0.0, 0.0)
    assert torch.equal(b0, blocks) and torch.equal(l0, labels)
    aug = fd.RandomDihedral(seed=1)
    assert torch.equal(aug(blocks, labels)[1], fd.RandomDihedral(seed=1)(blocks, labels)[1])


def test_mixup():
    gen = seeded("mixup")
    ids = torch.randint(0, 4, (512,), generator=gen)
    blocks = ids.view(-1, 1, 1, 1).expand(-1, 1, 16, 16).to(torch.uint8)  # pixel value = class id
    mixed, soft = fd.mixup(blocks, ids, alpha=0.4, generator=seeded("m"), num_classes=4)
    assert mixed.dtype == torch.float32 and soft.shape == (512, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(512))
    assert (soft >= 0).all() and (soft <= 1).all()
    # the mixed pixels and the soft targets use the same weights
    torch.testing.assert_close(mixed[:, 0, 0, 0], soft @ torch.arange(4.0))
    # the sample's own class keeps at least half the weight
    assert (soft.gather(1, ids[:, None]) >= 0.5).all()
    assert (soft.max(1).values < 1).any()  # some mixing happened
    m2, s2 = fd.mixup(blocks, torch.nn.functional.one_hot(ids, 4), alpha=0.4, generator=seeded("m"))
    assert torch.equal(m2, mixed) and torch.equal(s2, soft)
    m0, s0 = fd.mixup(blocks, ids, alpha=0.0, num_classes=4)
    assert torch.equal(m0, blocks.float()) and torch.equal(s0.argmax(1), ids)
    with pytest.raises(ValueError, match="num_classes"):
        fd.mixup(blocks, ids, alpha=0.4)
    with pytest.raises(ValueError, match="targets"):
        fd.mixup(blocks, ids + 4, alpha=0.4, num_classes=4)


# ------------------------------------------------------------------------------------------ hierarchy

def test_stage_targets_round_trip():
    labels = torch.arange(NUM_CLASSES).repeat(3)
    t = fd.stage_targets(labels)
    assert torch.equal(fd.labels_from_stages(t["stage1"], t["stage2"], t["rect"], t["ab"]), labels)
    assert torch.equal(t["stage1"], (labels != NONE).long())
    for stage in ("stage2", "rect", "ab"):
        reached = t[stage] != IGNORE_INDEX
        for lab, target in zip(labels[reached].tolist(), t[stage][reached].tolist()):
            if stage == "stage2":
                group = {"SPLIT": ("SPLIT",), "RECT": ("HORZ", "VERT", "HORZ_4", "VERT_4"),
                         "AB": ("HORZ_A", "HORZ_B", "VERT_A", "VERT_B")}[STAGE_CLASS_NAMES[stage][target]]
                assert LABEL_NAMES[lab] in group
            else:
                assert STAGE_CLASS_NAMES[stage][target] == LABEL_NAMES[lab]
        # a label reaches a stage-3 head exactly when its name is one of that head's classes
        names = {LABEL_NAMES[k] for k in labels[reached].tolist()}
        if stage != "stage2":
            assert names == set(STAGE_CLASS_NAMES[stage])
    assert set(labels[t["stage2"] == IGNORE_INDEX].tolist()) == {NONE}
    # what a stage does not reach is not read
    junk = torch.full_like(labels, 7)
    rect = torch.where(t["rect"] == IGNORE_INDEX, junk, t["rect"])
    assert torch.equal(fd.labels_from_stages(t["stage1"], t["stage2"], rect, t["ab"]), labels)


def test_labels_from_stages_rejects_bad_reached_values():
    with pytest.raises(ValueError, match="stage2"):
        fd.labels_from_stages(torch.tensor([1]), torch.tensor([3]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="ab"):
        fd.labels_from_stages(torch.tensor([1]), torch.tensor([2]), torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(ValueError, match="labels"):
        fd.stage_targets(torch.tensor([10]))


# ------------------------------------------------------------------------------------ own datasets

def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_own_dataset_round_trip(tmp_path, full):
    root = tmp_path / "mine"
    blocks, labels = full.blocks[:100], full.labels[:100]
    fd.save_block_dataset(root / "16x16" / "train.pt", blocks, labels, meta={"source": "test"})
    fd.save_block_dataset(root / "16x16" / "val.pt", blocks.float() / 255, labels)
    (root / "16x16" / "metadata.json").write_text(json.dumps({"num_classes": 8, "block_size": 16}))
    train = fd.load_block_dataset(root, "train")
    assert torch.equal(train.blocks, blocks) and torch.equal(train.labels, labels)
    assert train.meta["source"] == "test" and train.num_classes == 8
    val = fd.load_block_dataset(root / "16x16", "val")
    assert val.blocks.dtype == torch.float32 and torch.equal(val[5][0], train[5][0])
    direct = fd.load_block_dataset(root / "16x16" / "train.pt")
    assert torch.equal(direct.labels, labels)
    assert sorted(p.name for p in (root / "16x16").iterdir()) == ["metadata.json", "train.pt", "val.pt"]


GOOD = {"blocks": torch.zeros(4, 1, 16, 16, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)}


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "expected a dict"),
    ({"blocks": GOOD["blocks"]}, "missing key"),
    ({**GOOD, "blocks": torch.zeros(4, 16, 16, dtype=torch.uint8)}, r"shape \(N, 1, 16, 16\)"),
    ({**GOOD, "blocks": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, r"shape \(N, 1, 16, 16\)"),
    ({**GOOD, "blocks": torch.zeros(4, 1, 16, 16, dtype=torch.int16)}, "uint8 or floating"),
    ({**GOOD, "blocks": torch.full((4, 1, 16, 16), 255.0)}, r"\[0, 1\]"),
    ({**GOOD, "labels": torch.zeros(4, dtype=torch.int32)}, "int64"),
    ({**GOOD, "labels": torch.zeros(5, dtype=torch.int64)}, r"shape \(4,\)"),
    ({**GOOD, "labels": torch.tensor([0, 1, 10, 2])}, r"\[0, 10\)"),
    ({**GOOD, "labels": torch.tensor([0, -1, 3, 2])}, r"\[0, 10\)"),
    ({**GOOD, "meta": [1]}, "'meta' must be a dict"),
])
def test_own_dataset_bad_files(tmp_path, obj, match):
    path = _write(tmp_path / "16x16" / "train.pt", obj)
    with pytest.raises(ValueError, match=match) as e:
        fd.load_block_dataset(tmp_path, "train")
    assert str(path) in str(e.value)


def test_own_dataset_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="val.pt"):
        fd.load_block_dataset(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fd.load_block_dataset(tmp_path / "nowhere")
    (tmp_path / "train.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not be read") as e:
        fd.load_block_dataset(tmp_path, "train")
    assert str(tmp_path / "train.pt") in str(e.value)
    _write(tmp_path / "train.pt", GOOD)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="metadata.json"):
        fd.load_block_dataset(tmp_path, "train")
    (tmp_path / "metadata.json").write_text(json.dumps({"block_size": 32}))
    with pytest.raises(ValueError, match="block_size"):
        fd.load_block_dataset(tmp_path, "train")
    # metadata.json's num_classes sets the label range
    (tmp_path / "metadata.json").write_text(json.dumps({"num_classes": 2}))
    _write(tmp_path / "train.pt", {**GOOD, "labels": torch.tensor([0, 1, 3, 1])})
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fd.load_block_dataset(tmp_path, "train")


def test_own_dataset_split_must_be_a_plain_name_and_a_file_one_split(tmp_path):
    root = tmp_path / "data"
    fd.save_block_dataset(root / "16x16" / "train.pt", GOOD["blocks"], GOOD["labels"])
    _write(root / "x.pt", GOOD)  # a file outside the size folder that "../x" would reach
    for split in ("../x", "16x16/../../x", "/etc/passwd", "", ".", "..", "a/b", "train.pt"):
        with pytest.raises(ValueError, match="split"):
            fd.load_block_dataset(root / "16x16", split)
    file = root / "16x16" / "train.pt"
    assert len(fd.load_block_dataset(file)) == 4 and len(fd.load_block_dataset(file, "train")) == 4
    with pytest.raises(ValueError, match=r"train\.pt is a file, the 'train' split; split='val'"):
        fd.load_block_dataset(file, "val")


def test_own_dataset_metadata_refuses_bools_for_numbers(tmp_path):
    _write(tmp_path / "train.pt", GOOD)
    for meta, match in (({"num_classes": True}, "num_classes must be a positive int, got True"),
                        ({"block_size": True}, "block_size True does not match")):
        (tmp_path / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=match):
            fd.load_block_dataset(tmp_path, "train")


def test_save_refuses_meta_its_loader_would_refuse(tmp_path):
    import numpy as np

    target = tmp_path / "16x16" / "train.pt"
    for meta, match in (({"m": np.float64(0.5)}, r"meta\['m'\]: a numpy.float64"),
                        ({"src": {"ids": np.arange(3)}}, r"meta\['src'\]\['ids'\]: a numpy.ndarray")):
        with pytest.raises(TypeError, match=match):
            fd.save_block_dataset(target, GOOD["blocks"], GOOD["labels"], meta=meta)
    assert not target.exists()
    fd.save_block_dataset(target, GOOD["blocks"], GOOD["labels"], meta={"m": 0.5, "ids": torch.arange(3)})
    assert fd.load_block_dataset(tmp_path).meta["m"] == 0.5


def test_save_writes_nothing_on_bad_input_or_failure(tmp_path, monkeypatch):
    target = tmp_path / "16x16" / "train.pt"
    with pytest.raises(ValueError, match="labels"):
        fd.save_block_dataset(target, GOOD["blocks"], torch.full((4,), 12))
    assert not target.exists()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fd.save_block_dataset(target, GOOD["blocks"], GOOD["labels"])
    assert not target.exists() and os.listdir(target.parent) == []
