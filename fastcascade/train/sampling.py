"""How fit draws its training rows: the Sampling settings, the per-row weights of the weighted samplers,
and each epoch's order of rows for each rank."""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from collections.abc import Mapping, Sequence

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
        class_factors: None, or per-class factors multiplying each row's sampling weight (the sampler's,
            or 1 for every row when sampler is None, which then draws with replacement like the weighted
            samplers): a mapping {class name or index: factor} (classes not named keep factor 1; names
            resolve through fit's class_names), or a (C,) tensor / sequence with one factor per class.
            Factors are finite and >= 0; 0 leaves a class out; they cannot all be 0. E.g.
            ``{"HORZ_B": 5, "VERT_A": 5, "HORZ_A": 3, "VERT_B": 3}``. Needs class-id targets (N,).
    Raises: ValueError naming the field for a value outside the ranges above.
    """

    sampler: str | None = None
    beta: float = 0.9999
    batch_size: int = 256
    num_workers: int = 0
    seed: int = 0
    class_factors: Mapping | torch.Tensor | Sequence | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not 0 <= self.beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {self.beta!r}")
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("num_workers", self.num_workers, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.class_factors is not None:
            object.__setattr__(self, "class_factors", _checked_factors(self.class_factors))

    def factors(self, num_classes: int, class_names: Sequence[str] | None = None) -> torch.Tensor | None:
        """float64 (num_classes,): class_factors resolved (names through class_names), or None without
        class_factors. ValueError naming class_factors for a name without class_names, an unknown name,
        an index outside [0, num_classes), a class given twice, a tensor of another length, or factors
        that are all 0."""
        cf = self.class_factors
        if cf is None:
            return None
        if isinstance(cf, tuple):  # a (C,) tensor or sequence, checked
            if len(cf) != num_classes:
                raise ValueError(f"class_factors: a tensor of {len(cf)} factors, expected one per class "
                                 f"({num_classes},)")
            out = torch.tensor(cf, dtype=torch.float64)
        else:
            out = torch.ones(num_classes, dtype=torch.float64)
            given = {}
            for key, factor in cf.items():
                c = _class_index(key, num_classes, class_names)
                if c in given:
                    raise ValueError(f"class_factors: class {c} is given twice ({given[c]!r} and {key!r})")
                given[c] = key
                out[c] = float(factor)
        if not bool((out > 0).any()):
            raise ValueError("class_factors: every class has factor 0, so no row could be drawn; give at "
                             "least one class a factor > 0")
        return out

    def seed_all(self) -> torch.Generator:
        """Seeds torch, numpy and python with `seed`; returns the sampler's generator, seeded too."""
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)
        return torch.Generator().manual_seed(self.seed)

    def row_weights(self, targets: torch.Tensor, num_classes: int | None = None,
                    class_names: Sequence[str] | None = None) -> torch.Tensor | None:
        """float64 (N,) sampling weights of the rows with class-id `targets` (N,); None for the plain
        shuffle (no sampler, no class_factors). class_balanced: (1 - beta) / (1 - beta^n_c) (Cui et al.
        2019); oversample: 1 / n_c (every class drawn equally often); no sampler: 1. Each row's weight is
        then multiplied by its class's factor (see factors(); num_classes defaults to len(class_names),
        else the largest target + 1). ValueError for targets that are not class ids (N,), a target at or
        past num_classes with class_factors, or factors that leave every row at weight 0."""
        if self.sampler is None and self.class_factors is None:
            return None
        if targets.is_floating_point() or targets.dim() != 1:
            who = f"sampler={self.sampler!r}" if self.sampler is not None else "class_factors"
            raise ValueError(f"{who} needs class-id targets (N,), got {targets.dtype} {tuple(targets.shape)}")
        counts = torch.bincount(targets)
        if self.sampler == "class_balanced":
            per_class = class_balanced_weights(counts, self.beta).double()
        elif self.sampler == "oversample":
            per_class = torch.where(counts > 0, 1.0 / counts.clamp(min=1).double(),
                                    torch.zeros((), dtype=torch.float64))
        else:
            per_class = torch.ones(counts.numel(), dtype=torch.float64)
        if self.class_factors is not None:
            if num_classes is None:
                num_classes = len(class_names) if class_names is not None else counts.numel()
            if counts.numel() > num_classes:
                raise ValueError(f"class_factors: the training targets hold class id {counts.numel() - 1}, "
                                 f"but there are {num_classes} classes")
            factors = self.factors(num_classes, class_names)
            per_class = per_class * factors[:counts.numel()]
            if not bool((per_class[counts > 0] > 0).any()):
                present = counts.nonzero().flatten().tolist()
                raise ValueError(f"class_factors: every class present in the training rows ({present}) has "
                                 f"factor 0, so no row could be drawn")
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


_FACTORS_EXPECTED = ("None, a mapping {class name or index: factor} or a (C,) tensor (or sequence) of factors, "
                     "finite and >= 0")


def _checked_factor(key, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"class_factors[{key!r}] must be a finite number >= 0, got {value!r}")
    return float(value)


def _checked_factors(cf):
    """class_factors as a dict {name or index: float} or a tuple of C floats; ValueError naming
    class_factors and what was expected."""
    if isinstance(cf, Mapping):
        if not cf:
            raise ValueError(f"class_factors is an empty mapping; expected {_FACTORS_EXPECTED}")
        out = {}
        for key, value in cf.items():
            if isinstance(key, bool) or not isinstance(key, (str, numbers.Integral)):
                raise ValueError(f"class_factors: key {key!r} is not a class name (str) or index (int)")
            out[key if isinstance(key, str) else int(key)] = _checked_factor(key, value)
        return out  # all-zero is known only once the classes are (factors())
    if isinstance(cf, (torch.Tensor, list, tuple)):
        if not isinstance(cf, torch.Tensor):
            for i, v in enumerate(cf):
                _checked_factor(i, v)
            t = torch.tensor([float(v) for v in cf], dtype=torch.float64)
        else:
            if cf.is_complex() or cf.dtype == torch.bool:
                raise ValueError(f"class_factors: a tensor of real factors, got dtype {cf.dtype}")
            t = cf.detach().to("cpu", torch.float64)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"class_factors: a (C,) tensor of factors, one per class, got shape {tuple(t.shape)}")
        bad = (~torch.isfinite(t)) | (t < 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"class_factors[{i}] must be a finite number >= 0, got {t[i].item()!r}")
        if not bool((t > 0).any()):
            raise ValueError("class_factors: every class has factor 0, so no row could be drawn; give at "
                             "least one class a factor > 0")
        return tuple(t.tolist())  # plain floats: Sampling compares and prints as a value
    raise ValueError(f"class_factors must be {_FACTORS_EXPECTED}, got {type(cf).__name__}")


def _class_index(key, num_classes: int, class_names: Sequence[str] | None) -> int:
    """The class index of a class_factors key: a name in class_names, or an index in [0, num_classes)."""
    if isinstance(key, str):
        if class_names is None:
            raise ValueError(f"class_factors names the class {key!r}, but no class names are known: pass "
                             f"class_names= to fit, or give the class's index")
        names = list(class_names)
        if key not in names:
            raise ValueError(f"class_factors: unknown class name {key!r}; the classes are {names}")
        c = names.index(key)
    else:
        c = key
    if not 0 <= c < num_classes:
        raise ValueError(f"class_factors: class index {c} is out of range for {num_classes} classes "
                         f"(expected 0 .. {num_classes - 1})")
    return c
