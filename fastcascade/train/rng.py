"""Random state saved in fit's checkpoints, so that a resumed run draws what the uninterrupted one drew:
torch (CPU and CUDA), numpy and python, and an augmentation's generator."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["augment_state", "rng_state", "set_augment_state", "set_rng_state"]


def rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's and python's states as tensors / ints, so the file loads with weights_only=True
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(s: Mapping) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def augment_state(augment) -> torch.Tensor | dict | None:
    """The random state of an augmentation: its state_dict(), or its .generator's state (RandomDihedral)."""
    if augment is None:
        return None
    if hasattr(augment, "state_dict"):
        return augment.state_dict()
    gen = getattr(augment, "generator", None)
    return gen.get_state() if isinstance(gen, torch.Generator) else None


def set_augment_state(augment, state) -> None:
    if state is None or augment is None:
        return
    if hasattr(augment, "load_state_dict"):
        augment.load_state_dict(state)
    elif isinstance(getattr(augment, "generator", None), torch.Generator):
        augment.generator.set_state(state)
