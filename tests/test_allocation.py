"""Budgets for every criterion: measured sensitivity, greedy allocation under the budget."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import Tiny

from toolchain.allocation import allocate, layer_sensitivity, sensitivity_curve, uniform_counts
from toolchain.compensation import compensate
from toolchain.errors import UserError
from toolchain.ranking import CRITERIA, RankContext, load_criteria
from toolchain.ranking.cutoffs import Budget, allocate_budget, budget_cost, layer_costs, parse_budget
from toolchain.stages.prune import consumer_outputs, find_prunable_layers, kept_indices, prune_model
from toolchain.train.loop import recalibrate_batchnorm


def _redundant_tiny() -> torch.nn.Module:
    """Tiny whose middle conv (features.4) has channels 4-7 as exact copies of channels 0-3."""
    torch.manual_seed(0)
    model = Tiny()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    conv, bn = model.features[4], model.features[5]
    with torch.no_grad():
        conv.weight[4:] = conv.weight[:4]
        conv.bias[4:] = conv.bias[:4]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[4:] = t[:4]
        model.classifier.weight.mul_(10)  # logits that differ between inputs: damage is measurable
    return model.eval()


def _damage(model, dense, x) -> float:
    with torch.no_grad():
        ref = F.log_softmax(dense(x), 1)
        return float((ref.exp() * (ref - F.log_softmax(model(x), 1))).sum(1).mean())


def test_sensitivity_curve_is_monotone_and_interpolates():
    curve = sensitivity_curve([[1.0, 0.0], [0.5, 0.2], [0.25, 0.1], [0.1, 1.0]], 8)
    assert len(curve) == 9 and curve[8] == 0.0
    assert np.all(np.diff(curve) <= 1e-12)  # never less damage with fewer channels
    assert curve[4] == pytest.approx(0.2)  # the non-monotone 0.25 point is lifted to the 0.5 one
    assert curve[6] == pytest.approx(0.1)  # halfway between 4 and 8 channels
    # below the smallest probe (0.25 of 8 = 2 channels here) nothing was measured: no allocation goes there
    curve = sensitivity_curve([[1.0, 0.0], [0.5, 0.1], [0.25, 0.1]], 8)
    assert np.isinf(curve[:2]).all() and np.isfinite(curve[2:]).all()


def test_allocation_stays_where_the_sensitivity_was_measured():
    """A layer flat down to its smallest probe is not pushed below it (the flops=0.2 VGG16 bug: 1 of 512 kept)."""
    channels = [10, 10]
    flat = sensitivity_curve([[1.0, 0.0], [0.5, 0.001], [0.2, 0.001]], 10)  # cheap to cut, measured to 2
    steep = sensitivity_curve([[1.0, 0.0], [0.5, 1.0], [0.1, 5.0]], 10)
    coupled, out_only, producer = [0.0, 0.0], [100.0, 100.0], [None, None]
    keep = allocate_budget([flat, steep], channels, coupled, out_only, producer, 0.3)
    assert keep[0] == 2  # down to its floor, not to 1
    assert budget_cost(keep, channels, coupled, out_only, producer) <= 0.3 + 1e-9
    with pytest.raises(UserError, match="cannot be met"):
        allocate_budget([flat, steep], channels, coupled, out_only, producer, 0.05)


@pytest.mark.parametrize("step", [1, 2, 4])
def test_allocate_budget_meets_the_budget_in_steps(step):
    channels = [8, 16, 16, 8]
    coupled, out_only, producer = [100.0, 400.0, 400.0, 100.0], [0.0] * 4, [None, 0, 1, 2]
    curves = [np.linspace(c, 0, c + 1) * w for c, w in zip(channels, (1.0, 0.1, 0.5, 2.0))]
    keep = allocate_budget(curves, channels, coupled, out_only, producer, 0.4, min_keep=step, step=step)
    assert budget_cost(keep, channels, coupled, out_only, producer) <= 0.4 + 1e-9
    assert all(k % step == 0 and k >= step for k in keep)
    # the cheap-to-cut layer (lowest damage per channel) gives up the most
    assert keep[1] / channels[1] == min(k / c for k, c in zip(keep, channels))


def test_allocation_beats_uniform_on_a_model_with_one_redundant_layer():
    load_criteria()
    dense = _redundant_tiny()
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    g = torch.Generator().manual_seed(0)
    images, probe, test = (torch.randn(n, 3, 8, 8, generator=g) for n in (128, 128, 256))
    labels = torch.arange(128) % 3
    rankings = CRITERIA.get("recon")(RankContext(model=dense, layers=layers, images=images, labels=labels,
                                                 num_classes=3, device=torch.device("cpu")))
    # uniform: a quarter of every layer goes (the redundant layer could lose half for free)
    uniform = {layer.name: round(0.75 * layer.channels) for layer in layers}
    coupled, out_only, producer = layer_costs(layers, "flops")
    names = [layer.name for layer in layers]
    cost_uniform = budget_cost([uniform[n] for n in names], [layer.channels for layer in layers], coupled, out_only,
                               producer)
    sens = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, images, compensation=True)
    # half of the redundant layer costs far less than half of any other layer (the ridge keeps it from 0)
    assert sens["features.4"][2][1] < 0.25 * min(sens[n][2][1] for n in ("features.0", "features.8"))
    counts, info = allocate(layers, sens, Budget("flops", cost_uniform))
    assert info["cost"] <= cost_uniform + 1e-9

    def cut(counts):
        kept = kept_indices(rankings, counts)
        pruned, _ = prune_model(dense, example, kept)
        compensate(pruned, dense, images, consumer_outputs(layers, kept))
        return _damage(pruned, dense, test)

    assert counts["features.4"] <= 4 < uniform["features.4"]  # the free half of the redundant layer goes
    assert cut(counts) < cut(uniform)


def test_a_channels_budget_counts_filters():
    """``channels=F`` keeps at most F of all prunable filters, whatever each layer's FLOPs."""
    load_criteria()
    layers = find_prunable_layers(_redundant_tiny(), torch.zeros(2, 3, 8, 8))
    coupled, out_only, producer = layer_costs(layers, "channels")
    channels = [layer.channels for layer in layers]
    assert coupled == [0.0] * len(layers) and out_only == [float(c) for c in channels]
    keep = [c // 2 for c in channels]
    assert budget_cost(keep, channels, coupled, out_only, producer) == pytest.approx(sum(keep) / sum(channels))
    assert parse_budget("channels=0.67") == Budget("channels", 0.67)
    with pytest.raises(UserError, match="channels=0.67"):
        parse_budget("filters=0.5")


def _l1_setup(n: int = 128):
    """The redundant Tiny ranked by L1 on `n` random images, with `n` more as the probe."""
    load_criteria()
    dense = _redundant_tiny()
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    g = torch.Generator().manual_seed(0)
    images, probe = (torch.randn(n, 3, 8, 8, generator=g) for _ in range(2))
    rankings = CRITERIA.get("l1")(RankContext(model=dense, layers=layers, images=images, labels=torch.arange(n) % 3,
                                              num_classes=3, device=torch.device("cpu")))
    return dense, example, layers, images, probe, rankings


def test_the_sensitivity_is_measured_once_for_every_budget(tmp_path, monkeypatch):
    """A second budget reads the first one's measured sensitivity from the cache file instead of measuring."""
    import toolchain.allocation as allocation

    dense, example, layers, images, probe, rankings = _l1_setup(64)
    cache = tmp_path / "sensitivity-x" / "sensitivity.json"
    first, info = allocation.allocate_for_budget(dense, layers, rankings, example, probe, images, Budget("flops", 0.5),
                                                 compensation=True, cache=cache)
    assert cache.is_file() and not info["sensitivity_cached"]
    measured = json.loads(cache.read_text())
    assert measured == info["sensitivity"]

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(allocation, "layer_sensitivity", no_measuring)
    second, info = allocation.allocate_for_budget(dense, layers, rankings, example, probe, images,
                                                  Budget("flops", 0.3), compensation=True, cache=cache)
    assert info["sensitivity_cached"] and info["sensitivity"] == measured
    assert second == allocation.allocate(layers, measured, Budget("flops", 0.3))[0]
    assert sum(second.values()) < sum(first.values())


def test_a_finer_grid_measures_only_the_points_the_cache_lacks(tmp_path, monkeypatch):
    """--sensitivity-fractions: a finer grid over a cached coarse one measures only the new kept counts, and gives
    what measuring it afresh gives; the coarse grid then reads its own points back from the (grown) cache."""
    import toolchain.allocation as allocation

    dense, example, layers, images, probe, rankings = _l1_setup(64)
    cache = tmp_path / "sensitivity.json"
    coarse, fine = (0.75, 0.5), (0.75, 0.5, 0.25)
    args = (dense, layers, rankings, example, probe, images, Budget("flops", 0.5))
    _, first = allocation.allocate_for_budget(*args, compensation=True, cache=cache, fractions=coarse)
    measured_cuts = []
    real_meter = allocation.damage_meter

    def counting_meter(*a, **kw):
        damage = real_meter(*a, **kw)

        def counted(counts, dense_targets=None):
            measured_cuts.append(dict(counts))
            return damage(counts, dense_targets)
        return counted

    monkeypatch.setattr(allocation, "damage_meter", counting_meter)
    counts, info = allocation.allocate_for_budget(*args, compensation=True, cache=cache, fractions=fine)
    assert not info["sensitivity_cached"]
    assert measured_cuts == [{layer.name: round(0.25 * layer.channels)} for layer in layers]  # the new point only
    monkeypatch.setattr(allocation, "damage_meter", real_meter)
    afresh = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, images, compensation=True,
                               fractions=fine)
    assert info["sensitivity"].keys() == afresh.keys()
    assert all(np.allclose(info["sensitivity"][n], afresh[n], rtol=1e-6, atol=1e-12) for n in afresh)
    assert counts == allocation.allocate(layers, afresh, Budget("flops", 0.5))[0]

    def no_measuring(*a, **kw):
        raise AssertionError("measured again")

    monkeypatch.setattr(allocation, "layer_sensitivity", no_measuring)
    _, again = allocation.allocate_for_budget(*args, compensation=True, cache=cache, fractions=coarse)
    assert again["sensitivity_cached"] and again["sensitivity"] == first["sensitivity"]


def test_a_protected_layer_stays_whole_and_the_others_meet_the_budget(tmp_path):
    """--protect under --budget: the allocator may not cut the layer (here the cheapest to cut, so an unprotected
    allocation cuts it) and the other layers take the whole cut; the cached sensitivity stays every layer's."""
    import toolchain.allocation as allocation

    dense = _redundant_tiny()
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    first = layers[0].name
    sensitivity = {layer.name: [[1.0, 0.0], [0.75, 0.0 if layer.name == first else 0.1],
                                [0.5, 0.0 if layer.name == first else 0.3], [0.25, 0.0 if layer.name == first else 1.0]]
                   for layer in layers}
    cache = tmp_path / "sensitivity.json"
    cache.write_text(json.dumps(sensitivity))
    rankings = {layer.name: None for layer in layers}  # read only when measuring: the cache has it
    images = torch.zeros(4, 3, 8, 8)
    args = (dense, layers, rankings, example, images, images, Budget("flops", 0.7))
    grid = (0.75, 0.5, 0.25)  # the cache's
    free, _ = allocation.allocate_for_budget(*args, compensation=True, cache=cache, fractions=grid)
    assert free[first] < layers[0].channels
    counts, info = allocation.allocate_for_budget(*args, compensation=True, cache=cache, fixed=[first], fractions=grid)
    assert counts[first] == layers[0].channels
    assert 0.6 < info["cost"] <= 0.7 + 1e-9 and info["sensitivity"] == sensitivity
    assert all(counts[layer.name] <= free[layer.name] for layer in layers[1:])
    assert counts != free


@pytest.mark.parametrize("fraction,step", [(0.3, 1), (0.5, 1), (0.8, 1), (0.5, 2)])
def test_uniform_counts_are_the_largest_single_ratio_within_the_budget(fraction, step):
    """Checked against a plain scan of ratios; a fixed layer stays whole and the others pay for it."""
    layers = find_prunable_layers(_redundant_tiny(), torch.zeros(2, 3, 8, 8))
    channels = [layer.channels for layer in layers]
    coupled, out_only, producer = layer_costs(layers, "flops")

    def scan(fixed):  # a budget the fixed layers alone exceed: the smallest cut (the allocator then says so)
        best = [c if layer.name in fixed else step for layer, c in zip(layers, channels)]
        for ratio in np.linspace(0, 1, 20001):
            keep = [c if layer.name in fixed else max(step, step * round(ratio * c / step))
                    for layer, c in zip(layers, channels)]
            if budget_cost(keep, channels, coupled, out_only, producer) <= fraction:
                best = keep
        return best

    counts = uniform_counts(layers, Budget("flops", fraction), round_to=step)
    assert [counts[layer.name] for layer in layers] == scan(())
    first = layers[0].name
    held = uniform_counts(layers, Budget("flops", fraction), fixed=[first], round_to=step)
    assert [held[layer.name] for layer in layers] == scan((first,))
    assert held[first] == channels[0] and all(held[n] <= counts[n] for n in counts if n != first)


def test_sensitivity_without_compensation_is_measured_around_the_uniform_cut():
    """Each point is the damage of the whole context cut with one layer changed, as a plain prune, BN
    re-estimation and KL compute it; the context point is the same for every layer."""
    dense, example, layers, images, probe, rankings = _l1_setup()
    context = uniform_counts(layers, Budget("flops", 0.4))
    sens = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, images, compensation=False,
                             fractions=(0.5, 0.25), context=context)

    def plain(counts):
        pruned, _ = prune_model(dense, example, kept_indices(rankings, counts))
        recalibrate_batchnorm(pruned, [(images, None)], torch.device("cpu"), len(images))
        return _damage(pruned, dense, probe)

    at_context = plain(context)
    assert at_context > 0.01  # the cut does damage: points measured alone would all miss it
    for layer in layers:
        points = dict((round(f * layer.channels), v) for f, v in sens[layer.name])
        whole = {**context, layer.name: layer.channels}
        assert points[layer.channels] == pytest.approx(plain(whole), rel=1e-4, abs=1e-7)
        assert points[context[layer.name]] == pytest.approx(at_context, rel=1e-4)
        k = round(0.25 * layer.channels)
        assert points[k] == pytest.approx(plain({**context, layer.name: k}), rel=1e-4, abs=1e-7)
    # alone (no context) the same layers show less damage at the same kept fraction
    alone = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, images, compensation=False,
                              fractions=(0.25,))
    assert all(alone[n][0] == [1.0, 0.0] for n in alone)
    assert sum(alone[n][-1][1] for n in alone) < sum(sens[n][-1][1] for n in sens)


def test_a_budget_without_compensation_measures_in_context_and_keys_its_cache_by_the_budget(tmp_path):
    import toolchain.allocation as allocation
    from toolchain.stages import prune

    dense, example, layers, images, probe, rankings = _l1_setup()
    counts, info = allocation.allocate_for_budget(dense, layers, rankings, example, probe, images,
                                                  Budget("flops", 0.4), compensation=False)
    assert info["sensitivity_context"] == uniform_counts(layers, Budget("flops", 0.4))
    assert info["cost"] <= 0.4 + 1e-9
    # the curves are the ones measured around that context
    expected = layer_sensitivity(copy.deepcopy(dense), layers, rankings, example, probe, images, compensation=False,
                                 context=info["sensitivity_context"])
    assert info["sensitivity"].keys() == expected.keys()
    assert all(np.allclose(info["sensitivity"][n], expected[n], rtol=1e-6) for n in expected)
    _, info = allocation.allocate_for_budget(dense, layers, rankings, example, probe, images,
                                             Budget("flops", 0.4), compensation=True)
    assert info["sensitivity_context"] is None

    class Ctx:
        root = tmp_path

    def folder(**kw):
        return prune.sensitivity_folder(Ctx, prune.Inputs("r", "b", "vgg11_bn", 0, **kw))

    # with compensation the budgets share one measurement; without, each budget has its own
    assert folder(budget="flops=0.4") == folder(budget="flops=0.2")
    assert folder(budget="flops=0.4", compensation="none") != folder(budget="flops=0.2", compensation="none")
    assert (folder(budget="flops=0.4", compensation="none")
            != folder(budget="flops=0.4", compensation="none", protect=["features.0"]))


def test_a_latency_budget_without_compensation_is_measured_around_the_uniform_cut_at_its_fraction():
    from types import SimpleNamespace

    from toolchain.allocation import sensitivity_context
    from toolchain.cost import CostModel

    dense = _redundant_tiny()
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    cost = CostModel.of(dense, (3, 8, 8), layers)
    table = SimpleNamespace(dense_ms=4.0)
    assert (sensitivity_context(layers, parse_budget("latency=2ms"), cost, latency=table)
            == uniform_counts(layers, Budget("flops", 0.5)) == sensitivity_context(layers, Budget("flops", 0.5), cost))
