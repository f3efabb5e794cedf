"""Data-free baseline criteria: filter L1 norm and seeded random order."""

from __future__ import annotations

import torch

from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext


def _ranking_from_scores(scores: torch.Tensor) -> LayerRanking:
    # stable sort on -score: ties keep the lower index first
    order = torch.sort(-scores.double(), stable=True).indices
    return LayerRanking(order=order.tolist(), scores=scores.double().tolist())


@CRITERIA.register("l1")
def l1_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """L1 norm of each output filter (Li et al., 2017)."""
    return {layer.name: _ranking_from_scores(layer.conv.weight.detach().abs().flatten(1).sum(1).cpu())
            for layer in ctx.layers}


@CRITERIA.register("random")
def random_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """A seeded random order per layer: the floor any criterion must beat."""
    g = torch.Generator().manual_seed(ctx.seed)
    return {layer.name: _ranking_from_scores(torch.rand(layer.channels, generator=g, dtype=torch.float64))
            for layer in ctx.layers}


@CRITERIA.register("bn-scale")
def bn_scale_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """|gamma| of the BatchNorm after each conv (Network Slimming, Liu et al., 2017)."""
    modules = dict(ctx.model.named_modules())
    out = {}
    for layer in ctx.layers:
        if layer.bn_name is None:
            scores = layer.conv.weight.detach().abs().flatten(1).sum(1)
        else:
            scores = modules[layer.bn_name].weight.detach().abs()
        out[layer.name] = _ranking_from_scores(scores.cpu())
    return out
