"""How fit draws its training rows: the Sampling settings, the per-row weights of the weighted samplers,
and each epoch's order of rows for each rank."""

from __future__ import annotations

import dataclasses
import math
import numbers
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, WeightedRandomSampler

from ..losses import class_balanced_weights
from .batches import loader

__all__ = ["SAMPLERS", "Sampling"]

SAMPLERS = ("class_balanced", "oversample", None)


def _int_at_least(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How fit draws its training rows; fit builds one from its keywords of the same names.

    Attributes:
        sampler: None (a seeded shuffle), "class_balanced" (rows weighted by the effective-number class
            weight with `beta`, fastcascade.class_balanced_weights) or "oversample" (1 / class count):
            torch WeightedRandomSampler, with replacement, one epoch = as many rows as the training set,
            from a generator seeded by `seed`. The weighted samplers need class-id targets (N,).
        beta: the class_balanced sampler's beta, in [0, 1).
        batch_size: rows per training step (per rank), an int >= 1.
        num_workers: DataLoader workers, an int >= 0 (0: batches are read in this process, which for
            tensor-backed datasets is one indexing op per batch).
        seed: an int; seeds torch, numpy, python and the sampler's generator: the same seed gives the
            same run, bitwise.
    Raises: ValueError naming the field for a value outside the ranges above.
    """

    sampler: str | None = None
    beta: float = 0.9999
    batch_size: int = 256
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not 0 <= self.beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {self.beta!r}")
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("num_workers", self.num_workers, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def seed_all(self) -> torch.Generator:
        """Seeds torch, numpy and python with `seed`; returns the sampler's generator, seeded too."""
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)
        return torch.Generator().manual_seed(self.seed)

    def row_weights(self, targets: torch.Tensor) -> torch.Tensor | None:
        """float64 (N,) sampling weights of the rows with class-id `targets` (N,); None for the shuffle.
        class_balanced: (1 - beta) / (1 - beta^n_c) (Cui et al. 2019); oversample: 1 / n_c (every class
        drawn equally often). ValueError for targets that are not class ids (N,)."""
        if self.sampler is None:
            return None
        if targets.is_floating_point() or targets.dim() != 1:
            raise ValueError(f"sampler={self.sampler!r} needs class-id targets (N,), got {targets.dtype} "
                             f"{tuple(targets.shape)}")
        counts = torch.bincount(targets)
        if self.sampler == "class_balanced":
            per_class = class_balanced_weights(counts, self.beta).double()
        else:
            per_class = torch.where(counts > 0, 1.0 / counts.clamp(min=1).double(),
                                    torch.zeros((), dtype=torch.float64))
        return per_class[targets]

    def rows_per_rank(self, n_rows: int, world: int) -> int:
        return math.ceil(n_rows / world)

    def steps_per_epoch(self, n_rows: int, world: int) -> int:
        return math.ceil(self.rows_per_rank(n_rows, world) / self.batch_size)

    def epoch_order(self, weights: torch.Tensor | None, n_rows: int, world: int, rank: int, epoch: int,
                    gen: torch.Generator) -> torch.Tensor:
        """int64: this epoch's rows for this rank, as positions into the n_rows kept training rows. The
        weighted samplers draw one global order and shard it; the shuffle uses DistributedSampler when
        there is more than one rank."""
        if weights is not None:
            n = self.rows_per_rank(n_rows, world) * world
            drawn = list(WeightedRandomSampler(weights, n, replacement=True, generator=gen))
            return torch.tensor(drawn, dtype=torch.int64)[rank::world]
        if world > 1:
            shard = DistributedSampler(range(n_rows), num_replicas=world, rank=rank, shuffle=True,
                                       seed=self.seed)
            shard.set_epoch(epoch)
            return torch.tensor(list(shard), dtype=torch.int64)
        return torch.tensor(list(RandomSampler(range(n_rows), generator=gen)), dtype=torch.int64)

    def batches(self, ds: Dataset, rows: list[int]) -> DataLoader:
        """Batches of (inputs, labels) of ds's `rows`, in that order."""
        return loader(ds, rows, self.batch_size, self.num_workers)
