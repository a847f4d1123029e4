"""Batches for training and evaluation: labels of a dataset, a loader over given rows, stage targets and
predicted class ids. Shared by fit and evaluate.

Any map-style dataset of (input, label) items works. Two optional attributes make it fast (the
LabelledDataset protocol; fastcascade.data.PartitionDataset and TensorDataset follow it):

* ``labels``: int64 (N,), item i's label, read instead of loading every item to learn the labels;
* ``batch_indexing = True``: ``ds[list of indices]`` returns a whole batch (inputs (B, ...), labels (B,)),
  one indexing op instead of B items and a collate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset, TensorDataset

from ..metrics import IGNORE_INDEX

__all__ = ["LabelledDataset", "kept_rows", "labels_of", "loader", "num_output_classes", "predicted_labels",
           "targets_of"]


@runtime_checkable
class LabelledDataset(Protocol):
    """A dataset whose labels are an int64 (N,) tensor attribute and that returns whole batches for a
    list of indices when its batch_indexing is True (see the module docstring)."""

    labels: torch.Tensor
    batch_indexing: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index): ...


def _has_labels(ds) -> bool:
    labels = getattr(ds, "labels", None)
    return isinstance(labels, torch.Tensor) and labels.dim() == 1 and labels.shape[0] == len(ds)


def labels_of(ds: Dataset) -> torch.Tensor:
    """int64 (N,) labels of a dataset of (input, label) items, without touching the inputs when it can."""
    if _has_labels(ds):
        return ds.labels
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.int64)]
    return torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])


def _batched(ds: Dataset) -> bool:
    """Whether ds[list of indices] returns a whole batch (one indexing op instead of N items + collate)."""
    if isinstance(ds, Subset):
        return _batched(ds.dataset)
    return isinstance(ds, TensorDataset) or getattr(ds, "batch_indexing", False) is True


def loader(ds: Dataset, order: Sequence[int], batch_size: int, num_workers: int) -> DataLoader:
    if _batched(ds):
        if isinstance(ds, Subset):
            base = torch.as_tensor(ds.indices, dtype=torch.int64)
            ds, order = ds.dataset, base[torch.as_tensor(order, dtype=torch.int64)].tolist()
        return DataLoader(ds, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                          num_workers=num_workers)
    return DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=num_workers)


def targets_of(labels: torch.Tensor, target_fn) -> torch.Tensor:
    if target_fn is None:
        return labels
    t = target_fn(labels)
    if not isinstance(t, torch.Tensor) or t.shape[:1] != labels.shape[:1]:
        raise ValueError(f"target_fn must return a tensor with one row per label ({labels.shape[0]}), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t


def kept_rows(targets: torch.Tensor) -> torch.Tensor:
    """Bool (N,): rows with a target (class-id targets equal to IGNORE_INDEX are dropped)."""
    if targets.is_floating_point() or targets.dim() != 1:
        return torch.ones(targets.shape[0], dtype=torch.bool)
    return targets != IGNORE_INDEX


def predicted_labels(out: torch.Tensor) -> torch.Tensor:
    """Class ids from logits: one logit per row is binary (class 1 where the logit > 0), else argmax."""
    if out.dim() == 1 or out.shape[1] == 1:
        return (out.reshape(-1) > 0).long()
    return out.argmax(1)


def num_output_classes(out: torch.Tensor) -> int:
    return 2 if out.dim() == 1 or out.shape[1] == 1 else out.shape[1]
