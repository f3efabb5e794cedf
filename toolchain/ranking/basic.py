"""Data-free baseline criteria: filter L1 norm and seeded random order."""

from __future__ import annotations

import torch

from toolchain.ranking.base import CRITERIA, LayerRanking, RankContext


def _ranking_from_scores(scores: torch.Tensor) -> LayerRanking:
    # stable sort on -score: ties keep the lower index first
    order = torch.sort(-scores.double(), stable=True).indices
    return LayerRanking(order=order.tolist(), scores=scores.double().tolist())


def _group_sum(ctx: RankContext, layer, own: torch.Tensor, per_member) -> torch.Tensor:
    """A group's score per channel: its layer's, plus each member's (``per_member(module)``) where it has one
    per channel. Summed, as Torch-Pruning's group importance does: a channel of a residual stream or of an
    expand/depthwise pair is worth what all the convs that write it are worth together."""
    if not layer.members and not layer.member_bns:
        return own
    modules = dict(ctx.model.named_modules())
    total = own.double().clone()
    for name in (*layer.members, *layer.member_bns):
        score = per_member(modules[name])
        if score is not None and score.numel() == total.numel():
            total += score.double().to(total.device)
    return total


def _filter_l1(module) -> torch.Tensor | None:
    return module.weight.detach().abs().flatten(1).sum(1) if isinstance(module, torch.nn.Conv2d) else None


def _bn_gamma(module) -> torch.Tensor | None:
    is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine
    return module.weight.detach().abs() if is_bn else None


@CRITERIA.register("l1")
def l1_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """L1 norm of each output filter (Li et al., 2017); a group's: the sum over the convs that output it."""
    return {layer.name: _ranking_from_scores(_group_sum(ctx, layer, _filter_l1(layer.conv), _filter_l1).cpu())
            for layer in ctx.layers}


@CRITERIA.register("random")
def random_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """A seeded random order per layer: the floor any criterion must beat."""
    g = torch.Generator().manual_seed(ctx.seed)
    return {layer.name: _ranking_from_scores(torch.rand(layer.channels, generator=g, dtype=torch.float64))
            for layer in ctx.layers}


@CRITERIA.register("bn-scale")
def bn_scale_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """|gamma| of the BatchNorm after each conv (Network Slimming, Liu et al., 2017); a group's: the sum over
    its BatchNorms."""
    modules = dict(ctx.model.named_modules())
    out = {}
    for layer in ctx.layers:
        if layer.bn_name is None:
            scores = _group_sum(ctx, layer, _filter_l1(layer.conv), _filter_l1)
        else:
            scores = _group_sum(ctx, layer, modules[layer.bn_name].weight.detach().abs(), _bn_gamma)
        out[layer.name] = _ranking_from_scores(scores.cpu())
    return out


@CRITERIA.register("taylor")
def taylor_criterion(ctx: RankContext) -> dict[str, LayerRanking]:
    """First-order Taylor estimate of the loss change when a channel goes (Molchanov et al., 2019).

    Per channel, over mini-batches of the class-balanced samples, ``(gamma g_gamma + beta g_beta)^2``
    on the BatchNorm after the conv (on the filter, ``(sum w g_w)^2``, without one), averaged.
    """
    import torch.nn.functional as F

    model = ctx.model
    modules = dict(model.named_modules())
    params = {}
    for layer in ctx.layers:
        bn = modules[layer.bn_name] if layer.bn_name is not None else None
        params[layer.name] = (bn.weight, bn.bias) if bn is not None and bn.affine else (layer.conv.weight,)
    sums = {name: torch.zeros(layer.channels, dtype=torch.float64) for name, layer in
            ((lay.name, lay) for lay in ctx.layers)}
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    batches = 0
    try:
        with torch.enable_grad():
            for a in range(0, len(ctx.images), 32):
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(ctx.images[a:a + 32]), ctx.labels[a:a + 32])
                loss.backward()
                for name, ps in params.items():
                    contrib = sum((p.detach() * p.grad.detach()).flatten(1).sum(1) if p.ndim > 1
                                  else p.detach() * p.grad.detach() for p in ps)
                    sums[name] += contrib.double().cpu() ** 2
                batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return {name: _ranking_from_scores(s / max(batches, 1)) for name, s in sums.items()}
