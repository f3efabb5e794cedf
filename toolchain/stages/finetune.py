"""Fine-tune stage: re-estimate BN statistics, then SGD + cosine, optionally distilling from the dense model.

Cutout (off by default; the baseline has its own, ``baseline_cutout``) matters here: at 60% fewer FLOPs the
students fit the training set (97.5% training accuracy) and end 0.16 pt below the dense model; with cutout 16
the same cut ended 0.27 pt above it (docs/STUDY.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.data import Dataset, DeviceLoader
from toolchain.stages import baseline, prune
from toolchain.stages.base import OMIT_IF_NONE, StageContext
from toolchain.train import distributed as dist_utils
from toolchain.train.loop import FeatureMatch, Recipe, evaluate, fit, recalibrate_batchnorm
from toolchain.util import atomic_torch_save

NAME = "finetune"
ALL_RANKS = True  # training runs on every rank under torchrun


@dataclass(frozen=True)
class Inputs:
    prune: str  # digest
    baseline: str  # digest (the teacher)
    model: str
    epochs: int  # pruned at init: the baseline's epochs and lr, since the cut model is trained, not fine-tuned
    lr: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    distill: bool
    distill_alpha: float
    distill_temperature: float
    batch_size: int
    amp: str
    world: int  # processes under torchrun: the global batch is batch_size x world
    seed: int
    bn_images: int
    cutout: int | None = field(default=None, metadata=OMIT_IF_NONE)  # square side; None: off (keys from before)
    ema_decay: float | None = field(default=None, metadata=OMIT_IF_NONE)  # None: off, the model ends on its raw weights
    distill_features: float | None = field(default=None, metadata=OMIT_IF_NONE)  # None: logits only
    distill_flip: bool | None = field(default=None, metadata=OMIT_IF_NONE)  # True: mirror-averaged teacher; None: off


@dataclass
class Result:
    test_acc: float
    history: list[dict[str, Any]]


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    model = prune.load_pruned(ctx, inputs.prune, inputs.model)
    recipe = Recipe(epochs=inputs.epochs, lr=inputs.lr, momentum=inputs.momentum, weight_decay=inputs.weight_decay,
                    label_smoothing=inputs.label_smoothing, distill_alpha=inputs.distill_alpha,
                    distill_temperature=inputs.distill_temperature, amp=inputs.amp, ema_decay=inputs.ema_decay,
                    distill_features=inputs.distill_features, distill_flip=bool(inputs.distill_flip))
    teacher = baseline.load_model(ctx, inputs.baseline, inputs.model) if inputs.distill else None
    kept = prune.load_record(ctx, inputs.prune).kept if inputs.distill_features else None
    model, history = finetune(model, ctx.data, recipe, ctx.device, folder, batch_size=inputs.batch_size,
                              seed=inputs.seed, teacher=teacher, bn_images=inputs.bn_images,
                              cutout=inputs.cutout or 0, kept=kept)
    acc = evaluate(model, DeviceLoader(ctx.data.test, ctx.data, 500, ctx.device), ctx.device, desc="eval finetuned")
    if dist_utils.is_main():
        atomic_torch_save(model.cpu().to(memory_format=torch.contiguous_format).state_dict(), folder / "model.pt")
    return Result(test_acc=acc, history=history)


def load_model(ctx: StageContext, digest: str, prune_digest: str, model: str) -> nn.Module:
    """The fine-tuned pruned model a finished stage saved, in eval mode on the CPU."""
    return prune.load_pruned(ctx, prune_digest, model, weights=ctx.folder(NAME, digest) / "model.pt")


def finetune(model: nn.Module, data: Dataset, recipe: Recipe, device: torch.device, workdir: Path, *,
             batch_size: int, seed: int, teacher: nn.Module | None = None,
             bn_images: int = 2000, cutout: int = 0, kept: dict[str, list[int]] | None = None
             ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """BN re-estimation, then ``fit``; with a teacher and ``kept`` (the cut's kept channels) the loss also matches
    every cut layer's output to the teacher's at those channels (``recipe.distill_features``)."""
    model = model.to(device, memory_format=torch.channels_last)
    train = DeviceLoader(data.train, data, batch_size, device, shuffle=True, augment=True, seed=seed, cutout=cutout,
                         channels_last=True, rank=dist_utils.rank(), world=dist_utils.world_size())
    test = DeviceLoader(data.test, data, 512, device, channels_last=True)
    if not (workdir / "last.pt").exists():  # a resumed run already has its statistics
        plain = DeviceLoader(data.train, data, 256, device, shuffle=True, seed=seed + 1, channels_last=True)
        recalibrate_batchnorm(model, plain, device, bn_images)
    features = None
    if teacher is not None:
        teacher = teacher.to(device, memory_format=torch.channels_last).eval()
        if kept and recipe.distill_features:
            features = FeatureMatch(model, teacher, kept)
    wrapped = dist_utils.wrap(model, device)
    history = fit(wrapped, train, test, device, recipe, workdir, teacher=teacher, features=features,
                  desc="finetune")
    return model, history
