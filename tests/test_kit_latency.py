"""The device side of latency tables: the kit's latency_table.py re-measures a bundle's table (ONNX Runtime,
run here as the device would: without toolchain importable), reads a model's conv shapes as the host does,
resumes an interrupted run; `bench-edge import-latency-table` stores only sane device tables. The TensorRT path
cannot run here (no GPU, no TensorRT): its network building is checked against a recording stand-in for `trt`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.cli import bench_main
from toolchain.kit import write_kit
from toolchain.latency import ConvSpec, LatencyTable
from toolchain.latency_store import imported_table

TEMPLATES = Path(__file__).resolve().parents[1] / "toolchain" / "kit" / "templates"
TARGET = {"name": "jetson-orin-nano-8gb", "runtime": "tensorrt", "tensorrt_major": 10, "tensorrt_version": "10.3",
          "workspace_mb": 256, "batch_sizes": [1], "default_precision": "fp16"}
SMALL = ConvSpec(8, 8, 8, 8)
BIG = ConvSpec(256, 256, 32, 32)
MODEL_CONVS = [ConvSpec(3, 8, 8, 8), ConvSpec(8, 16, 8, 8, stride=(2, 2))]  # model_onnx's convs


def load_template(name: str):
    spec = importlib.util.spec_from_file_location(f"kit_{name}", str(TEMPLATES / f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lt():
    return load_template("latency_table")


@pytest.fixture(scope="module")
def bench():
    return load_template("bench_on_device")


def model_onnx(path: Path) -> Path:
    """Conv 3->8 (p1) -> ReLU -> Conv 8->16 (s2, p1) -> ReLU -> global pool -> Gemm to 10, dynamic batch."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (16, 8, 3, 3), "b2": (16,), "fc": (10, 16), "fb": (10,)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name)
             for name, shape in shapes.items()]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def estimate_table(specs, **kw) -> LatencyTable:
    fields = {"target": TARGET["name"], "backend": "roofline", "precision": "fp16", "batch": 1, "threads": 4,
              "kind": "estimate", "entries": {s.key(): 0.01 * (i + 1) for i, s in enumerate(specs)},
              "overhead_ms": 0.0, "dense_ms": 0.5, "measured_on": "roofline of jetson-orin-nano-8gb"}
    return LatencyTable(**{**fields, **kw})


def write_manifest(bundle: Path) -> None:
    files = {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(bundle.rglob("*")) if p.is_file()}
    (bundle / "manifest.json").write_text(json.dumps({"tool": "build-edge", "files": files}))


# -- ONNX Runtime, as on a device -----------------------------------------------------------------------------
def test_kit_measures_the_bundles_table_with_onnxruntime(tmp_path: Path) -> None:
    """The kit written by write_kit carries latency_table.py; `bench_on_device.py --latency-table OUT` run with
    toolchain made unimportable re-measures every entry: a device table the host reads, the same keys, positive
    times, a 256-channel 32x32 conv slower than an 8-channel 8x8 one, and the overhead from the bundle's model."""
    bundle = tmp_path / "run"
    bundle.mkdir()
    model_onnx(bundle / "model.onnx")
    written = write_kit(bundle, model_files={"fp32": "model.onnx"}, target=TARGET, labels=[str(i) for i in range(10)],
                        mean=[0.5] * 3, std=[0.25] * 3, input_size=8)
    assert "kit/latency_table.py" in written and (bundle / "kit" / "latency_table.py").stat().st_mode & 0o100
    source = estimate_table([SMALL, BIG, *MODEL_CONVS])
    source.save(bundle / "latency_table.json")
    write_manifest(bundle)
    out = tmp_path / "device.json"
    argv = ["bench_on_device.py", "--latency-table", str(out), "--backend", "onnxruntime", "--warmup", "1",
            "--iters", "5", "--min-seconds", "0", "--threads", "1"]
    code = ("import runpy, sys; sys.modules['toolchain'] = None; sys.argv = " + repr(argv)
            + f"; runpy.run_path({str(bundle / 'kit' / 'bench_on_device.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "bundle ok" in proc.stdout and "its 2 convs" in proc.stdout, proc.stdout

    table = LatencyTable.load(out)
    assert (table.kind, table.backend, table.threads) == ("device", "onnxruntime", 1)
    assert (table.target, table.precision, table.batch) == (source.target, source.precision, source.batch)
    assert set(table.entries) == set(source.entries)
    assert all(ms > 0 for ms in table.entries.values())
    assert table.entries != source.entries  # measured, not copied
    assert table.ms(BIG) > 10 * table.ms(SMALL), table.entries
    assert table.dense_ms is None and table.overhead_ms >= 0  # no dense model in this bundle
    assert "onnxruntime" in table.measured_on
    assert not out.with_name(out.name + ".partial").exists()


def test_latency_script_is_standalone() -> None:
    """Only the standard library, numpy, onnx, onnxruntime and tensorrt (and the kit's bench_on_device.py)."""
    import ast

    modules = set()
    for node in ast.walk(ast.parse((TEMPLATES / "latency_table.py").read_text())):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names}
    assert third_party == {"numpy", "onnx", "onnxruntime", "tensorrt"}, third_party


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter, the quick one
def test_model_conv_keys_match_the_hosts_conv_terms(lt, tmp_path: Path) -> None:
    """The device reads a model's conv shapes from its ONNX graph; they must be the keys the host's table holds
    (toolchain.latency.conv_terms on the same torch model): strides, dilation and a depthwise conv included."""
    import torch
    from torch import nn

    from toolchain.latency import conv_terms

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 12, (1, 3), padding=(0, 1)), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 12, 10),), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    keys, why = lt.model_conv_keys(path)
    assert why is None
    assert keys == [t.dense.key() for t in conv_terms(model, (3, 12, 10), [])]
    assert keys[2] == "16-16-6x5-k3x3-s1x1-p2x2-d2x2-g16"


def test_overhead_from_a_dense_model_or_zero_with_a_reason(lt, tmp_path: Path) -> None:
    """dense_ms is set only from a dense model; the overhead is the timed model minus its convs' entries, and 0
    (with the reason) when one of its convs has no entry or there is no model at all."""
    timer = types.SimpleNamespace(model=lambda path: 1.0)
    entries = {MODEL_CONVS[0].key(): 0.3, MODEL_CONVS[1].key(): 0.2, SMALL.key(): 9.0}
    assert lt.overhead(timer, entries, tmp_path, {})[:2] == (None, 0.0)  # nothing to time

    model_onnx(tmp_path / "model.onnx")  # the bundle's own (pruned) model: overhead, but no dense_ms
    dense_ms, overhead, _ = lt.overhead(timer, entries, tmp_path, {"model_files": {"fp32": "model.onnx"}})
    assert dense_ms is None and overhead == pytest.approx(0.5)

    (tmp_path / "model.onnx").rename(tmp_path / "dense.onnx")
    dense_ms, overhead, _ = lt.overhead(timer, entries, tmp_path, {})
    assert dense_ms == 1.0 and overhead == pytest.approx(0.5)

    del entries[MODEL_CONVS[1].key()]
    dense_ms, overhead, note = lt.overhead(timer, entries, tmp_path, {})
    assert (dense_ms, overhead) == (1.0, 0.0) and "no entry" in note and MODEL_CONVS[1].key() in note


def test_an_interrupted_run_resumes_and_a_bad_table_is_refused(lt, bench, tmp_path: Path, capsys) -> None:
    """Entries saved by an interrupted run of the same table are not timed again (another precision's are);
    a table with a malformed key ends as one line on stderr and exit code 2, nothing written."""
    timed: list[str] = []
    timer = types.SimpleNamespace(name="fake", conv=lambda spec: timed.append(spec.key()) or 2.0)
    header = {"format": 1, "target": "t", "backend": "fake", "precision": "fp16", "batch": 1, "threads": 1,
              "kind": "device"}
    partial = tmp_path / "out.json.partial"
    partial.write_text(json.dumps({**header, "entries": {SMALL.key(): 1.5}}))
    keys = sorted([SMALL.key(), BIG.key()])
    entries = lt.measure_entries(timer, keys, partial, header, bench)
    assert entries == {SMALL.key(): 1.5, BIG.key(): 2.0} and timed == [BIG.key()]
    timed.clear()
    lt.measure_entries(timer, keys, partial, {**header, "precision": "int8"}, bench)
    assert sorted(timed) == keys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**estimate_table([SMALL]).to_json(), "entries": {"8-8-8x8-k3": 1.0}}))
    out = tmp_path / "never.json"
    assert lt.main(["--bundle", str(tmp_path), "--table", str(bad), "--out", str(out)], bench=bench) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latency_table:") and "8-8-8x8-k3" in err and len(err.splitlines()) == 1
    assert not out.exists()


# -- bench-edge import-latency-table ---------------------------------------------------------------------------
def test_import_latency_table_stores_a_device_table(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BUILD_EDGE_HOME", str(tmp_path / "home"))
    path = tmp_path / "latency_table.device.json"
    device = estimate_table([SMALL, BIG], kind="device", backend="tensorrt", dense_ms=None, measured_on="orin")
    device.save(path)
    assert bench_main(["import-latency-table", str(path)]) == 0
    stored = tmp_path / "home" / "latency-tables" / "jetson-orin-nano-8gb-fp16-b1.json"
    assert imported_table("jetson-orin-nano-8gb", "fp16", 1) == stored
    assert LatencyTable.load(stored) == device
    out = capsys.readouterr().out
    assert str(stored) in out and "later builds for jetson-orin-nano-8gb at fp16, batch 1 will use it" in out

    assert bench_main([str(tmp_path / "no-bundle"), str(path)]) == 2  # the BUNDLE RESULTS form is still there
    assert "not a build-edge bundle" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    "estimate",  # not measured on the device
    "{not json",
    json.dumps({"format": 1, "target": "x"}),  # fields missing
    "entries-list",
    "escaping-target",
    "nan-entry",
])
def test_import_latency_table_refuses(content: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BUILD_EDGE_HOME", str(tmp_path / "home"))
    data = estimate_table([SMALL], kind="device").to_json()
    if content == "estimate":
        text = estimate_table([SMALL]).to_json()
    elif content == "entries-list":
        text = {**data, "entries": [SMALL.key()]}
    elif content == "escaping-target":
        text = {**data, "target": "../../outside"}
    elif content == "nan-entry":
        text = {**data, "entries": {SMALL.key(): float("nan")}}
    else:
        text = content
    path = tmp_path / "table.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    assert bench_main(["import-latency-table", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench-edge: error:") and len(err.strip().splitlines()) == 1, err
    if content == "estimate":
        assert "estimate" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]  # no store, nothing outside it


# -- TensorRT: the network, against a recording stand-in ---------------------------------------------------------
class _Tensor:
    def __init__(self, name: str) -> None:
        self.name, self.ranges = name, []

    def set_dynamic_range(self, lo: float, hi: float) -> bool:
        self.ranges.append((lo, hi))
        return True


class _Layer:
    def __init__(self, kind: str, args: tuple) -> None:
        self.kind, self.args, self.output = kind, args, _Tensor(f"{kind}_out")

    def get_output(self, index: int) -> _Tensor:
        assert index == 0
        return self.output


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.inputs, self.layers, self.outputs = flags, [], [], []

    def add_input(self, name, dtype, shape) -> _Tensor:
        self.inputs.append((name, dtype, tuple(shape)))
        self.input = _Tensor(name)
        return self.input

    def add_convolution_nd(self, input, num_output_maps, kernel_shape, kernel, bias) -> _Layer:
        self.layers.append(_Layer("conv", (input, num_output_maps, tuple(kernel_shape), kernel, bias)))
        return self.layers[-1]

    def add_activation(self, input, type) -> _Layer:
        self.layers.append(_Layer("act", (input, type)))
        return self.layers[-1]

    def mark_output(self, tensor) -> None:
        self.outputs.append(tensor)


class _Config:
    def __init__(self) -> None:
        self.flags, self.pools = [], {}

    def set_flag(self, flag) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size


class _Builder:
    def create_network(self, flags: int = 0) -> _Network:
        self.network = _Network(flags)
        return self.network

    def create_builder_config(self) -> _Config:
        return _Config()


def fake_trt(with_fp16: bool = True):
    flags = types.SimpleNamespace(INT8="INT8", **({"FP16": "FP16"} if with_fp16 else {}))
    return types.SimpleNamespace(DataType=types.SimpleNamespace(FLOAT="FLOAT"), Weights=lambda a: ("W", a),
                                 ActivationType=types.SimpleNamespace(RELU="RELU"), BuilderFlag=flags,
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"), __version__="11.0")


def test_tensorrt_conv_network_records_the_spec(lt) -> None:
    """TensorRT cannot run here: the conv network is built against a recording stand-in for the `trt` module,
    which checks input shape, filters, kernel, weights (GKCRS), stride, padding, dilation, groups, the ReLU, the
    output, and dynamic ranges for int8 only."""
    trt, builder = fake_trt(), _Builder()
    spec = lt.Spec.from_key("16-32-14x12-k3x5-s2x1-p1x2-d1x2-g4")
    network, (w, b) = lt.conv_network(trt, builder, spec, 2, "fp16")
    assert network is builder.network and network.flags == 0
    assert network.inputs == [("x", "FLOAT", (2, 16, 14, 12))]
    conv, act = network.layers
    x, maps, kernel, weights, bias = conv.args
    assert x is network.input and (maps, kernel) == (32, (3, 5))
    assert weights[1] is w and w.shape == (32, 4, 3, 5) and w.dtype == np.float32 and w.flags.c_contiguous
    assert bias[1] is b and b.shape == (32,)
    assert (tuple(conv.stride_nd), tuple(conv.padding_nd), tuple(conv.dilation_nd)) == ((2, 1), (1, 2), (1, 2))
    assert conv.num_groups == 4
    assert act.args == (conv.output, "RELU") and network.outputs == [act.output] and act.output.name == "out"
    assert not network.input.ranges and not conv.output.ranges

    network, _ = lt.conv_network(trt, builder, spec, 1, "int8")
    conv, act = network.layers
    assert all(t.ranges == [(-lt.INT8_RANGE, lt.INT8_RANGE)] for t in (network.input, conv.output, act.output))


def test_tensorrt_builder_config_sets_the_precision(lt, bench) -> None:
    trt = fake_trt()
    flags = {p: lt.builder_config(trt, _Builder(), p, 256, bench).flags for p in ("fp32", "fp16", "int8")}
    assert flags == {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}
    assert lt.builder_config(trt, _Builder(), "fp32", 256, bench).pools == {"WORKSPACE": 256 << 20}
    with pytest.raises(bench.BenchError, match="TensorRT 10 API"):  # TensorRT 11: strongly typed, no such flags
        lt.builder_config(fake_trt(with_fp16=False), _Builder(), "fp16", 256, bench)


def test_the_tensorrt_calls_exist_in_tensorrt_10(lt) -> None:
    """The members latency_table.py uses, looked up in the tensorrt-stubs package (TensorRT 10.x) when installed."""
    import importlib.metadata

    try:
        stub = Path(importlib.metadata.distribution("tensorrt-stubs").locate_file("tensorrt_bindings/tensorrt.pyi"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed")
    text = stub.read_text()
    source = (TEMPLATES / "latency_table.py").read_text()
    for member in ("create_network", "add_input", "add_convolution_nd", "add_activation", "mark_output",
                   "set_dynamic_range", "create_builder_config", "set_memory_pool_limit", "set_flag",
                   "build_serialized_network", "deserialize_cuda_engine", "create_execution_context",
                   "set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3",
                   "parse_from_file", "create_optimization_profile", "set_shape", "add_optimization_profile",
                   "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_layer", "get_input", "get_output"):
        assert f".{member}(" in source, member
        assert f"def {member}(" in text, member
    for attr in ("stride_nd", "padding_nd", "dilation_nd", "num_groups", "num_io_tensors", "num_layers",
                 "num_inputs", "num_outputs", "num_errors"):
        assert f"{attr}: " in text or f"def {attr}(self)" in text, attr
    for enum, value in (("BuilderFlag", "FP16"), ("BuilderFlag", "INT8"), ("ActivationType", "RELU"),
                        ("MemoryPoolType", "WORKSPACE"), ("DataType", "FLOAT"), ("TensorIOMode", "INPUT")):
        block = text[text.index(f"class {enum}:"):]
        assert f"    {value}: typing.ClassVar[{enum}]" in block[:block.index("\nclass ")], (enum, value)
