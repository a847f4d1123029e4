"""Batches for training and evaluation: labels of a dataset, a loader over given rows, stage targets and
predicted class ids. Shared by fit and evaluate."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset, TensorDataset

from ..data.dataset import PartitionDataset
from ..data.labels import IGNORE_INDEX

__all__ = ["kept_rows", "labels_of", "loader", "num_output_classes", "predicted_labels", "targets_of"]


def labels_of(ds: Dataset) -> torch.Tensor:
    """int64 (N,) labels of a dataset of (input, label) items, without touching the inputs when it can."""
    if isinstance(ds, PartitionDataset):
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
    return isinstance(ds, (PartitionDataset, TensorDataset))


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
