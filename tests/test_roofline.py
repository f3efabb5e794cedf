"""Roofline estimate: hand-computable layers, precisions, batch, ONNX vs torch, dense vs pruned."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

from toolchain.errors import UserError
from toolchain.roofline import compare, estimate
from toolchain.targets import CpuSpec, load_target


def cpu_target(fp32_tflops=1e-3, int8_tops=4e-3, fp16_tflops=2e-3, bandwidth_gbs=10.0):
    """An ONNX Runtime CPU profile with round numbers (1 GFLOPS fp32, 10 GB/s)."""
    base = load_target("x86-cpu")
    return dataclasses.replace(
        base,
        name="test-cpu",
        cpu=CpuSpec(
            model="test", cores=1, fp32_tflops=fp32_tflops, fp16_tflops=fp16_tflops, int8_tops=int8_tops
        ),
        memory_bandwidth_gbs=bandwidth_gbs,
        supports_fp16=True,
        supports_int8=True,
    )


def test_single_conv_by_hand():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    target = cpu_target()
    r = estimate(conv, target, "fp32", batch=1, input_size=(3, 8, 8))
    (layer,) = r.layers
    flops = 2 * 8 * 8 * 8 * 3 * 3 * 3
    nbytes = (3 * 8 * 8 + 8 * 8 * 8 + 8 * 3 * 3 * 3 + 8) * 4
    assert layer.flops == flops and layer.bytes == nbytes
    assert layer.t_compute == pytest.approx(flops / 1e9)  # 1 GFLOP/s
    assert layer.t_memory == pytest.approx(nbytes / 10e9)  # 10 GB/s
    assert layer.latency == pytest.approx(max(flops / 1e9, nbytes / 10e9))
    assert layer.bound == "compute"
    assert r.total_latency_s == pytest.approx(layer.latency)
    assert r.kind == "estimate" and r.device == "cpu"

    # same layer, a much faster compute unit: now memory bound
    fast = cpu_target(fp32_tflops=1.0)
    (layer,) = estimate(conv, fast, "fp32", 1, (3, 8, 8)).layers
    assert layer.bound == "memory" and layer.latency == pytest.approx(nbytes / 10e9)


@pytest.mark.parametrize(("precision", "bpe", "peak"), [("fp32", 4, 1e9), ("fp16", 2, 2e9), ("int8", 1, 4e9)])
def test_precision_sets_bytes_and_peak(precision, bpe, peak):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    (layer,) = estimate(conv, cpu_target(), precision, 1, (3, 8, 8)).layers
    assert layer.bytes == (3 * 64 + 8 * 64 + 8 * 27 + 8) * bpe
    assert layer.t_compute == pytest.approx(2 * 8 * 64 * 27 / peak)


def test_batch_scales_activations_not_weights():
    lin = nn.Linear(16, 10)
    (layer,) = estimate(lin, cpu_target(), "fp32", batch=4, input_size=(16,)).layers
    assert layer.flops == 2 * 4 * 16 * 10
    assert layer.bytes == (4 * 16 + 4 * 10 + 16 * 10 + 10) * 4


def test_tensorrt_target_uses_gpu_peak():
    base = load_target("jetson")
    gpu = dataclasses.replace(base.gpu, fp32_tflops=2.0, fp16_tflops=8.0, int8_tops=16.0)
    t = dataclasses.replace(base, gpu=gpu, memory_bandwidth_gbs=100.0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    r = estimate(conv, t, "fp16", 1, (16, 32, 32))
    assert r.device == "gpu" and r.peak_ops_per_s == 8e12
    assert r.layers[0].t_compute == pytest.approx(2 * 16 * 32 * 32 * 16 * 9 / 8e12)
    with pytest.raises(UserError, match="no int8 peak"):
        estimate(conv, load_target("jetson-nano"), "int8", 1, (16, 32, 32))
    with pytest.raises(UserError, match="unknown precision"):
        estimate(conv, t, "bf16", 1, (16, 32, 32))


def small_cnn(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2 * width, 10),
    ).eval()  # fmt: skip


def test_grouped_conv_and_pool_layers():
    r = estimate(small_cnn(16), cpu_target(), "fp32", 2, (3, 32, 32))
    ops = [(ly.name, ly.op) for ly in r.layers]
    assert ops == [
        ("0", "Conv2d"),
        ("2", "MaxPool2d"),
        ("3", "Conv2d"),
        ("5", "AdaptiveAvgPool2d"),
        ("7", "Linear"),
    ]
    conv2 = r.layers[2]
    assert conv2.flops == 2 * (2 * 32 * 16 * 16) * (16 // 2) * 9  # groups halve the inputs per output
    pool = r.layers[1]
    assert (
        pool.flops == 0 and pool.bound == "memory" and pool.bytes == (2 * 16 * 32 * 32 + 2 * 16 * 16 * 16) * 4
    )


def test_onnx_path_matches_torch_path(tmp_path):
    model = small_cnn(8)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    target = cpu_target()
    t = estimate(model, target, "fp32", 3, (3, 32, 32))
    o = estimate(str(path), target, "fp32", 3, (3, 32, 32))
    assert o.source == "onnx" and t.source == "torch"
    assert [ly.op for ly in o.layers] == ["Conv", "MaxPool", "Conv", "GlobalAveragePool", "Gemm"]
    assert [ly.flops for ly in o.layers] == [ly.flops for ly in t.layers]
    assert [ly.bytes for ly in o.layers] == [ly.bytes for ly in t.layers]
    assert o.total_latency_s == pytest.approx(t.total_latency_s)


def test_dense_vs_pruned_and_json(tmp_path):
    target = load_target("jetson")
    cmp = compare(small_cnn(32), small_cnn(16), target, "int8", 1, (3, 32, 32))
    assert cmp.pruned.total_flops < cmp.dense.total_flops
    assert cmp.speedup == pytest.approx(cmp.dense.total_latency_s / cmp.pruned.total_latency_s)
    assert cmp.speedup > 1
    data = json.loads(cmp.to_json())
    assert data["kind"] == "estimate" and data["dense"]["kind"] == "estimate"
    assert [row["name"] for row in data["layers"]] == ["0", "2", "3", "5", "7"]
    single = json.loads(cmp.dense.to_json())
    assert single["total_latency_s"] == pytest.approx(sum(ly["latency"] for ly in single["layers"]))
    assert set(single["layers"][0]) >= {"name", "flops", "bytes", "t_compute", "t_memory", "bound", "latency"}
    table = cmp.dense.format_table()
    assert "estimate" in table and "latency us (est.)" in table


def test_model_left_in_training_mode_is_restored_and_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    estimate(model, cpu_target(), "fp32", 2, (3, 8, 8))
    assert model.training and torch.equal(model[1].running_mean, before)
