"""Rank stage (what to prune): run a registered criterion on class-balanced training samples."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from toolchain.ranking import CRITERIA, LayerRanking, PrunableLayer, RankContext, load_criteria
from toolchain.ranking.base import default_samples
from toolchain.stages.data import Dataset, balanced_indices


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
