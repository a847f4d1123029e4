"""Data-parallel plumbing of fit and its validation: process group set-up under torchrun, sums over ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["all_sum", "as_count", "setup_distributed"]


def setup_distributed(device) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) with no process group yet, one is
    started: NCCL when the device is CUDA, else gloo."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = (device is None and torch.cuda.is_available()) or (device is not None
                                                                      and torch.device(device).type == "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
    return rank, world, device


def as_count(rows: int, device) -> torch.Tensor:
    return torch.tensor(float(rows), dtype=torch.float64, device=device)


def all_sum(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    if world == 1:
        return t
    # NCCL reduces CUDA tensors only; gloo takes CPU ones
    backend_dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(backend_dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)
