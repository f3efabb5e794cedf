"""Benchmark backends: a real ONNX model through ONNX Runtime in a child process, memory budgets,
crash handling, and the CUDA backend's availability report."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.backends import BACKENDS, available_backends, benchmark, make_input
from toolchain.backends import base as backends_base
from toolchain.backends.torch_cuda import resolve_factory
from toolchain.errors import UserError

INPUT = (3, 32, 32)


def export_onnx(model: nn.Module, path, input_shape=INPUT) -> None:
    # torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript; the TorchScript
    # exporter (dynamo=False) still works and needs nothing else.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, *input_shape),), str(path), dynamo=False, input_names=["input"],
            output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_cnn()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~100 MB of weights: Flatten + Linear(3072, 8192)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8192)).eval()
    path = tmp_path_factory.mktemp("onnx") / "big.onnx"
    export_onnx(model, path)
    return model, path


def test_onnxruntime_benchmark_times_and_outputs(tiny):
    model, path = tiny
    runs, warmup = 40, 3
    r = benchmark("onnxruntime", path, [1, 4], threads=1, warmup=warmup, runs=runs, seed=7)
    assert r.status == "ok" and r.fits is True and r.reason is None, r.stderr_tail
    assert r.kind == "measured" and r.threads == 1 and r.threads_used == 1
    assert r.versions["onnxruntime"] and r.device and r.input_dtype == "float32"
    assert [b.batch_size for b in r.batches] == [1, 4]
    for b in r.batches:
        times = np.array(b.times_ms)
        assert b.runs == runs == len(times) and b.warmup == warmup
        assert (times > 0).all()
        assert b.min_ms <= b.p50_ms <= b.p90_ms <= b.p99_ms <= b.max_ms
        assert np.allclose([b.p50_ms, b.p90_ms, b.p99_ms], np.percentile(times, [50, 90, 99]))
        assert b.mean_ms == pytest.approx(times.mean()) and b.std_ms == pytest.approx(times.std(ddof=1))
        assert b.throughput_ips == pytest.approx(b.batch_size / (times.mean() / 1e3))
        assert b.output_shape == [b.batch_size, 10]
        # the child ran the real model: its output for sample 0 matches torch on the same input
        x = torch.from_numpy(make_input(b.batch_size, INPUT, np.float32, seed=7))
        with torch.no_grad():
            expected = model(x)[0].numpy()
        np.testing.assert_allclose(b.output_head, expected, rtol=1e-4, atol=1e-5)
        assert b.peak_rss_mb >= r.baseline_rss_mb > 0
    # memory of the model, from the ONNX file
    assert r.weights_bytes == sum(p.numel() for p in model.parameters()) * 4
    assert r.largest_activation_bytes == 8 * 32 * 32 * 4  # first conv output, batch 1, fp32


def test_onnxruntime_backend_in_process_matches_torch(tiny):
    model, path = tiny
    backend = BACKENDS.get("onnxruntime")()
    with backend:
        backend.load(str(path), threads=1)
        x = make_input(3, INPUT, seed=1)
        y = backend.infer(x)
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_the_benchmark_child_holds_only_the_runtime_so_a_4gb_target_budget_fits(tiny):
    """The child's memory is what the deployed runtime needs: it must not import torch. It did (through the
    TensorRT backend's helper import): 3.2 GB of address space and ~700 MB RSS before the model was loaded,
    so every model 'did not fit' the 3072 MB budget of the 4 GB targets (jetson-nano, raspberry-pi-5)."""
    from targets import load_target

    budget = load_target("jetson-nano").memory_budget_mb
    _, path = tiny
    r = benchmark("onnxruntime", path, [1], threads=1, warmup=1, runs=3, memory_budget_mb=budget)
    assert r.status == "ok" and r.fits, r.reason
    # ONNX Runtime and a tiny model: about 110 MB here; with torch imported the child started at ~700 MB
    assert r.batches[0].peak_rss_mb < 400 and r.baseline_vm_mb < budget / 4
    code = "import sys, toolchain.backends.runner; print('torch' in sys.modules)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "False"


def test_memory_budget_refusal_is_a_result(big):
    _, path = big
    free = benchmark("onnxruntime", path, [1], threads=1, warmup=1, runs=3)
    assert free.status == "ok" and free.fits, free.reason
    assert free.weights_bytes == (3072 * 8192 + 8192) * 4  # ~100 MB

    # 50 MB budget: the weights alone do not fit
    tiny_budget = benchmark("onnxruntime", path, [1], threads=1, warmup=1, runs=3, memory_budget_mb=50)
    assert tiny_budget.status == "does_not_fit" and tiny_budget.fits is False
    assert "budget" in tiny_budget.reason and not tiny_budget.batches

    # runtime + 50 MB of address space: the child hits RLIMIT_AS while loading 100 MB of weights
    budget = math.ceil(free.baseline_vm_mb) + 50
    r = benchmark("onnxruntime", path, [1], threads=1, warmup=1, runs=3, memory_budget_mb=budget)
    assert r.status == "does_not_fit" and r.fits is False, (r.reason, r.stderr_tail)
    assert r.budget_enforced == "rlimit_as" and f"{budget} MB" in r.reason and not r.batches

    # the same model with room to spare fits under the limit
    ok = benchmark("onnxruntime", path, [1], threads=1, warmup=1, runs=3, memory_budget_mb=budget + 1024)
    assert ok.status == "ok" and ok.fits and ok.batches[0].runs == 3, ok.reason


def _fake_child(monkeypatch, returncode: int, stderr: str = ""):
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(backends_base.subprocess, "run", fake_run)


def test_killed_child_is_a_result_not_a_crash(tiny, monkeypatch):
    _, path = tiny
    _fake_child(monkeypatch, -9)
    r = benchmark("onnxruntime", path, [1], threads=1, runs=1)
    assert r.status == "does_not_fit" and r.fits is False and "SIGKILL" in r.reason

    _fake_child(monkeypatch, -6, "terminate called after throwing an instance of 'std::bad_alloc'")
    r = benchmark("onnxruntime", path, [1], threads=1, runs=1, memory_budget_mb=4096)
    assert r.status == "does_not_fit" and "SIGABRT" in r.reason and "4096 MB" in r.reason

    _fake_child(monkeypatch, 1, "Traceback ...\nValueError: boom")
    r = benchmark("onnxruntime", path, [1], threads=1, runs=1)
    assert r.status == "error" and r.fits is None and "boom" in r.reason


def test_model_errors_come_back_as_error_results(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    r = benchmark("onnxruntime", bad, [1], threads=1, runs=1)
    assert r.status == "error" and r.fits is None and r.reason.startswith("load:")


def test_bad_arguments_are_user_errors(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(UserError, match="unknown backend 'tflite'"):
        benchmark("tflite", path, [1], threads=1)
    with pytest.raises(UserError, match="not found"):
        benchmark("onnxruntime", tmp_path / "missing.onnx", [1], threads=1)
    with pytest.raises(UserError, match="batch sizes"):
        benchmark("onnxruntime", path, [0], threads=1)


def test_torch_cuda_reports_why_it_is_unavailable(tiny):
    status = available_backends()
    assert {"onnxruntime", "torch-cuda", "torch-cuda-compile", "torch-cuda-graph"} <= set(status)
    assert status["onnxruntime"] == (True, "")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the unavailable path cannot be checked here")
    ok, why = status["torch-cuda"]
    assert ok is False and "CUDA" in why
    with pytest.raises(UserError, match="not available"):
        benchmark("torch-cuda", "torch.nn:Identity", [1], threads=1)


def test_torch_factory_spec():
    fn, weights = resolve_factory("torch.nn:Identity@/w.pt")
    assert fn is nn.Identity and weights == "/w.pt"
    assert resolve_factory("torch.nn.modules:conv.Conv2d") == (nn.Conv2d, None)
    for spec in ("torch.nn", "no_such_module_xyz:f", "torch.nn:NoSuchThing"):
        with pytest.raises(UserError):
            resolve_factory(spec)
