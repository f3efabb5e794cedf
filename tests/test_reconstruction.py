"""Reconstruction criterion: greedy least-squares selection, checked against brute force."""

import itertools

import torch
from tiny_models import Tiny

from toolchain.ranking import CRITERIA, RankContext, load_criteria
from toolchain.ranking.reconstruction import greedy_selection
from toolchain.stages.prune import find_prunable_layers


def _problem(seed=0, channels=7, group=4, out=5, n=300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels * group, generator=g, dtype=torch.float64)
    x[:, group:2 * group] = x[:, :group] + 0.01 * torch.randn(n, group, generator=g, dtype=torch.float64)
    y = x @ torch.randn(channels * group, out, generator=g, dtype=torch.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return x, y


def _residual(x, y, chosen, group):
    cols = torch.cat([torch.arange(c * group, (c + 1) * group) for c in chosen])
    w = torch.linalg.lstsq(x[:, cols], y).solution
    return float(((x[:, cols] @ w - y) ** 2).sum() / (y ** 2).sum())


def test_greedy_residuals_equal_plain_least_squares_and_each_step_is_the_best():
    channels, group = 7, 4
    x, y = _problem(channels=channels, group=group)
    order, residual = greedy_selection(x.T @ x, x.T @ y, float((y ** 2).sum()), channels, ridge=1e-10)
    assert sorted(order) == list(range(channels))
    for k in range(1, channels):
        assert abs(_residual(x, y, order[:k], group) - residual[k - 1]) < 1e-6
        best = min((c for c in range(channels) if c not in order[:k - 1]),
                   key=lambda c: _residual(x, y, [*order[:k - 1], c], group))
        assert order[k - 1] == best
    # greedy is not exhaustive, but on this problem the best pair is found
    pairs = min(itertools.combinations(range(channels), 2), key=lambda p: _residual(x, y, list(p), group))
    assert set(order[:2]) == set(pairs)


def test_a_copy_of_a_kept_channel_comes_last():
    x, y = _problem(seed=1, channels=6, group=3)
    order, _ = greedy_selection(x.T @ x, x.T @ y, float((y ** 2).sum()), 6)
    # channels 0 and 1 are near copies: once one is in, the other adds almost nothing
    assert min(order.index(0), order.index(1)) < 3 and max(order.index(0), order.index(1)) == 5


def test_criterion_ranks_every_layer_of_a_network():
    load_criteria()
    torch.manual_seed(0)
    model = Tiny().eval()
    layers = find_prunable_layers(model, torch.zeros(2, 3, 8, 8))
    ctx = RankContext(model=model, layers=layers, images=torch.randn(64, 3, 8, 8), labels=torch.arange(64) % 3,
                      num_classes=3, device=torch.device("cpu"))
    rankings = CRITERIA.get("recon")(ctx)
    for layer in layers:
        r = rankings[layer.name]
        assert sorted(r.order) == list(range(layer.channels))
        assert r.info["residual"][-1] < 1e-2 and r.info["residual"][0] <= 1.0 + 1e-9


def _small_resnet() -> torch.nn.Module:
    """torchvision's BasicBlock at small widths: a stem stream with two blocks, then a downsampled stream."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def test_criterion_ranks_channel_groups_by_their_consumers():
    """Residual streams (several consumers, 3x3 and 1x1) and expand/depthwise groups (the project conv reads
    them): every group gets a full order fitted on its consumers, none falls back to filter norms."""
    from torch import nn

    load_criteria()
    torch.manual_seed(0)
    expand_depthwise = nn.Sequential(  # a MobileNet block: expand, depthwise, project
        nn.Conv2d(3, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12), nn.ReLU6(),
        nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    for model in (_small_resnet().eval(), expand_depthwise.eval()):
        layers = find_prunable_layers(model, torch.zeros(2, 3, 16, 16))
        assert any(layer.members for layer in layers)
        ctx = RankContext(model=model, layers=layers, images=torch.randn(16, 3, 16, 16),
                          labels=torch.arange(16) % 3, num_classes=3, device=torch.device("cpu"))
        rankings = CRITERIA.get("recon")(ctx)
        for layer in layers:
            r = rankings[layer.name]
            assert sorted(r.order) == list(range(layer.channels)), layer.name
            assert "fallback" not in r.info and 0.0 <= r.info["residual"][0] <= 1.0 + 1e-9, layer.name


def test_loss_weights_change_the_order_and_bad_options_are_refused():
    import pytest

    from toolchain.errors import UserError

    load_criteria()
    torch.manual_seed(1)
    model = Tiny().eval()
    layers = find_prunable_layers(model, torch.zeros(2, 3, 8, 8))

    def ctx(options):
        return RankContext(model=model, layers=layers, images=torch.randn(64, 3, 8, 8), labels=torch.arange(64) % 3,
                           num_classes=3, device=torch.device("cpu"), options=options)

    loss = CRITERIA.get("recon")(ctx({}))
    plain = CRITERIA.get("recon")(ctx({"recon_weight": "none"}))
    assert loss["features.0"].info["weight"] == "loss" and plain["features.0"].info["weight"] == "none"
    assert any(loss[n].order != plain[n].order for n in loss)
    with pytest.raises(UserError, match="recon_weight"):
        CRITERIA.get("recon")(ctx({"recon_weight": "heavy"}))


def test_elimination_residuals_equal_plain_least_squares_and_each_removal_is_the_cheapest():
    from toolchain.ranking.reconstruction import greedy_elimination

    channels, group = 7, 4
    x, y = _problem(seed=2, channels=channels, group=group)
    order, residual = greedy_elimination(x.T @ x, x.T @ y, float((y ** 2).sum()), channels, ridge=1e-10)
    assert sorted(order) == list(range(channels))
    for k in range(1, channels + 1):
        assert abs(_residual(x, y, order[:k], group) - residual[k - 1]) < 1e-6
    for k in range(channels, 1, -1):  # from the full set, each step drops the channel that costs least
        kept = order[:k]
        cheapest = min(kept, key=lambda c: _residual(x, y, [d for d in kept if d != c], group))
        assert order[k - 1] == cheapest
    # of the near-copies 0 and 1, one goes first and the other stays to the end
    x, y = _problem(seed=1, channels=6, group=3)
    order, _ = greedy_elimination(x.T @ x, x.T @ y, float((y ** 2).sum()), 6)
    assert max(order.index(0), order.index(1)) == 5 and min(order.index(0), order.index(1)) < 3
