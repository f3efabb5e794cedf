"""MIPP: select_layer on constructed activations, the renyi bookkeeping against a from-scratch
reference, the permutation test, the output-to-input walk and the criterion end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import Tiny

import toolchain.ranking.mipp as mipp_mod
from toolchain.errors import UserError
from toolchain.info.renyi import gaussian_gram, joint_gram, mutual_information, paper_sigma
from toolchain.models import create_model
from toolchain.ranking import load_criteria
from toolchain.ranking.base import CRITERIA, RankContext
from toolchain.ranking.capture import capture_features
from toolchain.ranking.mipp import parse_options, permutation_count, select_layer
from toolchain.stages.prune import find_prunable_layers, prune_model

VARIANTS = [("renyi", "paper"), ("renyi", "median"), ("mlp", "median")]


@pytest.fixture(autouse=True)
def _one_thread():
    """The small batched ops here run many times faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------- constructed activations


def _case(seed=0, n=128, hw=4):
    """Channels: 0 constant, 1 a, 2 copy of b, 3 b, 4 zeros, 5 c, 6 copy of a, 7 a constant
    spatial pattern. The next layer (4 channels) is a nonlinear function of a, b and c only."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 3, generator=g)
    pat = torch.rand(3, hw, hw, generator=g) + 0.5
    maps = lat[:, :, None, None] * pat + 0.1 * torch.randn(n, 3, hw, hw, generator=g)
    a, b, c = maps[:, 0:1], maps[:, 1:2], maps[:, 2:3]
    ones = torch.ones(n, 1, hw, hw)
    x = torch.cat([0.5 * ones, a, b.clone(), b, 0 * ones, c, a.clone(), 2.0 * pat[:1, None].expand(n, 1, hw, hw)], 1)
    z = lat @ torch.randn(4, 3, generator=g).T
    x_next = torch.relu(z[:, :, None, None] * (torch.rand(4, hw, hw, generator=g) + 0.5)) \
        + torch.tanh(z[:, :1, None, None])
    return x, x_next


CONSTANT = {0, 4, 7}
GROUPS = {"a": {1, 6}, "b": {2, 3}, "c": {5}}
_SELECTIONS: dict = {}


def _select_case(seed, estimator, kernel):
    """select_layer on _case(seed), computed once per session (the mlp runs take a few seconds)."""
    key = (seed, estimator, kernel)
    if key not in _SELECTIONS:
        x, x_next = _case(seed)
        _SELECTIONS[key] = select_layer(x, x_next, estimator=estimator, kernel=kernel, seed=seed)
    return _SELECTIONS[key]


@pytest.mark.parametrize("estimator,kernel", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_constants_removed_and_the_used_channels_covered(estimator, kernel, seed):
    sel = _select_case(seed, estimator, kernel)
    kept = set(sel.kept)
    assert not kept & CONSTANT
    for name, group in GROUPS.items():
        assert kept & group, f"{name} lost: kept {sorted(kept)}"
    assert sel.kept == sorted(sel.kept) and sel.forced is None
    # the evidence decides: > 0 exactly for the kept channels; constants have a zero drop
    assert {ch for ch, e in enumerate(sel.evidence) if e > 0} == kept
    assert all(sel.drops[ch] == 0.0 for ch in CONSTANT)
    assert sorted(sel.visit_order) == list(range(8)) and set(sel.removed_order) == set(range(8)) - kept
    # constants carry no information about x_next: they are visited first
    assert set(sel.visit_order[:3]) == CONSTANT


@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_removes_a_copy_of_a_kept_channel(seed):
    sel = _select_case(seed, "mlp", "median")
    for group in (GROUPS["a"], GROUPS["b"]):
        assert len(set(sel.kept) & group) == 1, sel.kept  # one of the two copies goes
    assert sel.mlp["candidate_runs"] >= 8 and sel.mlp["pool"] == 2


def _copy_case(seed, n=256, hw=2):
    """Channels [a, b, c, copy of a, zeros, 0.5] of random 2x2 maps; x_next (4 channels) a fixed
    random nonlinear function of a, b and c only."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(n, 1, hw, hw, generator=g) for _ in range(3))
    ones = torch.ones(n, 1, hw, hw)
    x = torch.cat([a, b, c, a.clone(), 0 * ones, 0.5 * ones], 1)
    z = torch.cat([a, b, c], 1).reshape(n, -1) @ torch.randn(3 * hw * hw, 4 * hw * hw, generator=g)
    z = z / math.sqrt(3 * hw * hw)
    x_next = (torch.tanh(z) + 0.5 * torch.relu(z)).reshape(n, 4, hw, hw)
    return x, x_next


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_keeps_exactly_one_copy_of_an_informative_channel(seed):
    x, x_next = _copy_case(seed)
    sel = select_layer(x, x_next, estimator="mlp", seed=seed)
    kept = set(sel.kept)
    assert len(kept & {0, 3}) == 1, sel.kept  # one copy of a, not none and not both
    assert {1, 2} <= kept and not kept & {4, 5}, sel.kept
    assert {ch for ch, e in enumerate(sel.evidence) if e > 0} == kept and sel.forced is None


def test_constants_removed_even_when_nothing_is_informative():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.full((40, 2, 3, 3), 1.5), torch.randn(40, 3, 3, 3, generator=g)], 1)
    x_next = torch.randn(40, 10, generator=g)  # unrelated to x (logits-like, 2-D)
    for estimator in ("renyi", "mlp"):
        sel = select_layer(x, x_next, estimator=estimator, kernel="median", confidence=0.9)
        assert 0 not in sel.kept and 1 not in sel.kept


def test_all_constant_layer_keeps_one_channel():
    x = torch.ones(30, 4, 2, 2) * torch.arange(4.0).view(1, 4, 1, 1)
    x_next = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    for estimator in ("renyi", "mlp"):
        sel = select_layer(x, x_next, estimator=estimator)
        assert len(sel.kept) == 1 and sel.forced == sel.kept[0]
        assert all(e <= 0 for e in sel.evidence)


def test_unpacks_and_is_json():
    x, x_next = _case()
    kept, evidence = select_layer(x, x_next)
    assert isinstance(kept, list) and len(evidence) == x.shape[1]
    sel = select_layer(x.numpy(), x_next.reshape(x.shape[0], -1).numpy())  # numpy, 2-D x_next
    info = sel.to_info()
    json.dumps(info)
    assert info["kept"] == len(sel.kept) and info["estimator"] == "renyi" and info["permutations"] == 39


# ---------------------------------------------------------------- renyi bookkeeping and the test


def _ref_mi(x, x_next, channels, sigma, sigma_y, alpha):
    """I(X_channels; x_next) from scratch with toolchain.info.renyi (one Gram per channel)."""
    n = x.shape[0]
    gx = [gaussian_gram(x[:, ch].reshape(n, -1).double(), sigma) for ch in channels]
    gy = [gaussian_gram(x_next[:, ch].reshape(n, -1).double(), sigma_y) for ch in range(x_next.shape[1])]
    return float(mutual_information(joint_gram(*gx), joint_gram(*gy), alpha))


@pytest.mark.parametrize("alpha,kernel", [(2.0, "paper"), (1.01, "paper"), (2.0, "median")])
def test_leave_one_out_bookkeeping_matches_recomputation(alpha, kernel, monkeypatch):
    monkeypatch.setattr(mipp_mod, "_RESUM_EVERY", 2)  # exercise the periodic exact re-sum too
    g = torch.Generator().manual_seed(5)
    n = 36
    lat = torch.randn(n, 2, generator=g)
    x = torch.cat([lat[:, :1, None, None] + 0.3 * torch.randn(n, 2, 2, 2, generator=g),
                   torch.randn(n, 3, 2, 2, generator=g), lat[:, 1:, None, None].expand(n, 1, 2, 2)], 1)
    x_next = torch.relu(lat[:, :, None, None] + 0.2 * torch.randn(n, 2, 3, 3, generator=g))
    sel = select_layer(x, x_next, alpha=alpha, gamma=3.0, kernel=kernel, confidence=0.6)
    if kernel == "paper":
        sigma, sigma_y = paper_sigma(n, 4, 3.0), paper_sigma(n, 9, 3.0)
        assert sel.widths == {"channels": pytest.approx(sigma), "next": pytest.approx(sigma_y)}
    else:
        sigma, sigma_y = sel.widths["channels"], sel.widths["next"]
    ref = lambda chs: _ref_mi(x, x_next, chs, sigma, sigma_y, alpha)  # noqa: E731
    assert sel.mi_full == pytest.approx(ref(range(6)), abs=1e-7)
    assert sel.mi_kept == pytest.approx(ref(sel.kept), abs=1e-7)
    kept = list(range(6))
    for ch in sel.visit_order:  # every drop was taken against the kept set of its visit
        expect = ref(kept) - ref([k for k in kept if k != ch])
        assert sel.drops[ch] == pytest.approx(expect, abs=1e-7)
        if ch in sel.removed_order:
            kept.remove(ch)
    assert kept == sel.kept and 0 < len(sel.removed_order) < 6


def test_permutation_test_decisions_are_consistent():
    x, x_next = _case(2)
    g = torch.Generator().manual_seed(7)
    x = torch.cat([x, torch.randn(x.shape[0], 4, 4, 4, generator=g)], 1)  # 4 pure-noise channels
    conf = 0.9
    sel = select_layer(x, x_next, kernel="median", confidence=conf, seed=1)
    perms = permutation_count(conf)
    assert sel.permutations == perms == 19
    tested = [ch for ch, p in enumerate(sel.p_values) if p is not None]
    assert tested
    for ch in tested:
        drop, crit, p = sel.drops[ch], sel.critical[ch], sel.p_values[ch]
        assert sel.evidence[ch] == pytest.approx(drop - max(crit, mipp_mod.DROP_TOL))
        assert (p <= 1 - conf + 1e-12) == (drop > crit)  # the order statistic and the p-value agree
        assert (ch in sel.kept) == (sel.evidence[ch] > 0)
        assert p * (perms + 1) == pytest.approx(round(p * (perms + 1)))
    # the channels x_next depends on win every permutation; most noise channels lose
    for group in GROUPS.values():
        assert min(sel.p_values[ch] or 1 for ch in group) == pytest.approx(1 / (perms + 1))
    assert len(set(sel.kept) & {8, 9, 10, 11}) <= 1
    assert permutation_count(0.95) == 39 and permutation_count(0.99) == 199 and permutation_count(0.5) == 19


def test_select_layer_validates_input():
    x, x_next = _case()
    bad = [dict(estimator="ksg"), dict(confidence=1.0), dict(confidence=0), dict(confidence="high"),
           dict(alpha=0), dict(gamma=-1), dict(repeats=0), dict(estimator="mlp", repeats=1), dict(kernel="rbf"),
           dict(seed=-1)]
    for kwargs in bad:
        with pytest.raises(UserError):
            select_layer(x, x_next, **kwargs)
    with pytest.raises(UserError):
        select_layer(x, x_next[:-1])
    with pytest.raises(UserError):
        select_layer(x[:2], x_next[:2])
    with pytest.raises(UserError):
        select_layer(x.flatten(), x_next)
    with pytest.raises(UserError):
        select_layer(x * float("nan"), x_next)


# ---------------------------------------------------------------- the criterion


def _context(model, n=32, options=None, size=8, classes=3, seed=0):
    torch.manual_seed(seed)
    images = torch.randn(n, 3, size, size)
    layers = find_prunable_layers(model.eval(), images[:2])
    return RankContext(model=model, layers=layers, images=images, labels=torch.arange(n) % classes,
                       num_classes=classes, device=torch.device("cpu"), options=dict(options or {}), seed=seed)


def test_registered_and_walks_from_the_output_to_the_input(monkeypatch):
    load_criteria()
    assert CRITERIA.get("mipp") is mipp_mod.mipp_criterion
    torch.manual_seed(1)
    model = Tiny().eval()
    ctx = _context(model, options={"mipp_kernel": "median"})
    calls = []
    real = mipp_mod.select_layer

    def spy(x, x_next, **kw):
        sel = real(x, x_next, **kw)
        calls.append((x.clone(), x_next.clone(), list(sel.kept)))
        return sel

    monkeypatch.setattr(mipp_mod, "select_layer", spy)
    out = CRITERIA.get("mipp")(ctx)
    names = [layer.name for layer in ctx.layers]
    feats = capture_features(model, ctx.layers, ctx.images, range(3))
    # processed last -> first, each layer's own maps
    assert len(calls) == 3
    for (x, _, _), i in zip(calls, (2, 1, 0)):
        assert torch.equal(x, feats[i])
    with torch.no_grad():
        assert torch.allclose(calls[0][1], model(ctx.images))  # the last layer preserves MI with the logits
    # every other layer is judged against the next layer restricted to the channels kept there
    for prev, cur in zip(calls, calls[1:]):
        assert torch.equal(cur[1], prev[0][:, prev[2]])
    for pos, name in enumerate(reversed(names)):
        info = out[name].info
        assert info["position"] == pos and info["processing_order"] == list(reversed(names))
        assert info["next"] == ("logits" if pos == 0 else names[len(names) - pos])
    assert out[names[0]].info["next_shape"][0] == out[names[1]].keep
    assert out[names[1]].info["next_shape"][0] == out[names[2]].keep


def test_the_layer_before_a_heavily_pruned_layer_sees_only_its_kept_channels(monkeypatch):
    model = Tiny().eval()
    ctx = _context(model)
    shapes = {}
    real = mipp_mod.select_layer

    def fake(x, x_next, **kw):
        shapes[x.shape[1]] = tuple(x_next.shape)
        sel = real(x, x_next, **kw)
        if x.shape[1] == 8:  # the middle layer: keep only channels 2 and 5
            sel.kept, sel.evidence = [2, 5], [1.0 if ch in (2, 5) else -1.0 for ch in range(8)]
        return sel

    monkeypatch.setattr(mipp_mod, "select_layer", fake)
    out = CRITERIA.get("mipp")(ctx)
    assert shapes[6] == (32, 2, 4, 4)  # the first layer's x_next: the middle layer's 2 kept maps
    assert out["features.4"].keep == 2 and out["features.4"].order[:2] == [2, 5]


def _check_rankings(out, layers):
    for layer in layers:
        r = out[layer.name]
        assert sorted(r.order) == list(range(layer.channels))
        assert len(r.scores) == layer.channels and all(math.isfinite(s) for s in r.scores)
        assert 1 <= r.keep <= layer.channels
        kept = set(r.order[:r.keep])
        assert kept == set(r.info["kept_channels"])
        assert all(r.scores[ch] > 0 for ch in kept if ch != r.info["forced"])
        assert all(r.scores[ch] <= 0 for ch in set(r.order[r.keep:]))
        for key in ("estimator", "confidence", "evidence", "kept", "visit_order", "seconds", "at_init"):
            assert key in r.info
        assert r.info["kept"] == r.keep
    json.dumps({k: v.__dict__ for k, v in out.items()})


def test_criterion_end_to_end_on_vgg11():
    torch.manual_seed(0)
    model = create_model("vgg11_bn", num_classes=10).eval()
    ctx = _context(model, n=20, size=32, classes=10)
    out = CRITERIA.get("mipp")(ctx)
    assert set(out) == {layer.name for layer in ctx.layers} and len(out) == 8
    _check_rankings(out, ctx.layers)
    assert all(r.info["at_init"] is False and r.info["kernel"] == "median" for r in out.values())
    kept = {name: sorted(r.order[:r.keep]) for name, r in out.items()}
    pruned, _ = prune_model(model, ctx.images[:2], kept)
    assert pruned(ctx.images[:2]).shape == (2, 10)


def test_criterion_at_init_estimates_bn_statistics_on_a_copy():
    torch.manual_seed(2)
    model = Tiny().eval()  # fresh: running statistics 0 / 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _context(model, options={"at_init": True, "confidence": 0.5, "mipp_kernel": "paper"})
    calls = []
    real = mipp_mod.select_layer

    def spy(x, x_next, **kw):
        calls.append(x.clone())
        return real(x, x_next, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(mipp_mod, "select_layer", spy)
    try:
        out = CRITERIA.get("mipp")(ctx)
    finally:
        mp.undo()
    _check_rankings(out, ctx.layers)
    assert all(r.info["at_init"] is True and r.info["kernel"] == "paper" for r in out.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    # the maps it judged were normalised with statistics of the samples (the fresh ones are 0 / 1)
    with torch.no_grad():
        y = model.features[0](ctx.images)
        mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), keepdim=True)  # BN's running (unbiased) var
        expect = torch.relu((y - mean) / torch.sqrt(var + model.features[1].eps))
        assert not torch.allclose(torch.relu(model.features[1](y)), expect, atol=1e-2)
    assert torch.allclose(calls[-1], expect, atol=1e-4)


def test_criterion_mlp_layers_fall_back_to_renyi():
    model = Tiny().eval()
    ctx = _context(model, options={"mipp_estimator": "mlp", "mlp_layers": "features.8", "repeats": 3})
    out = CRITERIA.get("mipp")(ctx)
    _check_rankings(out, ctx.layers)
    assert out["features.8"].info["estimator"] == "mlp" and not out["features.8"].info["fallback"]
    assert out["features.8"].info["mlp"]["repeats"] == 3
    for name in ("features.0", "features.4"):
        assert out[name].info["estimator"] == "renyi" and out[name].info["fallback"]
        assert out[name].info["estimator_requested"] == "mlp"


@pytest.mark.parametrize("options", [
    {"formulation": "full"}, {"mipp_estimator": "ksg"}, {"confidence": 1.5}, {"confidence": "x"},
    {"repeats": 0}, {"repeats": 2.5}, {"mipp_estimator": "mlp", "repeats": 1}, {"at_init": "yes"},
    {"mlp_layers": ["features.0"]}, {"mipp_estimator": "mlp", "mlp_layers": ["features.99"]},
    {"mipp_estimator": "mlp", "mlp_layers": 3}, {"mipp_kernel": "rbf"}, {"alpha": -1}, {"gamma": 0},
])
def test_bad_options_raise_user_error(options):
    with pytest.raises(UserError) as e:
        parse_options(options, ["features.0", "features.4"])
    assert "\n" not in str(e.value)


def test_option_defaults():
    o = parse_options({}, [])
    assert (o.estimator, o.confidence, o.alpha, o.gamma, o.repeats, o.at_init, o.mlp_layers) == \
        ("renyi", 0.95, 2.0, 5.0, 5, False, None)
    o = parse_options({"mipp_estimator": "mlp", "mlp_layers": "a, b"}, ["a", "b"])
    assert o.mlp_layers == ("a", "b")
