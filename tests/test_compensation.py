"""Compensation: the least-squares refit brings a pruned consumer back towards the dense network."""

import copy

import pytest
import torch
from tiny_models import Tiny
from torch import nn

from toolchain.compensation import augmented_view, compensate
from toolchain.stages.prune import consumer_outputs, find_prunable_layers, prune_model


def _trained_looking(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _duplicated(seed: int = 0) -> nn.Module:
    """Tiny with channels 3-5 of the first conv exact copies of channels 0-2 (filter, bias and BN)."""
    model = _trained_looking(seed)
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():
        conv.weight[3:] = conv.weight[:3]
        conv.bias[3:] = conv.bias[:3]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[3:] = t[:3]
    return model


def _consumer_error(pruned: nn.Module, dense: nn.Module, name: str, x: torch.Tensor) -> float:
    got = {}
    hooks = [dict(model.named_modules())[name].register_forward_hook(lambda m, a, o, k=key: got.__setitem__(k, o))
             for key, model in (("pruned", pruned), ("dense", dense))]
    with torch.no_grad():
        pruned(x), dense(x)
    for h in hooks:
        h.remove()
    y, w = got["pruned"], got["dense"]
    return float(((y - w) ** 2).sum() / ((w - w.mean()) ** 2).sum())


def test_refit_rebuilds_a_removed_copy_exactly():
    dense = _duplicated()
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    kept = {"features.0": [0, 1, 2]}  # the copies go; the consumer can take their weights over
    pruned, _ = prune_model(dense, example, kept)
    images = torch.randn(64, 3, 8, 8)
    test = torch.randn(16, 3, 8, 8)
    before = _consumer_error(pruned, dense, "features.4", test)
    report = compensate(pruned, dense, images, consumer_outputs(layers, kept), ridge=1e-9)
    after = _consumer_error(pruned, dense, "features.4", test)
    assert before > 0.05
    assert after < 1e-8, after  # a copy is linearly predictable: the refit is exact
    assert report.consumers["features.4"]["error_after"] < 1e-8
    with torch.no_grad():
        torch.testing.assert_close(pruned(test), dense(test), rtol=1e-4, atol=1e-4)


def test_refit_reduces_held_out_error_in_network_order_and_a_wrong_target_fails():
    dense = _trained_looking(1)
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    g = torch.Generator().manual_seed(3)
    kept = {layer.name: sorted(torch.randperm(layer.channels, generator=g)[: layer.channels // 2].tolist())
            for layer in layers}
    pruned, _ = prune_model(dense, example, kept)
    images, test = torch.randn(256, 3, 8, 8), torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        def logit_error(m):
            return float(((m(test) - dense(test)) ** 2).mean())
        plain = logit_error(pruned)
        fitted = copy.deepcopy(pruned)
        report = compensate(fitted, dense, images, consumer_outputs(layers, kept))
        good = logit_error(fitted)
        # the same refit towards another network's outputs must not look like a success
        other = _trained_looking(7)
        wrong = copy.deepcopy(pruned)
        compensate(wrong, other, images, consumer_outputs(layers, kept))
        bad = logit_error(wrong)
    assert list(report.consumers) == ["features.4", "features.8", "classifier"]  # network order
    for info in report.consumers.values():
        assert info["error_after"] < info["error_before"]
    assert good < 0.5 * plain, (good, plain)
    assert bad > plain, (bad, plain)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_refit_of_channel_groups_lowers_every_consumers_error_and_the_logits_error(name):
    """Residual streams and expand/depthwise groups: every conv reading a cut group is refitted (a conv that is
    itself a group member keeps that group's channels), and the network gets closer to the dense one."""
    from toolchain.models import create_model

    torch.manual_seed(0)
    dense = create_model(name, num_classes=10).eval()
    for m in dense.modules():  # trained-looking statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    example = torch.zeros(2, 3, 16, 16)
    layers = find_prunable_layers(dense, example)
    assert any(layer.members for layer in layers)
    g = torch.Generator().manual_seed(3)
    kept = {layer.name: sorted(torch.randperm(layer.channels, generator=g)[: (3 * layer.channels) // 4].tolist())
            for layer in layers}
    pruned, _ = prune_model(dense, example, kept)
    images, test = torch.randn(48, 3, 16, 16), torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        before = float(((pruned(test) - dense(test)) ** 2).mean())
        report = compensate(pruned, dense, images, consumer_outputs(layers, kept))
        after = float(((pruned(test) - dense(test)) ** 2).mean())
    readers = {c for layer in layers for c in layer.consumers}
    assert set(report.consumers) == readers
    for info in report.consumers.values():
        assert info["error_after"] <= info["error_before"] + 1e-9
    assert after < before, (after, before)


def test_refit_adds_a_bias_where_the_consumer_had_none():
    dense = _trained_looking(2)
    with torch.no_grad():
        conv = dense.features[4]
        dense.features[4] = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        dense.features[4].weight.copy_(conv.weight)
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    kept = {"features.0": [0, 2, 4]}
    pruned, _ = prune_model(dense, example, kept)
    report = compensate(pruned, dense, torch.randn(64, 3, 8, 8), consumer_outputs(layers, kept))
    assert report.bias_added == ["features.4"]
    assert pruned.features[4].bias is not None


def test_the_refit_builds_no_autograd_graph_when_called_with_gradients_on():
    """The prune stage calls it outside no_grad: the moments used to carry the forward passes' graph (memory
    growing with the images) and the residual warned about a tensor that requires grad."""
    import warnings

    dense = _trained_looking(3)
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    kept = {"features.0": [0, 1, 3]}
    pruned, _ = prune_model(dense, example, kept)
    assert torch.is_grad_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = compensate(pruned, dense, torch.randn(64, 3, 8, 8), consumer_outputs(layers, kept))
    assert report.consumers and all(p.is_leaf and p.requires_grad for p in pruned.parameters())


@pytest.mark.parametrize("view", [1, 2, 5])
def test_augmented_views_keep_the_shape_and_change_the_content(view):
    x = torch.randn(4, 3, 8, 8)
    v = augmented_view(x, view)
    assert v.shape == x.shape and not torch.equal(v, x)
    assert torch.equal(augmented_view(x, view), v)  # seeded
    assert torch.equal(augmented_view(x, 0), x)


def test_cached_dense_targets_give_the_same_refit_without_dense_passes():
    """Cuts of one layer refitted with a shared ``dense_targets`` dict: the same weights as without it, and the
    later cuts run no dense forward pass at all (the dense pass also stops at the last consumer)."""
    dense = _trained_looking()
    example = torch.zeros(2, 3, 8, 8)
    layers = find_prunable_layers(dense, example)
    images = torch.randn(48, 3, 8, 8)
    calls = []
    first, last = dense.features[0], dense.features[-1]  # last: past every consumer of layer 0
    # (the pruned copies carry these hooks too: only the dense model's modules count)
    first.register_forward_hook(lambda m, *_: calls.append("first") if m is first else None)
    last.register_forward_hook(lambda m, *_: calls.append("last") if m is last else None)
    cache: dict = {}
    for k in (5, 4, 2):
        kept = {"features.0": list(range(k))}
        plain, _ = prune_model(dense, example, kept)
        shared = copy.deepcopy(plain)
        calls.clear()
        compensate(plain, dense, images, consumer_outputs(layers, kept))
        assert "first" in calls and "last" not in calls  # stopped once features.4 had its targets
        calls.clear()
        compensate(shared, dense, images, consumer_outputs(layers, kept), dense_targets=cache)
        assert (calls == []) == (k != 5)  # only the first cut needed the dense outputs
        for a, b in zip(plain.state_dict().values(), shared.state_dict().values()):
            assert torch.equal(a, b)
