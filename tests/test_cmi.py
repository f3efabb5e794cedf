"""CMI ranking: rank_layer against a slow reference, the permutation stop, capture and the criterion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import Tiny
from torch import nn

import toolchain.ranking.cmi as cmi_mod
from toolchain.errors import UserError
from toolchain.ranking.base import CRITERIA, PrunableLayer, RankContext
from toolchain.ranking.capture import FeatureCapture, capture_features
from toolchain.ranking.cmi import parse_options, rank_layer
from toolchain.ranking.cutoffs import budget_cost, layer_costs

# ---------------------------------------------------------------- slow reference (numpy, float64)


def _ref_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d / (2 * sigma**2)) / x.shape[0]


def _ref_entropy(a: np.ndarray, alpha: float) -> float:
    a = a / np.trace(a)
    if alpha == 2.0:
        return -math.log(float((a * a).sum()))
    lam = np.clip(np.linalg.eigvalsh(a), 0, None)
    lam = lam[lam > lam.max() * len(lam) * np.finfo(np.float64).eps]
    lam = lam / lam.sum()
    if alpha == 1.0:
        return float(-(lam * np.log(lam)).sum())
    return math.log(float((lam**alpha).sum())) / (1 - alpha)


def _ref_joint(grams: list[np.ndarray], n: int) -> np.ndarray:
    out = np.ones((n, n)) / n  # the unit of the Hadamard product, S = 0
    for g in grams:  # recomputed from scratch every time
        out = out * g
        out = out / np.trace(out)
    return out


def _ref_rank(features, labels, num_classes, alpha, gamma=5.0, condition=()):
    features = np.asarray(features, dtype=np.float64)
    n, c = features.shape[:2]
    d = int(np.prod(features.shape[2:]))
    sig = gamma * n ** (-1 / (4 + d))
    grams = [_ref_gram(features[:, j], sig) for j in range(c)]
    onehot = np.eye(num_classes)[np.asarray(labels)]
    gy = _ref_gram(onehot, gamma * n ** (-1 / (4 + num_classes)))
    p = []
    for m in condition:
        m = np.asarray(m, dtype=np.float64)
        sc = gamma * n ** (-1 / (4 + int(np.prod(m.shape[2:]))))
        p += [_ref_gram(m[:, j], sc) for j in range(m.shape[1])]
    ent = lambda gs: _ref_entropy(_ref_joint(gs, n), alpha)  # noqa: E731
    sel, rest, cmis = [], list(range(c)), []
    while len(rest) > 1:
        mi = {}
        for j in rest:
            z = p + [grams[i] for i in sel] + [grams[j]]
            mi[j] = ent([gy]) + ent(z) - ent(z + [gy])
        best = max(mi.values())
        s = min(j for j in rest if mi[j] >= best - cmi_mod.TIE_TOL)
        sel.append(s)
        rest.remove(s)
        z = p + [grams[i] for i in sel]
        r = [grams[i] for i in rest]
        # CMI of the remaining set given P u S, the 4-entropy formula
        cmis.append(ent(r + z) + ent([gy] + z) - ent([gy] + r + z) - ent(z))
    return sel + rest, cmis


def _ref_rank_adaptive(features, labels, alpha, condition=(), target=None):
    """Adaptive kernels the slow way: median-normalised distances, mean over the set, indicator labels
    (or, with ``target``, a Gaussian kernel of the whole target with the median width)."""
    features = np.asarray(features, dtype=np.float64)
    n, c = features.shape[:2]

    def ndist(v):
        v = v.reshape(n, -1)
        dist = ((v[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        pairs = np.sort(dist[np.triu_indices(n, 1)])
        med = pairs[(len(pairs) - 1) // 2]  # lower median, as torch.median
        return dist / med

    dts = [ndist(features[:, j]) for j in range(c)]
    p = [ndist(np.asarray(m, dtype=np.float64)[:, j]) for m in condition for j in range(m.shape[1])]
    ky = (np.asarray(labels)[:, None] == np.asarray(labels)[None, :]).astype(np.float64)
    if target is not None:
        ky = np.exp(-ndist(np.asarray(target, dtype=np.float64)))
    kern = lambda ds: np.exp(-sum(ds) / len(ds)) if ds else np.ones((n, n))  # noqa: E731
    ent = lambda k: _ref_entropy(k, alpha)  # noqa: E731
    single = [ent(ky) + ent(kern([dt])) - ent(kern([dt]) * ky) for dt in dts]
    sel, rest, cmis = [], list(range(c)), []
    while len(rest) > 1:
        mi = {}
        for j in rest:
            k = kern(p + [dts[i] for i in sel] + [dts[j]])
            mi[j] = ent(ky) + ent(k) - ent(k * ky)
        best = max(mi.values())
        s = min((j for j in rest if mi[j] >= best - cmi_mod.TIE_TOL), key=lambda j: (-single[j], j))
        sel.append(s)
        rest.remove(s)
        z = p + [dts[i] for i in sel]
        rz = z + [dts[i] for i in rest]
        cmis.append(ent(kern(rz)) + ent(ky * kern(z)) - ent(ky * kern(rz)) - ent(kern(z)))
    return sel + rest, cmis


def _layer_data(seed=0, n=30, c=7, classes=3, hw=2):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = 1.5 * torch.randn(classes, c, 1, 1, generator=g, dtype=torch.float64)
    f = torch.relu(torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64) + means[y])
    return f, y


@pytest.mark.parametrize("alpha", [2.0, 1.01])
@pytest.mark.parametrize("conditioned", [False, True])
def test_rank_layer_matches_slow_reference(alpha, conditioned):
    f, y = _layer_data(seed=1 + conditioned)
    cond = ()
    if conditioned:
        g = torch.Generator().manual_seed(9)
        cond = (torch.relu(torch.randn(30, 2, 3, 3, generator=g, dtype=torch.float64) + f[:, :2, :1, :1]),
                torch.randn(30, 1, 2, 2, generator=g, dtype=torch.float64))
    res = rank_layer(f, y, num_classes=3, alpha=alpha, condition=cond)
    ref_order, ref_cmi = _ref_rank(f.numpy(), y.numpy(), 3, alpha, condition=[m.numpy() for m in cond])
    assert res.order == ref_order
    assert len(res.cmi) == f.shape[1] - 1
    np.testing.assert_allclose(res.cmi, ref_cmi, rtol=0, atol=1e-6)
    assert res.tie_steps == 0 and not res.saturated  # the comparison is about real decisions
    assert len(set(np.round(np.diff(ref_cmi), 8))) > 2  # a non-trivial curve


@pytest.mark.parametrize("alpha", [2.0, 1.01])
@pytest.mark.parametrize("conditioned", [False, True])
def test_rank_layer_adaptive_matches_slow_reference(alpha, conditioned):
    f, y = _layer_data(seed=4 + conditioned)
    cond = ()
    if conditioned:
        g = torch.Generator().manual_seed(5)
        cond = (torch.relu(torch.randn(30, 2, 3, 3, generator=g, dtype=torch.float64) + f[:, :2, :1, :1]),)
    res = rank_layer(f, y, num_classes=3, alpha=alpha, condition=cond, kernel="adaptive")
    ref_order, ref_cmi = _ref_rank_adaptive(f.numpy(), y.numpy(), alpha, condition=[m.numpy() for m in cond])
    assert res.order == ref_order
    np.testing.assert_allclose(res.cmi, ref_cmi, rtol=0, atol=1e-6)
    assert res.kernel == "adaptive" and len(res.sigma) == f.shape[1] and res.sigma_labels == 0.0
    assert res.entropy_labels == pytest.approx(math.log(3))  # indicator kernel, balanced classes
    json.dumps(res.to_info())


@pytest.mark.parametrize("alpha", [2.0, 1.01])
def test_rank_layer_with_a_response_target_matches_slow_reference(alpha):
    f, y = _layer_data(seed=6)
    g = torch.Generator().manual_seed(2)
    # the "next layer": a fixed mixing of some channels, so the target is not the labels
    target = torch.relu(torch.einsum("nchw,oc->nohw", f, torch.randn(4, f.shape[1], generator=g,
                                                                      dtype=torch.float64)))
    res = rank_layer(f, y, num_classes=3, alpha=alpha, kernel="adaptive", target=target)
    ref_order, ref_cmi = _ref_rank_adaptive(f.numpy(), y.numpy(), alpha, target=target.numpy())
    assert res.order == ref_order
    np.testing.assert_allclose(res.cmi, ref_cmi, rtol=0, atol=1e-6)
    labels_order = rank_layer(f, y, num_classes=3, alpha=alpha, kernel="adaptive").order
    assert labels_order != res.order  # the target changes the decisions
    with pytest.raises(UserError, match="adaptive"):
        rank_layer(f, y, num_classes=3, alpha=alpha, target=target)
    assert parse_options({"kernel": "exact"}).preserve == "labels"  # the paper's mode as a whole
    with pytest.raises(UserError, match="adaptive"):
        cmi_mod.cmi_criterion(_tiny_context({"kernel": "exact", "preserve": "next", "cutoff": "knee"}))


def test_adaptive_kernel_does_not_saturate_where_exact_does():
    # many weakly related channels: the exact running product collapses to I/N, the mean kernel does not
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    f = torch.relu(torch.randn(40, 24, 4, 4, generator=g, dtype=torch.float64) + 0.5 * y[:, None, None, None])
    exact = rank_layer(f, y, num_classes=4, alpha=2.0, gamma=2.0)
    adaptive = rank_layer(f, y, num_classes=4, alpha=2.0, kernel="adaptive")
    assert exact.saturated and exact.tie_steps > 0
    assert not adaptive.saturated and adaptive.tie_steps == 0
    assert max(adaptive.joint_entropy) < 0.99 * math.log(40)


def test_rank_layer_float32_numpy_input_and_numbers():
    f, y = _layer_data(seed=3)
    res = rank_layer(f.float().numpy(), y.numpy(), num_classes=3, alpha=2.0, gamma=4.0)
    ref_order, ref_cmi = _ref_rank(f.float().numpy(), y.numpy(), 3, 2.0, gamma=4.0)
    assert res.order == ref_order
    np.testing.assert_allclose(res.cmi, ref_cmi, atol=1e-6)
    n, hw = 30, 4
    assert res.sigma == pytest.approx(4.0 * n ** (-1 / (4 + hw)))
    assert res.sigma_labels == pytest.approx(4.0 * n ** (-1 / (4 + 3)))
    # the curve starts at I(Y; layer) and the chain rule ties it to the MI curve
    assert res.cmi_total == pytest.approx(res.cmi[0] + res.mi[0], abs=1e-9)
    assert res.max_entropy == pytest.approx(math.log(n))
    json.dumps(res.to_info())


def test_ties_go_to_lowest_index_and_saturation_is_reported():
    # identical channels: every step is a tie, the order is the index order
    g = torch.Generator().manual_seed(0)
    one = torch.randn(20, 1, 2, 2, generator=g, dtype=torch.float64)
    f = one.repeat(1, 5, 1, 1)
    res = rank_layer(f, torch.arange(20) % 2, num_classes=2, alpha=2.0)
    assert res.order == [0, 1, 2, 3, 4] and res.tie_steps == 4
    # far-apart samples with tiny widths: Grams are I/N, every joint entropy is ln N
    spread = 100.0 * torch.randn(20, 4, 3, 3, generator=g, dtype=torch.float64)
    res = rank_layer(spread, torch.arange(20) % 2, num_classes=2, alpha=2.0, gamma=0.5)
    assert res.saturated and res.saturation_step == 1
    assert res.joint_entropy[0] == pytest.approx(math.log(20), abs=1e-6)
    assert res.order == [0, 1, 2, 3]


def _permutation_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 80
    y = torch.arange(n) % 4
    code = 3.0 * torch.nn.functional.one_hot(y, 4).double()  # each informative channel: a noisy label code
    informative = code[:, None, :] + 0.7 * torch.randn(n, 4, 4, generator=g, dtype=torch.float64)
    noise = 0.7 * torch.randn(n, 4, 4, generator=g, dtype=torch.float64) + 1.5
    f = torch.cat([noise[:, :2], informative, noise[:, 2:]], 1).reshape(n, 8, 2, 2)
    return f, y, {2, 3, 4, 5}


@pytest.mark.parametrize("alpha", [2.0, 1.01])
def test_permutation_stop_keeps_the_informative_channels(alpha):
    f, y, informative = _permutation_case()
    res = rank_layer(f, y, num_classes=4, alpha=alpha, stop="permutation", permutations=100, eta=0.05, seed=0)
    assert set(res.order[:4]) == informative  # informative first
    assert res.selected == 4  # stop at the first pure-noise channel
    assert res.p_values[:4] == [0.0] * 4 and res.p_values[-1] >= 0.05
    assert len(res.p_values) == 5
    assert sorted(res.order) == list(range(8)) and len(res.cmi) == 7  # order completed greedily
    plain = rank_layer(f, y, num_classes=4, alpha=alpha)
    assert plain.order == res.order and plain.p_values is None and plain.selected is None


def test_rank_layer_validates_input():
    f, y = _layer_data()
    with pytest.raises(UserError):
        rank_layer(f, y, num_classes=3, alpha=0)
    with pytest.raises(UserError):
        rank_layer(f, y, num_classes=3, stop="sometimes")
    with pytest.raises(UserError):
        rank_layer(f, y, num_classes=2)  # label 2 out of range
    with pytest.raises(UserError):
        rank_layer(f, y[:-1], num_classes=3)
    with pytest.raises(UserError):
        rank_layer(f, y, num_classes=3, condition=[f[:-1]])
    with pytest.raises(UserError):
        rank_layer(f, y, num_classes=3, kernel="median")


# ---------------------------------------------------------------- a tiny network


def _tiny_context(options=None, n=24, seed=0):
    torch.manual_seed(seed)
    model = Tiny().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    specs = [("features.0", "features.1", (8, 8), ["features.4"]),
             ("features.4", "features.5", (4, 4), ["features.8"]),
             ("features.8", "features.9", (2, 2), ["classifier"])]
    mods = dict(model.named_modules())
    layers = []
    for name, bn, hw, consumers in specs:
        conv = mods[name]
        flops = 2.0 * conv.out_channels * hw[0] * hw[1] * conv.in_channels * 9
        layers.append(PrunableLayer(name=name, conv=conv, bn_name=bn, channels=conv.out_channels, flops=flops,
                                    out_hw=hw, consumers=consumers))
    labels = torch.arange(n) % 3
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g) + labels[:, None, None, None].float()
    # the paper's mode unless a test says otherwise: these tests compare against rank_layer's defaults
    options = {"kernel": "exact", "cutoff": "scree", **(options or {})}
    return RankContext(model=model, layers=layers, images=images, labels=labels, num_classes=3,
                       device=torch.device("cpu"), options=options, seed=seed)


def test_capture_matches_manual_forward_and_stops_early():
    ctx = _tiny_context()
    with torch.no_grad():
        manual = torch.relu(ctx.model.features[:6](ctx.images))
    calls = []
    h = ctx.model.features[8].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = capture_features(ctx.model, ctx.layers, ctx.images, [1], batch_size=10)
    finally:
        h.remove()
    assert set(got) == {1} and torch.allclose(got[1], manual, atol=1e-6)
    assert calls == []  # the forward stopped after the requested layer
    assert all(not m._forward_hooks for m in ctx.model.modules())  # hooks removed


def test_feature_capture_groups_within_memory_budget():
    ctx = _tiny_context()
    cap = FeatureCapture(ctx.model, ctx.layers, ctx.images, max_bytes=10**9)
    first = cap.get(0, upcoming=[1, 2])
    assert cap.passes == 1 and cap.get(2) is not None and cap.passes == 1
    cap.release(0)
    assert cap.get(0) is not first and cap.passes == 2
    small = FeatureCapture(ctx.model, ctx.layers, ctx.images, max_bytes=cap.nbytes(1) + 1)
    for i in range(3):
        small.get(i, upcoming=range(i + 1, 3))
        small.release(i)
    assert small.passes == 3


def test_cmi_is_registered_by_importing_the_module():
    assert "cmi" in CRITERIA and CRITERIA.get("cmi") is cmi_mod.cmi_criterion


def _check(rankings, ctx):
    for layer in ctx.layers:
        r = rankings[layer.name]
        assert sorted(r.order) == list(range(layer.channels))
        assert [r.scores[ch] for ch in r.order] == sorted(r.scores, reverse=True)
        assert 1 <= r.keep <= layer.channels
        assert len(r.info["cmi"]) == layer.channels - 1
        assert isinstance(r.info["saturated"], bool) and "widths" in r.info
        json.dumps(r.info)


def test_criterion_per_layer_equals_rank_layer():
    ctx = _tiny_context({"cutoff": "knee"})
    out = CRITERIA.get("cmi")(ctx)
    _check(out, ctx)
    feats = capture_features(ctx.model, ctx.layers, ctx.images, range(3))
    for i, layer in enumerate(ctx.layers):
        res = rank_layer(feats[i], ctx.labels, num_classes=3, alpha=2.0, seed=i)
        assert out[layer.name].order == res.order
        assert out[layer.name].info["cmi"] == pytest.approx(res.cmi)
        assert out[layer.name].info["conditioned_on"] == []


@pytest.mark.parametrize("formulation", ["compact", "full"])
def test_criterion_forward_conditions_on_previous_layers(formulation):
    ctx = _tiny_context({"formulation": formulation, "cutoff": "ratio", "keep_ratio": 0.5})
    out = CRITERIA.get("cmi")(ctx)
    _check(out, ctx)
    names = [layer.name for layer in ctx.layers]
    assert out[names[0]].info["conditioned_on"] == []
    assert out[names[1]].info["conditioned_on"] == names[:1]
    assert out[names[2]].info["conditioned_on"] == (names[1:2] if formulation == "compact" else names[:2])
    assert [out[n].keep for n in names] == [3, 4, 2]  # round(0.5 * C)
    feats = capture_features(ctx.model, ctx.layers, ctx.images, range(3))
    kept = [feats[i][:, out[n].order[:out[n].keep]] for i, n in enumerate(names)]
    cond = [kept[1]] if formulation == "compact" else kept[:2]
    res = rank_layer(feats[2], ctx.labels, num_classes=3, alpha=2.0, condition=cond, seed=2)
    assert out[names[2]].order == res.order


def test_criterion_bidirectional_seeds_at_the_most_pruned_layer():
    ctx = _tiny_context({"formulation": "compact", "order": "bidirectional", "cutoff": "scree"})
    per_layer = CRITERIA.get("cmi")(_tiny_context({"cutoff": "scree"}))
    fractions = [1 - per_layer[layer.name].keep / layer.channels for layer in ctx.layers]
    seed = int(np.argmax(fractions))
    out = CRITERIA.get("cmi")(ctx)
    _check(out, ctx)
    names = [layer.name for layer in ctx.layers]
    assert out[names[seed]].info["seed_layer"] == names[seed]
    assert out[names[seed]].order == per_layer[names[seed]].order
    for i, name in enumerate(names):
        if i != seed:
            neighbour = names[i + 1] if i < seed else names[i - 1]
            assert out[name].info["conditioned_on"] == [neighbour]


def test_criterion_budget_and_permutation():
    ctx = _tiny_context({"budget": "flops=0.5"})
    out = CRITERIA.get("cmi")(ctx)
    _check(out, ctx)
    coupled, out_only, producer = layer_costs(ctx.layers, "flops")
    keep = [out[layer.name].keep for layer in ctx.layers]
    assert budget_cost(keep, [layer.channels for layer in ctx.layers], coupled, out_only, producer) <= 0.5
    assert all(out[layer.name].info["budget"] == "flops=0.5" for layer in ctx.layers)

    ctx = _tiny_context({"cutoff": "permutation", "permutations": 20})
    out = CRITERIA.get("cmi")(ctx)
    for layer in ctx.layers:
        r = out[layer.name]
        assert r.info["p_values"] is not None and r.keep == max(1, r.info["selected"])


@pytest.mark.parametrize("options", [
    {"formulation": "layerwise"}, {"order": "backward"}, {"cutoff": "elbow"}, {"alpha": 0}, {"alpha": "x"},
    {"gamma": -1}, {"permutations": 0}, {"permutations": 2.5}, {"eta": 1.5}, {"budget": "flops=1.5"},
    {"budget": "latency=3"}, {"cutoff": "ratio", "keep_ratio": 0}, {"typo": 1},
    {"kernel": "median"}, {"preserve": "logits"},
])
def test_bad_options_raise_user_error(options):
    with pytest.raises(UserError) as err:
        parse_options(options)
    assert "\n" not in str(err.value)


def test_ratio_cutoff_uses_the_runs_keep_ratio():
    ctx = _tiny_context({"cutoff": "ratio"})
    with pytest.raises(UserError, match="keep ratio"):
        cmi_mod.cmi_criterion(ctx)
    ctx.keep_ratio = 0.5
    out = cmi_mod.cmi_criterion(ctx)
    assert all(r.keep == round(0.5 * len(r.order)) or r.keep == max(1, int(0.5 * len(r.order))) for r in out.values())


def test_option_defaults():
    o = parse_options({})
    assert (o.formulation, o.order, o.cutoff, o.budget, o.alpha, o.gamma, o.permutations, o.eta, o.kernel,
            o.preserve) == ("per-layer", "forward", "ratio", None, 2.0, 5.0, 100, 0.05, "adaptive", "next")


def test_criterion_adaptive_kernel():
    ctx = _tiny_context({"kernel": "adaptive", "preserve": "labels", "cutoff": "knee"})
    out = CRITERIA.get("cmi")(ctx)
    _check(out, ctx)
    for layer in ctx.layers:
        info = out[layer.name].info
        assert info["kernel"] == "adaptive" and len(info["widths"]["channels"]) == layer.channels


def test_criterion_next_layer_target_differs_from_labels():
    out_next = CRITERIA.get("cmi")(_tiny_context({"kernel": "adaptive", "preserve": "next", "cutoff": "knee"}))
    ctx = _tiny_context({"kernel": "adaptive", "preserve": "labels", "cutoff": "knee"})
    out_labels = CRITERIA.get("cmi")(ctx)
    _check(out_next, ctx)
    assert any(out_next[layer.name].order != out_labels[layer.name].order for layer in ctx.layers)
