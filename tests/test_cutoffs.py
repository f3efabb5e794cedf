"""Cutoffs on constructed CMI curves and the global budget allocator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.ranking.base import PrunableLayer
from toolchain.ranking.cutoffs import (
    Budget,
    allocate_budget,
    budget_cost,
    full_curve,
    knee_cutoff,
    layer_costs,
    parse_budget,
    permutation_cutoff,
    ratio_cutoff,
    scree_candidates,
    scree_cutoff,
    scree_ratios,
    xmeans,
    xmeans_clusters,
    xmeans_cutoff,
    xmeans_cutoffs,
)


def elbow_curve(at: int, channels: int = 24) -> np.ndarray:
    """Steep fall until `at` channels are kept, then a slow linear tail down to 0 at k = C."""
    head = np.linspace(10.0, 1.0, at + 1)
    tail = np.linspace(1.0, 0.0, channels - at + 1)[1:]
    return np.r_[head, tail]


@pytest.mark.parametrize("at", [2, 5, 11])
def test_scree_and_knee_find_a_sharp_elbow(at):
    c = elbow_curve(at)
    assert scree_cutoff(c) == at
    assert scree_candidates(c, top=3)[0] == at
    assert knee_cutoff(c) == at


def test_scree_ratio_definition_and_flat_tail():
    c = np.array([8.0, 4.0, 3.0, 2.5, 2.5, 2.5])
    r = scree_ratios(c)
    assert r[0] == 0 and r[-1] == 0
    assert r[1] == pytest.approx(4.0) and r[2] == pytest.approx(2.0)
    assert r[3] == 0.0  # denominator 0 (flat) -> 0, docs/design/algorithms.md §2
    # float noise in a saturated tail is not an elbow
    noisy = np.r_[10.0, 2.0, 1.0, 1.0 + 1e-15, 1.0, 1.0 - 1e-15, 1.0]
    assert scree_cutoff(noisy) == 1
    # a straight line has no elbow: keep everything
    assert scree_cutoff(np.linspace(5, 0, 9)) == 8


def test_xmeans_two_separated_clusters():
    # points (k, c_k): a high plateau for k = 0..5 and a low one for k = 6..20
    c = np.r_[np.linspace(10.0, 9.0, 6), np.linspace(0.5, 0.0, 15)]
    labels = xmeans_clusters(c, seed=0)
    assert labels[0] == 0 and not set(labels[:6]) & set(labels[6:])  # no cluster crosses the gap
    k, cuts = xmeans_cutoff(c)
    assert k == 6 and cuts[0] == 6 and 6 in xmeans_cutoffs(c)
    # a steep head then a flat tail: the cut lies in the head, never in the tail
    assert 1 <= xmeans_cutoff(elbow_curve(4))[0] <= 4


@pytest.mark.parametrize("blobs", [2, 3])
def test_xmeans_bic_finds_the_number_of_blobs(blobs):
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0]])[:blobs]
    pts = np.concatenate([c + 0.3 * rng.standard_normal((40, 2)) for c in centers])
    labels, found = xmeans(pts, kmax=8, seed=0)
    assert len(found) == blobs
    for b in range(blobs):  # every blob is one cluster
        assert len(set(labels[40 * b:40 * (b + 1)])) == 1


def test_permutation_and_ratio_cutoffs():
    assert permutation_cutoff([0.0, 0.0, 0.01, 0.3, 0.0], 0.05, 10) == 3
    assert permutation_cutoff([0.6], 0.05, 10) == 1  # keep at least one channel
    assert permutation_cutoff([0.0, 0.0], 0.05, 3) == 2
    assert ratio_cutoff(64, 0.4) == 26 and ratio_cutoff(10, 0.01) == 1 and ratio_cutoff(7, 1.0) == 7
    with pytest.raises(UserError):
        ratio_cutoff(10, 0.0)


def test_full_curve_ends():
    c = full_curve(3.0, [2.0, 1.0])
    assert c.tolist() == [3.0, 2.0, 1.0, 0.0]


def test_parse_budget():
    assert parse_budget("flops=0.4") == Budget("flops", 0.4)
    assert parse_budget(" params = 0.2 ") == Budget("params", 0.2)
    assert parse_budget(None) is None
    for bad in ("flops=0", "flops=1.2", "latency=0.5", "flops", "flops=abc", "0.4"):
        with pytest.raises(UserError):
            parse_budget(bad)


def _curve(gains):
    """Curve whose k-th channel (in greedy order) lowers the CMI by gains[k-1]."""
    gains = np.asarray(gains, dtype=np.float64)
    return np.r_[gains.sum(), gains.sum() - np.cumsum(gains)]


def test_budget_removes_low_gain_channels_first():
    # two independent layers with the same cost per channel; layer 0's channels carry little
    curves = [_curve([1.0] + [0.001] * 7), _curve([1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02])]
    keep = allocate_budget(curves, [8, 8], [80.0, 80.0], [0.0, 0.0], [None, None], 0.5)
    assert keep[0] == 1 and keep[1] == 8 - 1  # 7 cheap removals from layer 0, then the least useful of layer 1
    assert budget_cost(keep, [8, 8], [80.0, 80.0], [0.0, 0.0], [None, None]) <= 0.5


def test_budget_prefers_cost_per_cmi_and_counts_consumers():
    # same gains everywhere, but layer 1 is 4x as expensive per channel: it is cut first
    curves = [_curve([0.1] * 10), _curve([0.1] * 10)]
    keep = allocate_budget(curves, [10, 10], [100.0, 400.0], [0.0, 0.0], [None, None], 0.7)
    assert keep[0] == 10 and keep[1] < 10
    # a chain: layer 0 feeds layer 1, so cutting layer 0 also shrinks layer 1's FLOPs
    chain = allocate_budget(curves, [10, 10], [100.0, 400.0], [0.0, 0.0], [None, 0], 0.5)
    assert budget_cost(chain, [10, 10], [100.0, 400.0], [0.0, 0.0], [None, 0]) <= 0.5
    assert chain[0] < 10  # the upstream layer is worth cutting once its consumer is counted


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.75, 1.0])
def test_budget_is_met_and_not_overshot(fraction):
    rng = np.random.default_rng(0)
    channels = [16, 32, 32, 64]
    curves = [_curve(np.sort(rng.random(c))[::-1]) for c in channels]
    coupled = [1e6, 4e6, 2e6, 3e6]
    producer = [None, 0, 1, 2]
    keep = allocate_budget(curves, channels, coupled, [0.0] * 4, producer, fraction)
    cost = budget_cost(keep, channels, coupled, [0.0] * 4, producer)
    assert cost <= fraction + 1e-12
    if fraction == 1.0:
        assert keep == channels
    # one channel more anywhere (the last removal undone) breaks the budget: it stopped at once
    worst = max(budget_cost([k + (i == j) for i, k in enumerate(keep)], channels, coupled, [0.0] * 4, producer)
                for j in range(4))
    assert worst > fraction - 0.05


def test_budget_impossible_raises():
    with pytest.raises(UserError):
        allocate_budget([_curve([1.0, 1.0])], [2], [10.0], [0.0], [None], 0.1)


def _layers():
    convs = [nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 6, 3, bias=False)]
    return [PrunableLayer(name=f"c{i}", conv=c, bn_name=f"b{i}", channels=c.out_channels, flops=float(10 * (i + 1)),
                          out_hw=(4, 4), consumers=[f"c{i + 1}"]) for i, c in enumerate(convs)]


def test_layer_costs():
    layers = _layers()
    coupled, out_only, producer = layer_costs(layers, "flops")
    assert coupled == [10.0, 20.0] and out_only == [0.0, 0.0] and producer == [None, 0]
    coupled, out_only, producer = layer_costs(layers, "params")
    assert coupled == [4 * 3 * 9, 6 * 4 * 9] and out_only == [8.0, 12.0]
    for layer in layers:  # no consumer information: chain by matching channel counts
        layer.consumers = []
    assert layer_costs(layers, "flops")[2] == [None, 0]
    assert torch.is_tensor(layers[0].conv.weight)
