"""The embedded partition dataset: 16x16 luma blocks of scikit-image's photographs, labelled by
:func:`fastcascade.data.label_blocks`, split by image, cached on disk.

Source images: the real photographs that ship inside the scikit-image wheel (no download). Colour
images become BT.601 luma, ``Y = (299 R + 587 G + 114 B + 500) // 1000`` in integers; each image is
cropped to a multiple of 16 and tiled into non-overlapping 16x16 blocks in raster order.
Synthetic images (checkerboard, blobs, logo, phantom) and binary masks (horse) are left out; so is
``cat`` (the same picture as ``chelsea``) and the right view of the stereo pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from importlib import metadata

import numpy as np
import torch

from .._io import checksum, checksum_problem, save_torch
from .labels import BLOCK_SIZE, LABEL_NAMES, NUM_CLASSES, NUM_MAIN_CLASSES
from .partition import DEFAULT_QP, label_blocks, labeller_params

#: Photographs in the scikit-image wheel, in dataset order (image id = position).
IMAGES = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "motorcycle_left", "page",
          "retina", "rocket", "text")
#: Images of the validation split (about 10% of the blocks: model selection, thresholds, temperatures).
VAL_IMAGES = ("clock", "coffee", "gravel")
#: Images of the test split (about 11% of the blocks: the reported numbers); every other image is in train.
TEST_IMAGES = ("camera", "coins", "immunohistochemistry", "text")
#: Bump when the block extraction (image list, luma, tiling) changes: it keys the cache with the labeller.
DATASET_VERSION = 1
SPLITS = ("train", "val", "test", "all")


def _load_image(name: str) -> np.ndarray:
    import skimage.data  # lazy: importing fastcascade must not import scikit-image

    if name == "motorcycle_left":
        img = skimage.data.stereo_motorcycle()[0]
    else:
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise RuntimeError(f"skimage.data.{name}: expected uint8 pixels, got {img.dtype}")
    if img.ndim == 3:
        rgb = img[..., :3].astype(np.int64)
        img = ((299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2] + 500) // 1000).astype(np.uint8)
    return img


def tile_blocks(image: np.ndarray | torch.Tensor, size: int = BLOCK_SIZE) -> torch.Tensor:
    """(H, W) uint8 image -> (N, 1, size, size) blocks of the non-overlapping grid, raster order; the
    right and bottom remainders (< size pixels) are dropped."""
    img = torch.as_tensor(np.ascontiguousarray(image))
    if img.dim() != 2:
        raise ValueError(f"image: expected a 2-D (H, W) luma image, got shape {tuple(img.shape)}")
    h, w = (img.shape[0] // size) * size, (img.shape[1] // size) * size
    t = img[:h, :w].reshape(h // size, size, w // size, size).permute(0, 2, 1, 3)
    return t.reshape(-1, 1, size, size).contiguous()


def _params(qp: float, include_4way: bool) -> dict:
    return {"dataset_version": DATASET_VERSION, "images": list(IMAGES),
            "scikit_image": metadata.version("scikit-image"), "labeller": labeller_params(qp, include_4way)}


def build_partition_dataset(qp: float = DEFAULT_QP, include_4way: bool = False) -> dict:
    """Extract and label every block of every image (no cache). Returns a dict with "blocks" uint8
    (N, 1, 16, 16), "labels" int64 (N,), "image_ids" int64 (N,), "image_names" and "params"."""
    blocks, ids = [], []
    for i, name in enumerate(IMAGES):
        b = tile_blocks(_load_image(name))
        blocks.append(b)
        ids.append(torch.full((b.shape[0],), i, dtype=torch.int64))
    blocks = torch.cat(blocks)
    return {"blocks": blocks, "labels": label_blocks(blocks, qp=qp, include_4way=include_4way),
            "image_ids": torch.cat(ids), "image_names": list(IMAGES), "params": _params(qp, include_4way)}


def default_cache_dir() -> pathlib.Path:
    """$FASTCASCADE_DATA_DIR, else ~/.cache/fastcascade."""
    env = os.environ.get("FASTCASCADE_DATA_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "fastcascade"


def _cache_file(cache_dir: pathlib.Path, params: dict) -> pathlib.Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"partition16-{key}.pt"


def _cache_problem(data, params: dict) -> str | None:
    """Why a loaded cache file cannot be used (a sentence), or None: not written by this version with these
    parameters, entries missing or of the wrong shape, or content that does not match its checksum."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not the cache's dict"
    entries = ("blocks", "labels", "image_ids", "image_names", "params", "checksum")
    missing = [k for k in entries if k not in data]
    if missing:
        old = missing == ["checksum"]
        return "it has no checksum (written by an older fastcascade)" if old else f"it lacks {missing}"
    if data["params"] != params:
        return "its parameters are not the ones its name stands for"
    problem = checksum_problem({k: v for k, v in data.items() if k != "checksum"}, data["checksum"])
    if problem:
        return problem
    blocks, labels, ids = data["blocks"], data["labels"], data["image_ids"]
    if not all(isinstance(t, torch.Tensor) for t in (blocks, labels, ids)):
        return "its blocks, labels or image_ids are not tensors"
    n = labels.shape[0] if labels.dim() == 1 else -1
    if (blocks.dtype != torch.uint8 or tuple(blocks.shape[1:]) != (1, BLOCK_SIZE, BLOCK_SIZE)
            or blocks.shape[0] != n or labels.dtype != torch.int64 or ids.dtype != torch.int64
            or tuple(ids.shape) != (n,)):
        return "its tensors have the wrong shapes or dtypes"
    if data["image_names"] != list(IMAGES):
        return "its image list is not this version's"
    if n and (int(ids.min()) < 0 or int(ids.max()) >= len(IMAGES) or int(labels.min()) < 0
              or int(labels.max()) >= NUM_CLASSES):
        return "its labels or image ids are out of range"
    return None


def _load_or_build(qp: float, include_4way: bool, cache_dir, verbose: bool) -> dict:
    """The cached dataset for these settings, or a fresh build written to the cache. A cache file that
    cannot be used (unreadable, truncated, damaged, incomplete, without a checksum) is rebuilt with a
    warning that says why; it is never trusted."""
    params = _params(qp, include_4way)
    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _cache_file(cache_dir, params)
    if path.exists():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            problem = _cache_problem(data, params)
        except Exception as e:  # unreadable (e.g. truncated outside our atomic write, or a flipped byte)
            problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if problem is None:
            return data
        warnings.warn(f"fastcascade.data: the dataset cache {path} cannot be used ({problem}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
    data = build_partition_dataset(qp, include_4way)
    data["checksum"] = checksum(data)
    save_torch(data, path)
    if verbose:
        print(f"fastcascade.data: built {len(data['labels'])} blocks from {len(IMAGES)} images "
              f"(qp={qp}, include_4way={include_4way}) -> {path}")
        print(format_distribution(data["labels"], NUM_CLASSES if include_4way else NUM_MAIN_CLASSES))
    return data


class PartitionDataset(torch.utils.data.Dataset):
    """Blocks and partition labels. ``ds[i]`` is ``(block, label)``: the block (1, 16, 16) float32 in
    [0, 1] (``as_float=True``, the default) or uint8, the label an int64 scalar.

    Attributes: ``blocks`` uint8 or float (N, 1, S, S), ``labels`` int64 (N,), ``image_ids`` int64
    (N,) (-1 when unknown), ``image_names`` (list indexed by image id), ``num_classes``, ``meta``.
    ``ds[list of indices]`` is a whole batch (fastcascade.train's LabelledDataset protocol).
    """

    batch_indexing = True

    def __init__(self, blocks: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor | None = None,
                 image_names=(), num_classes: int = NUM_CLASSES, meta: dict | None = None,
                 as_float: bool = True):
        if blocks.shape[0] != labels.shape[0]:
            raise ValueError(f"blocks and labels: expected the same length, got {blocks.shape[0]} and "
                             f"{labels.shape[0]}")
        self.blocks, self.labels = blocks, labels
        self.image_ids = (image_ids if image_ids is not None
                          else torch.full((labels.shape[0],), -1, dtype=torch.int64))
        self.image_names = list(image_names)
        self.num_classes = num_classes
        self.meta = dict(meta or {})
        self.as_float = as_float

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        b = self.blocks[i]
        if self.as_float and b.dtype == torch.uint8:
            b = b.float() / 255
        return b, self.labels[i]

    def class_counts(self) -> torch.Tensor:
        """int64 (num_classes,) number of blocks per label."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def distribution(self) -> str:
        """The label distribution as a printable table."""
        return format_distribution(self.labels, self.num_classes)

    def __repr__(self) -> str:
        return (f"PartitionDataset({len(self)} blocks {tuple(self.blocks.shape[1:])} {self.blocks.dtype}, "
                f"{len(set(self.image_ids.tolist()))} images, {self.num_classes} classes)")


def label_distribution(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> dict:
    """{label name: (count, fraction)} over ``num_classes`` labels."""
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes).tolist()
    total = max(1, sum(counts))
    return {LABEL_NAMES[k]: (counts[k], counts[k] / total) for k in range(num_classes)}


def format_distribution(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> str:
    """The label distribution as a small text table (one row per label: count and percentage)."""
    dist = label_distribution(labels, num_classes)
    rows = [f"  {'label':<7} {'blocks':>7} {'share':>7}"]
    rows += [f"  {name:<7} {n:>7} {100 * f:6.2f}%" for name, (n, f) in dist.items()]
    return "\n".join(rows + [f"  {'total':<7} {labels.numel():>7}"])


def load_partition_dataset(split: str = "train", qp: float = DEFAULT_QP, cache_dir=None,
                           include_4way: bool = False, as_float: bool = True,
                           verbose: bool = True) -> PartitionDataset:
    """The embedded dataset, built on first use (a few seconds) and cached.

    Args:
        split: "train", "val" (the images in ``VAL_IMAGES``), "test" (those in ``TEST_IMAGES``) or
            "all". Split by image: no image has blocks in two splits.
        qp, include_4way: labeller settings (see :func:`label_blocks`); each setting has its own cache.
        cache_dir: folder of the cache; default ``$FASTCASCADE_DATA_DIR`` or ``~/.cache/fastcascade``.
            The file is written atomically and keyed by the labeller version and parameters, the image
            list and the scikit-image version; a stale or unreadable file is rebuilt.
        as_float: items as float32 in [0, 1] (else uint8); ``.blocks`` stays uint8 either way.
        verbose: print the label distribution when the dataset is built.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    data = _load_or_build(qp, include_4way, cache_dir, verbose)
    in_val = torch.isin(data["image_ids"], torch.tensor([IMAGES.index(n) for n in VAL_IMAGES]))
    in_test = torch.isin(data["image_ids"], torch.tensor([IMAGES.index(n) for n in TEST_IMAGES]))
    keep = {"train": ~(in_val | in_test), "val": in_val, "test": in_test, "all": torch.ones_like(in_val)}[split]
    return PartitionDataset(data["blocks"][keep], data["labels"][keep], data["image_ids"][keep],
                            data["image_names"], NUM_CLASSES if include_4way else NUM_MAIN_CLASSES,
                            meta={"split": split, **data["params"]}, as_float=as_float)
