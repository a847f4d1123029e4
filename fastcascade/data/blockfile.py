"""Your own block dataset on disk: the .pt format, its loader and a writer.

Layout (one folder per block size; the size folder may also be the folder you pass)::

    my_dataset/
      16x16/
        train.pt          torch.save({"blocks": ..., "labels": ..., "meta": {...}})
        val.pt
        metadata.json     optional, e.g. {"num_classes": 10, "block_size": 16, "source": "..."}

Each split file holds a dict:

* ``"blocks"``: uint8 pixels, or floating pixels in [0, 1], shape (N, 1, S, S) (S = block size);
* ``"labels"``: int64 (N,), partition labels in libaom order, in [0, num_classes);
* ``"meta"`` (optional): a dict of anything torch.load(weights_only=True) can read;
* ``"image_ids"`` (optional): int64 (N,), the source image of each block (for split hygiene checks);
* ``"checksum"`` (optional): written by save_block_dataset, fastcascade._io.checksum of the other entries;
  a file that does not match it is refused as damaged. Files without one (e.g. written with torch.save)
  load as they are: their integrity cannot be checked.

``num_classes`` is the argument if given, else metadata.json's, else 10 (all AV1 partition types).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import torch

from .._io import check_loadable, checksum, checksum_problem, save_torch
from .dataset import PartitionDataset
from .labels import BLOCK_SIZE, NUM_CLASSES


def _validate(obj, where: str, block_size: int, num_classes: int) -> dict:
    """Check one split's dict; errors name ``where`` and what was expected."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict with keys 'blocks', 'labels' (and optional 'meta', "
                         f"'image_ids'), got {type(obj).__name__}")
    missing = [k for k in ("blocks", "labels") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; expected 'blocks' (N, 1, {block_size}, "
                         f"{block_size}) and 'labels' int64 (N,), found keys {sorted(map(str, obj))}")
    blocks, labels = obj["blocks"], obj["labels"]
    if not isinstance(blocks, torch.Tensor):
        raise ValueError(f"{where}: 'blocks' must be a torch.Tensor, got {type(blocks).__name__}")
    if blocks.dtype != torch.uint8 and not blocks.is_floating_point():
        raise ValueError(f"{where}: 'blocks' must be uint8 or floating point, got {blocks.dtype}")
    if blocks.dim() != 4 or tuple(blocks.shape[1:]) != (1, block_size, block_size):
        raise ValueError(f"{where}: 'blocks' must have shape (N, 1, {block_size}, {block_size}), "
                         f"got {tuple(blocks.shape)}")
    if blocks.is_floating_point() and blocks.numel():
        if not torch.isfinite(blocks).all():
            raise ValueError(f"{where}: 'blocks' holds NaN or infinite values")
        lo, hi = blocks.min().item(), blocks.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"{where}: float 'blocks' must be in [0, 1] (pixels / 255), got range "
                             f"[{lo:.4g}, {hi:.4g}]")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{where}: 'labels' must be an int64 tensor, got {got}")
    if labels.shape != (blocks.shape[0],):
        raise ValueError(f"{where}: 'labels' must have shape ({blocks.shape[0]},) to match 'blocks', "
                         f"got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(f"{where}: 'labels' must be in [0, {num_classes}), found {bad.numel()} outside "
                         f"(e.g. {int(bad[0])})")
    image_ids = obj.get("image_ids")
    if image_ids is not None and (not isinstance(image_ids, torch.Tensor) or image_ids.dtype != torch.int64
                                  or image_ids.shape != labels.shape):
        raise ValueError(f"{where}: 'image_ids' must be an int64 tensor of shape {tuple(labels.shape)}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: 'meta' must be a dict, got {type(meta).__name__}")
    return {"blocks": blocks, "labels": labels, "image_ids": image_ids, "meta": meta}


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_split(split) -> str:
    """A split is a file name in the dataset folder: a plain name, never a path ("../x", "a/b", "/x")."""
    if not isinstance(split, str) or not _PLAIN_NAME.fullmatch(split) or ".." in split:
        raise ValueError(f"split must be a plain name such as 'train' or 'val' (letters, digits, '_', '-', "
                         f"'.'; no path), got {split!r}")
    if split.endswith(".pt"):
        raise ValueError(f"split is the name without '.pt', got {split!r}")
    return split


def _read_metadata(folder: pathlib.Path) -> dict:
    path = folder / "metadata.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_block_dataset(path: str | os.PathLike, split: str | None = None, block_size: int = BLOCK_SIZE,
                       num_classes: int | None = None, as_float: bool = True) -> PartitionDataset:
    """Load one split of a dataset in the format above.

    ``path`` is a folder holding ``{S}x{S}/{split}.pt`` or ``{split}.pt`` (``split`` defaults to
    "train"), or a .pt file itself; then ``split``, if given, must be that file's name (a file stands
    for one split: ``load_block_dataset(".../train.pt", "val")`` raises instead of returning the train
    rows as val). ``split`` is a plain name, not a path. Raises FileNotFoundError for a missing folder
    or file and ValueError for anything malformed (wrong keys, shapes, dtypes, labels out of range, a
    checksum that does not match, bad metadata.json), each naming the file and what was expected.
    Nothing is written.
    """
    if split is not None:
        _check_split(split)
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        split = split or "train"
        folder = path / f"{block_size}x{block_size}"
        folder = folder if folder.is_dir() else path
        file = folder / f"{split}.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file; expected {path}/{block_size}x{block_size}/"
                                    f"{split}.pt or {path}/{split}.pt (see fastcascade.data.blockfile)")
    elif path.is_file():
        if split is not None and path.name != f"{split}.pt":
            raise ValueError(f"{path} is a file, the {path.stem!r} split; split={split!r} asks for another "
                             f"one: pass the dataset folder ({path.parent}) to choose a split")
        folder, file = path.parent, path
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    meta_json = _read_metadata(folder)
    if "block_size" in meta_json and (isinstance(meta_json["block_size"], bool)
                                      or meta_json["block_size"] != block_size):
        raise ValueError(f"{folder / 'metadata.json'}: block_size {meta_json['block_size']!r} does not match "
                         f"the requested block_size={block_size}")
    if num_classes is None:
        num_classes = meta_json.get("num_classes", NUM_CLASSES)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{folder / 'metadata.json'}: num_classes must be a positive int, "
                             f"got {num_classes!r}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: could not be read as a torch.save file of tensors ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and "checksum" in obj:
        problem = checksum_problem({k: v for k, v in obj.items() if k != "checksum"}, obj["checksum"])
        if problem:
            raise ValueError(f"{file} is damaged: {problem}; nothing was loaded")
    d = _validate(obj, str(file), block_size, num_classes)
    return PartitionDataset(d["blocks"], d["labels"], d["image_ids"], num_classes=num_classes,
                            meta={**meta_json, **d["meta"], "file": str(file)}, as_float=as_float)


def save_block_dataset(path: str | os.PathLike, blocks: torch.Tensor, labels: torch.Tensor,
                       meta: dict | None = None, image_ids: torch.Tensor | None = None,
                       num_classes: int = NUM_CLASSES) -> pathlib.Path:
    """Write one split file (e.g. ``my_dataset/16x16/train.pt``) in the format above, with a checksum,
    after checking it as the loader would: a ``meta`` value that torch.load(weights_only=True) cannot read
    back (a numpy scalar, a path) raises TypeError naming its key. Atomic: a failed save leaves no file
    behind. Returns the path."""
    path = pathlib.Path(path).expanduser()
    obj = {"blocks": blocks, "labels": labels, "meta": dict(meta or {})}
    if image_ids is not None:
        obj["image_ids"] = image_ids
    block_size = blocks.shape[-1] if isinstance(blocks, torch.Tensor) and blocks.dim() == 4 else BLOCK_SIZE
    _validate(obj, str(path), block_size, num_classes)
    check_loadable(obj["meta"], "meta")
    obj = {k: (v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}
    obj["checksum"] = checksum(obj)
    save_torch(obj, path)
    return path
