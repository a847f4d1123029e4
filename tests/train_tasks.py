"""Synthetic training data shared by the training tests."""

import torch
from torch.utils.data import TensorDataset


def linear_task(n=1200, seed=0, classes=3):
    """An easy synthetic task: the class is a linear function of 8 inputs, plus a little noise; (train, val)
    datasets, 3/4 and 1/4 of n rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, classes, generator=g)
    y = (x @ w + 0.1 * torch.randn(n, classes, generator=g)).argmax(1)
    cut = n * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
