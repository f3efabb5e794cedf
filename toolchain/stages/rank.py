"""Rank stage (what to prune): run a registered criterion on class-balanced training samples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.data import Dataset, balanced_indices
from toolchain.ranking import CRITERIA, LayerRanking, PrunableLayer, RankContext, load_criteria
from toolchain.ranking.base import default_samples
from toolchain.stages import baseline
from toolchain.stages.base import StageContext
from toolchain.util import atomic_write_json

NAME = "rank"


@dataclass(frozen=True)
class Inputs:
    baseline: str  # digest
    model: str
    criterion: str
    samples: int  # class-balanced training images
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    at_init: bool = False  # rank a freshly initialised model (MIPP --at-init)
    keep_ratio: float | None = None  # only for a criterion that cuts at the run's keep ratio (cmi's "ratio")


@dataclass
class Result:
    layers: int


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    from toolchain.stages.prune import find_prunable_layers  # the stage after this one (imports it)

    model = baseline.source_model(ctx, inputs.baseline, inputs.model, at_init=inputs.at_init, seed=inputs.seed)
    model.to(ctx.device)
    example = torch.zeros(2, *ctx.data.input_shape, device=ctx.device)
    rankings = rank_channels(model, find_prunable_layers(model, example), ctx.data, criterion=inputs.criterion,
                             options=inputs.options, samples=inputs.samples, seed=inputs.seed, device=ctx.device,
                             keep_ratio=inputs.keep_ratio)
    atomic_write_json(folder / "rankings.json", {name: r.__dict__ for name, r in rankings.items()})
    return Result(layers=len(rankings))


def load_rankings(folder: Path) -> dict[str, LayerRanking]:
    return {k: LayerRanking(**v) for k, v in json.loads((folder / "rankings.json").read_text()).items()}


def rank_channels(model: nn.Module, layers: list[PrunableLayer], data: Dataset, *, criterion: str,
                  options: dict[str, Any], samples: int | None, seed: int, device: torch.device,
                  keep_ratio: float | None = None) -> dict[str, LayerRanking]:
    """``samples``: None for the criterion's own default (``default_samples``)."""
    load_criteria()
    fn = CRITERIA.get(criterion)
    samples = samples or default_samples(criterion)
    idx = balanced_indices(data.train.labels, samples, seed)
    images = data.normalize(data.train.images[idx].to(device))
    ctx = RankContext(model=model.eval(), layers=layers, images=images, labels=data.train.labels[idx].to(device),
                      num_classes=data.num_classes, device=device, options=dict(options), seed=seed,
                      keep_ratio=keep_ratio)
    rankings = fn(ctx)
    for layer in layers:
        r = rankings[layer.name]
        if sorted(r.order) != list(range(layer.channels)) or len(r.scores) != layer.channels:
            raise RuntimeError(f"criterion {criterion} returned a malformed ranking for {layer.name}")
    return rankings
