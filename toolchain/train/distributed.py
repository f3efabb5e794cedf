"""torchrun support: process group from RANK / WORLD_SIZE / LOCAL_RANK, rank-0-only writes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device_type: str) -> torch.device | None:
    """Join the process group torchrun set up; returns this rank's device (None when not launched)."""
    if not launched_by_torchrun():
        return None
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        backend, device = "nccl", torch.device("cuda", local)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(backend=backend)
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
