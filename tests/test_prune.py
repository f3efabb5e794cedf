"""Surgery: the pruned model computes exactly what the masked (zeroed-filter) model computes."""

import pytest
import torch
from torch import nn

from toolchain.models import create_model
from toolchain.ranking.base import LayerRanking
from toolchain.stages.prune import (
    BorderBiasConv2d,
    PruneRecord,
    build_pruned,
    count_flops_params,
    find_prunable_layers,
    kept_indices,
    mask_model,
    prune_model,
    resolve_keep_counts,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BN statistics, so removed channels emit non-zero constants worth folding."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 1.5 - 0.5)
    return model.eval()


def _random_kept(layers, fraction: float, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {layer.name: sorted(torch.randperm(layer.channels, generator=g)[: max(1, int(layer.channels * fraction))]
                               .tolist()) for layer in layers}


@pytest.mark.parametrize("name,size,expected_layers,borders", [
    ("vgg16_bn", 32, 13, True),
    ("resnet18", 32, 12, True),  # 8 block convs and 4 residual streams (stem or downsample + each block's conv2)
    ("torchvision:mobilenet_v2", 32, 25, False),  # expand (or stem) + depthwise groups; 1x1 consumers
    ("torchvision:efficientnet_b0", 32, 40, False),  # the same with squeeze-excitation fc2 as a member
])
def test_pruned_equals_masked(name, size, expected_layers, borders):
    torch.manual_seed(0)
    model = _randomize_bn(create_model(name, num_classes=10))
    example = torch.randn(2, 3, size, size)
    layers = find_prunable_layers(model, example)
    assert len(layers) == expected_layers
    kept = _random_kept(layers, 0.5, seed=1)
    pruned, record = prune_model(model, example, kept, fold=True)
    masked = mask_model(model, kept, {layer.name: layer.members for layer in layers})
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        got, want, dense = pruned(x), masked(x), model(x)
        unfolded = prune_model(model, example, kept, fold=False)[0](x)
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    # the check can fail: removal without folding, or no removal at all, differ from masking
    assert (unfolded - want).abs().max().item() > 1e-2
    assert (dense - want).abs().max().item() > 1e-2
    # channels really left: every conv of every group got smaller and the counts match
    modules = dict(pruned.named_modules())
    for layer in layers:
        for conv in (layer.name, *layer.members):
            assert modules[conv].out_channels == len(kept[layer.name]), conv
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(c for layer in layers for c in (layer.name, *layer.members)) == sorted(convs), "every conv is cut"
    assert bool(record.border_bias) == borders, "zero-padded 3x3 consumers need border corrections"
    assert any(isinstance(m, BorderBiasConv2d) for m in pruned.modules()) == borders


@pytest.mark.parametrize("name,most,stem", [("mobilenet_v2", 0.35, "features.0.0"),
                                            ("efficientnet_b0", 0.40, "features.0.0"), ("resnet18", 0.30, None),
                                            ("resnet50", 0.30, "conv1")])
def test_half_the_channels_of_torchvision_models_leave_a_quarter_of_the_flops(name, most, stem):
    """Issue 14's goals at 64x64 with --keep-ratio 0.5: grouped channels are cut, not left whole (before: 0.88 of
    mobilenet_v2's FLOPs, 0.90 efficientnet_b0, 0.54 resnet18, 0.42 resnet50), with the default protection: the
    stem kept whole where its channels are a group of its own, resnet18's stem group (a residual stream with
    layer1) cut, since keeping it would leave 0.371 (toolchain.protect)."""
    from toolchain import protect
    from toolchain.cost import CostModel

    model = create_model(f"torchvision:{name}", num_classes=10).eval()
    example = torch.zeros(2, 3, 64, 64)
    layers = find_prunable_layers(model, example)
    rankings = {layer.name: LayerRanking(order=list(range(layer.channels)), scores=[0.0] * layer.channels)
                for layer in layers}
    protected = protect.resolve("auto", f"torchvision:{name}", model, example, layers)
    assert protected == ([stem] if stem else [])
    counts = resolve_keep_counts(layers, rankings, keep_ratio=0.5, per_layer={}, protected=protected)
    channels = {layer.name: layer.channels for layer in layers}
    assert all(counts[n] == channels[n] for n in protected)
    assert sum(counts[n] < channels[n] for n in channels) == len(channels) - len(protected)
    cost = CostModel.of(model, (3, 64, 64), layers)
    assert cost.fraction("flops", counts) <= most
    if stem is None:  # what protecting the residual stream would cost: over the goal
        whole = resolve_keep_counts(layers, rankings, keep_ratio=0.5, per_layer={}, protected=[layers[0].name])
        assert cost.fraction("flops", whole) > most


def test_builtin_models_protect_nothing_by_default_and_keep_their_counts():
    """Every VGG16 figure in docs/ was measured with the built-in stem cut: under the default (auto) the counts
    are what they were; stem and patterns protect what they name, in network order."""
    from toolchain import protect

    model = create_model("vgg16_bn", num_classes=10).eval()
    example = torch.zeros(2, 3, 32, 32)
    layers = find_prunable_layers(model, example)
    rankings = {layer.name: LayerRanking(order=list(range(layer.channels)), scores=[0.0] * layer.channels)
                for layer in layers}
    assert protect.resolve("auto", "vgg16_bn", model, example, layers) == []
    counts = resolve_keep_counts(layers, rankings, keep_ratio=0.5, per_layer={})
    assert counts == {layer.name: layer.channels // 2 for layer in layers}
    assert protect.resolve("stem", "vgg16_bn", model, example, layers) == ["features.0"]
    assert protect.resolve("features.4?,stem", "vgg16_bn", model, example, layers) == ["features.0", "features.40"]
    resnet = create_model("resnet18", num_classes=10).eval()  # its stem's channels are layer1's residual stream
    assert protect.resolve("stem", "resnet18", resnet, example, find_prunable_layers(resnet, example)) == []


def test_linear_consumer_fold_is_exact_without_border():
    model = _randomize_bn(create_model("vgg16_bn", num_classes=10))
    example = torch.randn(2, 3, 32, 32)
    layers = find_prunable_layers(model, example)
    last = layers[-1]
    assert last.consumers == ["classifier"]
    kept = {last.name: list(range(0, last.channels, 3))}
    pruned, record = prune_model(model, example, kept, fold=True)
    assert "classifier" not in record.border_bias
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), mask_model(model, kept)(x), atol=1e-5)
    assert pruned.classifier.in_features == len(kept[last.name])


def test_rebuild_from_record_round_trips():
    model = _randomize_bn(create_model("resnet18", num_classes=10))
    example = torch.randn(2, 3, 32, 32)
    kept = _random_kept(find_prunable_layers(model, example), 0.4, seed=3)
    pruned, record = prune_model(model, example, kept, fold=True)
    record = PruneRecord.from_json(record.to_json())
    rebuilt = build_pruned(create_model("resnet18", num_classes=10), example, record)
    rebuilt.load_state_dict(pruned.state_dict())  # strict: same keys and shapes
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))


def test_flops_and_params_drop():
    model = create_model("vgg16_bn", num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32)
    flops, params = count_flops_params(model, (3, 32, 32))
    # VGG16 on 32x32: 313.2 M multiply-adds in the convs + 5120 in the classifier, 2 FLOPs each
    assert flops == 2 * (313_196_544 + 5_120)
    assert params == sum(p.numel() for p in model.parameters())
    layers = find_prunable_layers(model, example)
    kept = {layer.name: list(range(layer.channels // 2)) for layer in layers}
    pruned, _ = prune_model(model, example, kept, fold=True)
    pf, pp = count_flops_params(pruned, (3, 32, 32))
    assert 0.2 < pf / flops < 0.3 and pp < params / 3


def test_keep_counts_priority_and_rounding():
    model = create_model("vgg11_bn", num_classes=10).eval()
    layers = find_prunable_layers(model, torch.randn(2, 3, 32, 32))
    rankings = {layer.name: LayerRanking(order=list(range(layer.channels)), scores=[0.0] * layer.channels)
                for layer in layers}
    rankings[layers[1].name].keep = 5
    counts = resolve_keep_counts(layers, rankings, keep_ratio=0.5, per_layer={layers[0].name: 0.25}, round_to=1)
    assert counts[layers[0].name] == 16  # per-layer map wins
    assert counts[layers[1].name] == 5  # then the criterion's own count
    assert counts[layers[2].name] == layers[2].channels // 2  # then the ratio
    rounded = resolve_keep_counts(layers, rankings, keep_ratio=0.3, per_layer={}, round_to=8)
    assert all(v % 8 == 0 for v in rounded.values())
    assert kept_indices(rankings, counts)[layers[1].name] == [0, 1, 2, 3, 4]
