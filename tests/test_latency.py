"""Latency tables and the latency-budget knapsack (toolchain/latency.py, toolchain/knapsack.py)."""

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.backends import BACKENDS
from toolchain.backends.base import Backend
from toolchain.cost import layer_flops
from toolchain.errors import UserError
from toolchain.knapsack import allocate_latency, solve_mckp
from toolchain.latency import (
    BackendTimer,
    ConvSpec,
    LatencyTable,
    RooflineTimer,
    TorchTimer,
    candidate_counts,
    conv_terms,
    needed_specs,
)
from toolchain.latency_store import import_table, imported_table
from toolchain.models import create_model
from toolchain.ranking.cutoffs import parse_budget
from toolchain.stages.prune import find_prunable_layers, prune_model


@pytest.mark.parametrize("conv, hw", [
    (nn.Conv2d(8, 16, 3, padding=1), (9, 11)),
    (nn.Conv2d(8, 16, 3, stride=2, padding=1), (16, 16)),
    (nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12), (10, 10)),  # depthwise
    (nn.Conv2d(8, 12, (1, 3), padding=(0, 1), groups=4), (7, 5)),
])
def test_a_conv_spec_has_the_shape_and_flops_of_the_conv(conv, hw):
    x = torch.zeros(1, conv.in_channels, *hw)
    y = conv(x)
    terms = conv_terms(nn.Sequential(conv), (conv.in_channels, *hw), [])
    spec = terms[0].dense
    assert ConvSpec.from_key(spec.key()) == spec
    assert spec.out_size() == tuple(y.shape[-2:])
    assert spec.flops() == layer_flops(conv, y)


@pytest.mark.parametrize("name, size", [("vgg11_bn_half", 32), ("torchvision:mobilenet_v2", 64)])
def test_the_terms_give_the_conv_shapes_of_the_pruned_model(name, size):
    """What the table is read at (``LatencyTerm.spec`` at kept counts) is what the surgery builds."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    example = torch.zeros(2, 3, size, size)
    layers = find_prunable_layers(model, example)
    rng = random.Random(0)
    kept = {layer.name: sorted(rng.sample(range(layer.channels), max(1, layer.channels // 3))) for layer in layers}
    pruned, _ = prune_model(model, example, kept)
    counts = {n: len(k) for n, k in kept.items()}
    predicted = {t.module: t.spec(counts) for t in conv_terms(model, (3, size, size), layers)}
    actual = {t.module: t.dense for t in conv_terms(pruned, (3, size, size), [])}
    assert predicted == actual
    assert any(s.groups > 1 for s in actual.values()) == (name != "vgg11_bn_half")


def test_the_roofline_entries_grow_with_the_channels():
    timer = RooflineTimer(peak_ops_per_s=1e12, bandwidth_bytes_per_s=5e10, bytes_per_element=2)
    for c_in, h in ((16, 32), (256, 4)):
        ms = [timer(ConvSpec(c_in, c, h, h)) for c in range(8, 264, 8)]
        assert all(b >= a for a, b in zip(ms, ms[1:]))
        assert ms[-1] > ms[0]
        ms_in = [timer(ConvSpec(c, 64, h, h)) for c in range(8, 264, 8)]
        assert all(b >= a for a, b in zip(ms_in, ms_in[1:])) and ms_in[-1] > ms_in[0]


def test_a_measured_entry_grows_with_the_work():
    timer = BackendTimer("onnxruntime", threads=1, runs=20)
    small, big = timer(ConvSpec(8, 8, 16, 16)), timer(ConvSpec(64, 256, 32, 32))
    assert small > 0
    assert big > 4 * small  # 640x the FLOPs


def test_the_torch_timer_times_a_conv_and_refuses_int8():
    timer = TorchTimer("cpu", "fp32", runs=5, warmup=1)
    small, big = timer(ConvSpec(4, 4, 8, 8)), timer(ConvSpec(64, 256, 32, 32))
    assert 0 < small < big
    with pytest.raises(UserError, match="fp32 or fp16"):
        TorchTimer("cpu", "int8")(ConvSpec(4, 4, 8, 8))


class _Recording(Backend):
    """A recording fake: it keeps the model file each timing loads (the GPU backends cannot run here)."""

    name = "recording-fake"
    seen: list = []

    @classmethod
    def available(cls):
        return True, ""

    def load(self, model_path, threads):
        import onnx

        self.model = onnx.load(model_path)
        _Recording.seen.append((self.model, threads))

    def infer(self, batch):
        _Recording.seen.append(batch.shape)
        return np.zeros(1, dtype=np.float32)


def test_a_backend_timer_gives_its_backend_the_conv_it_was_asked_for(monkeypatch):
    monkeypatch.setitem(BACKENDS._items, "recording-fake", _Recording)
    _Recording.seen = []
    spec = ConvSpec(12, 24, 10, 7, (3, 1), (2, 1), (1, 0), (1, 1), 3)
    ms = BackendTimer("recording-fake", threads=3, batch=2, runs=4)(spec)
    model, threads = _Recording.seen[0]
    assert threads == 3 and math.isfinite(ms) and ms >= 0
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}
    assert attrs["kernel_shape"] == [3, 1] and attrs["strides"] == [2, 1] and attrs["pads"] == [1, 0, 1, 0]
    assert attrs["group"] == 3
    weight = next(t for t in model.graph.initializer if t.name == "w")
    assert list(weight.dims) == [24, 4, 3, 1]
    assert all(shape == (2, 12, 10, 7) for shape in _Recording.seen[1:])


def test_a_table_round_trips_and_a_missing_shape_is_one_clear_error(tmp_path):
    spec = ConvSpec(8, 16, 4, 4)
    table = LatencyTable("x86-cpu", "onnxruntime", "fp32", 1, 1, "measured", {spec.key(): 0.25}, 0.1, 0.5, "host")
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back == table
    with pytest.raises(UserError, match="no entry for conv 8-32"):
        back.ms(ConvSpec(8, 32, 4, 4))
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "target": "x"}))
    with pytest.raises(UserError, match="malformed"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="kind"):
        LatencyTable("x", "b", "fp32", 1, 1, "guessed")


def test_only_device_tables_are_imported_and_builds_find_them(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_EDGE_HOME", str(tmp_path / "home"))
    spec = ConvSpec(8, 16, 4, 4).key()
    LatencyTable("jetson-orin-nano-8gb", "roofline", "int8", 1, 6, "estimate", {spec: 1.0}).save(tmp_path / "e.json")
    with pytest.raises(UserError, match="only tables measured on the device"):
        import_table(tmp_path / "e.json")
    assert imported_table("jetson-orin-nano-8gb", "int8", 1) is None
    LatencyTable("jetson-orin-nano-8gb", "tensorrt", "int8", 1, 6, "device", {spec: 0.5}).save(tmp_path / "d.json")
    stored = import_table(tmp_path / "d.json")
    assert imported_table("jetson-orin-nano-8gb", "int8", 1) == stored
    assert LatencyTable.load(stored).entries == {spec: 0.5}


def test_a_device_table_wins_over_the_estimate_in_a_build(tmp_path, monkeypatch):
    from toolchain.config import build_config
    from toolchain.pipeline import preflight, stage_inputs

    monkeypatch.setenv("BUILD_EDGE_HOME", str(tmp_path / "home"))
    cfg = build_config({}, {"dataset": "digits", "model": "vgg11_bn_half", "budget": "latency=0.5x",
                            "target": "jetson"})
    before = stage_inputs(cfg, preflight(cfg))["latency"]
    assert before.backend == "roofline" and before.device_table is None
    LatencyTable("jetson-orin-nano-8gb", "tensorrt", "int8", 1, 6, "device", {"8-16-4x4-k3x3-s1x1-p1x1-d1x1-g1": 1.0}
                 ).save(tmp_path / "d.json")
    import_table(tmp_path / "d.json")
    after = stage_inputs(cfg, preflight(cfg))["latency"]
    assert after.device_table and after.device_table_sha256
    with_source = build_config({}, {**cfg.to_dict(), "latency_source": "estimate"})
    assert stage_inputs(with_source, preflight(with_source))["latency"].device_table is None


@pytest.mark.parametrize("text, kind, fraction, ms", [
    ("latency=0.5x", "latency", 0.5, None), ("latency = 12ms", "latency", None, 12.0),
    ("latency=2.5ms", "latency", None, 2.5), ("flops=0.4", "flops", 0.4, None),
])
def test_latency_budgets_parse(text, kind, fraction, ms):
    b = parse_budget(text)
    assert (b.kind, b.fraction, b.ms) == (kind, fraction, ms)
    assert parse_budget(str(b)) == b


@pytest.mark.parametrize("text", ["latency=0.5", "latency=1.5x", "latency=0ms", "flops=0.4x", "flops=0.4ms",
                                  "latency=-1ms", "speed=2x"])
def test_bad_latency_budgets_are_user_errors(text):
    with pytest.raises(UserError):
        parse_budget(text)


def test_candidate_counts_are_multiples_of_the_step_with_the_whole_layer():
    assert candidate_counts(64, 4) == [16, 32, 48, 64]
    assert candidate_counts(100, 16, step=8) == [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100]
    assert candidate_counts(6, 16, step=8) == [6]  # narrower than a step: whole
    assert all(k % 8 == 0 for k in candidate_counts(512, 16, step=8, floor=8)[:-1])


def test_the_round_to_default_is_8_for_a_latency_budget_on_tensor_cores_and_x86_onnxruntime():
    from toolchain.pipeline import resolve_round_to
    from toolchain.targets import load_target

    jetson, host, pi = load_target("jetson"), load_target("x86-cpu"), load_target("raspberry-pi-5")
    assert resolve_round_to(None, jetson, True) == 8
    assert resolve_round_to(None, jetson, False) == 1
    assert resolve_round_to(None, host, True) == 8  # NCHWc blocks of 8 (AVX2)
    assert resolve_round_to(None, host, False) == 1
    assert resolve_round_to(None, pi, True) == 1
    assert resolve_round_to(4, jetson, True) == 4


# -- the knapsack ---------------------------------------------------------------------------------------


def _brute(values, costs, capacity):
    best = None
    for pick in itertools.product(*(range(len(v)) for v in values)):
        c = sum(costs[i][j] for i, j in enumerate(pick))
        v = sum(values[i][j] for i, j in enumerate(pick))
        if c <= capacity and (best is None or v < best):
            best = v
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_knapsack_is_optimal_on_brute_forced_cases(seed):
    rng = random.Random(seed)
    groups = rng.randint(2, 5)
    values = [[rng.uniform(0, 10) for _ in range(rng.randint(1, 4))] for _ in range(groups)]
    costs = [[rng.randint(0, 12) for _ in v] for v in values]
    capacity = rng.randint(0, 30)
    pick = solve_mckp(values, costs, capacity, resolution=max(capacity, 1))
    best = _brute(values, costs, capacity)
    if best is None:
        assert pick is None
    else:
        assert sum(costs[i][j] for i, j in enumerate(pick)) <= capacity
        assert sum(values[i][j] for i, j in enumerate(pick)) == pytest.approx(best)


def test_the_knapsack_answer_fits_real_costs_after_rounding():
    rng = np.random.default_rng(0)
    values = [list(rng.uniform(0, 1, 5)) for _ in range(6)]
    costs = [list(rng.uniform(0, 1, 5)) for _ in range(6)]
    cheapest = sum(min(c) for c in costs)
    for capacity, resolution in ((cheapest * 1.01, 5000), (cheapest * 1.5, 50), (sum(max(c) for c in costs), 50)):
        pick = solve_mckp(values, costs, capacity, resolution=resolution)
        assert sum(costs[i][j] for i, j in enumerate(pick)) <= capacity
        if capacity >= sum(max(c) for c in costs):  # everything fits: the best of each group
            assert pick == [int(np.argmin(v)) for v in values]
    assert solve_mckp([[1.0]], [[2.0]], 1.0) is None


def _chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    layers = find_prunable_layers(model, torch.zeros(2, 3, 16, 16))
    terms = conv_terms(model, (3, 16, 16), layers)
    levels = 4
    cands = {layer.name: candidate_counts(layer.channels, levels) for layer in layers}
    timer = RooflineTimer(2e9, 1e9, 4)
    table = LatencyTable("t", "roofline", "fp32", 1, 1, "estimate",
                         {s.key(): timer(s) for s in needed_specs(terms, cands)}, overhead_ms=0.01, levels=levels)
    rng = random.Random(1)
    sens = {layer.name: [[1.0, 0.0], *[[f, rng.uniform(0.1, 1) * (1 - f) ** 2] for f in (0.75, 0.5, 0.25)]]
            for layer in layers}
    return layers, terms, table, cands, sens


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_the_latency_allocation_meets_the_budget_and_is_optimal_on_a_small_net(fraction):
    from toolchain.allocation import sensitivity_curve

    layers, terms, table, cands, sens = _chain()
    dense_ms = table.predict(terms, {})
    budget = fraction * dense_ms
    counts, info = allocate_latency(layers, sens, table, terms, budget, levels=4)
    assert table.predict(terms, counts) <= budget + 1e-12
    assert info["predicted_ms"] == pytest.approx(table.predict(terms, counts))
    curves = {layer.name: sensitivity_curve(sens[layer.name], layer.channels) for layer in layers}
    names = [layer.name for layer in layers]
    best = min(sum(curves[n][k] for n, k in zip(names, ks))
               for ks in itertools.product(*(cands[n] for n in names))
               if table.predict(terms, dict(zip(names, ks))) <= budget)
    assert info["predicted_damage"] == pytest.approx(best)


def test_a_latency_budget_below_what_the_sensitivity_covers_is_a_user_error():
    layers, terms, table, _, sens = _chain()
    with pytest.raises(UserError, match="cannot be met"):
        allocate_latency(layers, sens, table, terms, 0.02 * table.predict(terms, {}), levels=4)


def test_couplings_with_a_cycle_fall_back_to_iterated_knapsacks_and_meet_the_budget():
    """A ResNet's downsampling block ties three groups in a cycle (shortcut, conv1, conv2): no tree DP there."""
    from toolchain.knapsack import forest_edges

    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=10).eval()
    layers = find_prunable_layers(model, torch.zeros(2, 3, 32, 32))
    terms = conv_terms(model, (3, 32, 32), layers)
    assert forest_edges([layer.name for layer in layers], terms) is None
    levels = 3
    cands = {layer.name: candidate_counts(layer.channels, levels) for layer in layers}
    timer = RooflineTimer(1e11, 1e10, 4)
    table = LatencyTable("t", "roofline", "fp32", 1, 1, "estimate",
                         {s.key(): timer(s) for s in needed_specs(terms, cands)}, levels=levels)
    sens = {layer.name: [[1.0, 0.0], [0.5, 0.1 * (i + 1)], [0.25, 0.5 * (i + 1)]] for i, layer in enumerate(layers)}
    budget = 0.6 * table.predict(terms, {})
    counts, info = allocate_latency(layers, sens, table, terms, budget, levels=levels)
    assert info["solver"] == "iterated-mckp"
    assert table.predict(terms, counts) <= budget
    assert table.predict(terms, counts) > 0.9 * budget  # the slack is given back


def test_a_build_with_a_latency_budget_reports_predicted_against_measured(tmp_path, capsys, monkeypatch):
    """End to end on the host: the table is measured (x86-cpu), the bundle holds it, and the manifest and report
    put the prediction beside the bench stage's measurement; a second build with another budget reuses the table."""
    from tests.test_cli import TINY, _run_cli

    monkeypatch.setenv("BUILD_EDGE_HOME", str(tmp_path / "home"))
    args = [*TINY, "--out", str(tmp_path), "--criterion", "l1", "--compensation", "none", "--target", "x86-cpu",
            "--budget", "latency=0.75x", "--latency-levels", "2", "--finetune-epochs", "0", "--bench-runs", "5",
            "--calibration-samples", "32", "--opset", "17"]
    code, _, err = _run_cli([*args, "--run-name", "lat"], capsys)
    assert code == 0, err
    bundle = tmp_path / "lat"
    table = LatencyTable.load(bundle / "latency_table.json")
    assert table.kind == "measured" and table.backend == "onnxruntime" and table.levels == 2
    lb = json.loads((bundle / "manifest.json").read_text())["metrics"]["latency_budget"]
    assert lb["budget"] == "latency=0.75x" and lb["table"] == "measured"
    assert lb["budget_ms"] == pytest.approx(0.75 * table.dense_ms)
    # the table's budget is aimed by what the pruned model measures here; the table's answer keeps within its aim
    assert lb["rounds"] and lb["rounds"][0]["table_budget_ms"] == pytest.approx(lb["budget_ms"])
    assert 0 < lb["predicted_ms"] <= lb["table_budget_ms"] + 1e-9
    assert all(r["measured_ms"] > 0 for r in lb["rounds"])
    assert lb["measured_ms"] > 0 and lb["measured_dense_ms"] > 0
    report = (bundle / "report.md").read_text()
    assert "## Latency budget" in report and f"{lb['predicted_ms']:.3f}" in report

    # another budget on the same target reuses the cached table: nothing is timed again, the bundle holds the same
    import toolchain.stages.latency as latency_stage

    def measure_again(*_a, **_k):
        raise AssertionError("the latency table was measured again")

    monkeypatch.setattr(latency_stage, "_measure", measure_again)
    # a looser budget than the first, which was met: 0.6x could not be on an AMD EPYC host (its smallest widths
    # measure more than 0.6x of the dense model there), and this checks the cache, not the allocation
    code, _, err = _run_cli([*args[:args.index("--budget") + 1], "latency=0.8x",
                             *args[args.index("--budget") + 2:], "--run-name", "lat2"], capsys)
    assert code == 0, err
    again = LatencyTable.load(tmp_path / "lat2" / "latency_table.json")
    assert again.entries == table.entries and again.dense_ms == table.dense_ms
    lb2 = json.loads((tmp_path / "lat2" / "manifest.json").read_text())["metrics"]["latency_budget"]
    assert lb2["budget_ms"] == pytest.approx(0.8 * table.dense_ms)


def test_the_budget_is_aimed_by_what_the_pruned_model_measures():
    """A table that predicts 30% too fast: the table's budget is lowered until the measurement meets the budget."""
    from toolchain.allocation import meet_measured

    def solve(target_ms):  # a model whose predicted latency is the target it was given
        return {"x": int(target_ms * 10)}, {"predicted_ms": target_ms}

    def measure(counts):
        return counts["x"] / 10 * 1.3

    counts, info = meet_measured(solve, measure, 10.0)
    assert abs(info["measured_ms"] / 10.0 - 1) <= 0.03
    assert info["rounds"][0] == {"table_budget_ms": 10.0, "predicted_ms": 10.0, "measured_ms": 13.0}
    assert info["table_budget_ms"] == pytest.approx(10 / 1.3, rel=0.02)


def test_the_weight_stream_rate_makes_the_dense_prediction_its_measurement():
    from toolchain.latency import fit_weight_stream, weight_bytes

    heavy, light = ConvSpec(512, 512, 2, 2), ConvSpec(16, 16, 32, 32)  # 9.4 MB of weights, and 9 KB
    table = LatencyTable("x86-cpu", "onnxruntime", "fp32", 1, 1, "measured", {heavy.key(): 0.5, light.key(): 0.8})
    fit_weight_stream(table, [heavy, light], 3.0)
    # the light conv keeps its entry; the heavy one streams its weights in the remaining 2.2 ms
    assert table.predict([], {}) + table.ms(heavy) + table.ms(light) == pytest.approx(3.0, rel=1e-6)
    assert table.weight_gbs == pytest.approx(weight_bytes(heavy) / 2.2e6, rel=1e-6)
    assert table.ms(light) == 0.8
    fit_weight_stream(table, [heavy, light], 1.0)  # the entries alone exceed the measurement: no stream
    assert table.weight_gbs is None and table.overhead_ms == 0.0


def test_a_discontinuous_measurement_is_bracketed_and_bisected():
    """Measured latency that jumps with the widths (kernels that change): once one aim measured under the budget
    and one over, the aim is bisected between them."""
    from toolchain.allocation import meet_measured

    def solve(target_ms):
        return {"x": target_ms}, {"predicted_ms": target_ms}

    def measure(counts):  # 1.2x the prediction above 8 ms, 0.8x below
        return counts["x"] * (1.2 if counts["x"] > 8 else 0.8)

    counts, info = meet_measured(solve, measure, 9.0, rounds=8)
    aims = [r["table_budget_ms"] for r in info["rounds"]]
    assert aims[:4] == pytest.approx([9.0, 7.5, 8.25, 7.875])  # 9 over, 7.5 under, then halves of the bracket
    assert len(aims) == 8 and all(7.875 <= a <= 8.25 for a in aims[3:])
    assert info["measured_ms"] == pytest.approx(max(r["measured_ms"] for r in info["rounds"] if r["measured_ms"] < 9))
