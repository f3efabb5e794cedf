"""The cost model predicts what the pruned model measures: FLOPs as torch.utils.flop_counter counts them
and the parameter count, for kept counts drawn at random, on VGG and ResNet; and the budget's terms are
the prunable part of the same model."""

import pytest
import torch

from toolchain.cost import CostModel, count_flops_params
from toolchain.models import create_model
from toolchain.ranking.cutoffs import budget_cost
from toolchain.stages.prune import find_prunable_layers, prune_model

SHAPE = (3, 32, 32)


def _model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    return model, find_prunable_layers(model, torch.zeros(2, *SHAPE))


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "torchvision:mobilenet_v2"])
def test_the_model_equals_the_flop_counter_on_pruned_models(name):
    model, layers = _model(name)
    cost = CostModel.of(model, SHAPE, layers)
    flops, params = count_flops_params(model, SHAPE)
    assert cost.total("flops", {}) == flops and cost.total("params", {}) == params
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        counts = {layer.name: int(torch.randint(1, layer.channels + 1, (1,), generator=gen)) for layer in layers}
        kept = {layer.name: list(range(counts[layer.name])) for layer in layers}
        pruned, _ = prune_model(model, torch.zeros(2, *SHAPE), kept)
        flops_p, params_p = count_flops_params(pruned, SHAPE)
        assert cost.total("flops", counts) == pytest.approx(flops_p, rel=1e-12)
        assert cost.total("params", counts) == pytest.approx(params_p, rel=1e-12)
        assert cost.fraction("flops", counts) == pytest.approx(flops_p / flops, rel=1e-12)
        assert cost.total("channels", counts) == sum(counts.values())


def test_the_budget_is_the_prunable_part_of_the_same_model():
    """On VGG every conv is prunable: the budget's cost is the whole cost less the classifier, whose
    FLOPs follow the last conv's kept fraction."""
    model, layers = _model("vgg11_bn")
    cost = CostModel.of(model, SHAPE, layers)
    coupled, out_only, producer = cost.budget_terms("flops")
    counts = {layer.name: max(1, layer.channels // 3) for layer in layers}
    keep, channels = [counts[layer.name] for layer in layers], [layer.channels for layer in layers]
    last = layers[-1]
    classifier = 2.0 * 512 * 10 * counts[last.name] / last.channels
    prunable = budget_cost(keep, channels, coupled, out_only, producer) * (sum(coupled) + sum(out_only))
    assert prunable + classifier == pytest.approx(cost.total("flops", counts), rel=1e-12)


def test_the_roofline_counts_the_flops_the_cost_model_counts():
    """The latency estimate's FLOPs are the cost model's, dense and pruned (one cost model)."""
    from toolchain.roofline import estimate
    from toolchain.targets import load_target

    model, layers = _model("vgg11_bn")
    cost = CostModel.of(model, SHAPE, layers)
    counts = {layer.name: max(1, layer.channels // (2 + i % 3)) for i, layer in enumerate(layers)}
    pruned, _ = prune_model(model, torch.zeros(2, *SHAPE), {n: list(range(c)) for n, c in counts.items()})
    target = load_target("jetson")
    for net, kept in ((model, {}), (pruned, counts)):
        roof = estimate(net, target, "fp32", 2, SHAPE)
        assert roof.total_flops == pytest.approx(2 * cost.total("flops", kept), rel=1e-12)  # batch 2
        assert roof.total_flops == pytest.approx(2 * count_flops_params(net, SHAPE)[0], rel=1e-12)
