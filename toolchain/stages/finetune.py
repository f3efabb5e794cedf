"""Fine-tune stage: re-estimate BN statistics, then SGD + cosine, optionally distilling from the dense model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.stages.data import Dataset, DeviceLoader
from toolchain.train import distributed as dist_utils
from toolchain.train.engine import Recipe, fit, recalibrate_batchnorm


def finetune(model: nn.Module, data: Dataset, recipe: Recipe, device: torch.device, workdir: Path, *,
             batch_size: int, seed: int, teacher: nn.Module | None = None,
             bn_images: int = 2000) -> tuple[nn.Module, list[dict[str, Any]]]:
    model = model.to(device, memory_format=torch.channels_last)
    train = DeviceLoader(data.train, data, batch_size, device, shuffle=True, augment=True, seed=seed,
                         channels_last=True, rank=dist_utils.rank(), world=dist_utils.world_size())
    test = DeviceLoader(data.test, data, 512, device, channels_last=True)
    if not (workdir / "last.pt").exists():  # a resumed run already has its statistics
        plain = DeviceLoader(data.train, data, 256, device, shuffle=True, seed=seed + 1, channels_last=True)
        recalibrate_batchnorm(model, plain, device, bn_images)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    wrapped = dist_utils.wrap(model, device)
    history = fit(wrapped, train, test, device, recipe, workdir, teacher=teacher, desc="finetune")
    return model, history
