"""TensorRT backend: guarded availability, the build logic for TensorRT 10 and 11 (against a recording test double
of the Python API: no engine is built here), and mypy against the tensorrt-stubs package."""

from __future__ import annotations

import ast
import importlib.util
import keyword
import os
import re
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.backends import tensorrt as trt_backend
from toolchain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "toolchain" / "backends" / "tensorrt.py"


# -- availability ------------------------------------------------------------------------------------------
def test_status_is_false_here_with_a_reason() -> None:
    module, _ = trt_backend._import_tensorrt()
    if module is not None and trt_backend._cuda_device() is not None:
        pytest.skip("TensorRT and a CUDA GPU are present on this host")
    ok, reason = trt_backend.tensorrt_status()
    assert ok is False
    assert reason and "\n" not in reason
    with pytest.raises(trt_backend.TensorRTUnavailable, match="cannot use TensorRT here"):
        trt_backend.build_engine(Path("model.onnx"), Path("model.engine"), precision="fp32", workspace_mb=256,
                                 batch_sizes=[1], timing_cache=Path("timing.cache"))
    assert issubclass(trt_backend.TensorRTUnavailable, UserError)  # the CLI prints it as one line


def test_status_sees_through_stub_only_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs tensorrt/__init__.pyi: "import tensorrt" then succeeds as an empty namespace
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    ok, reason = trt_backend.tensorrt_status()
    assert not ok and "placeholder or type stubs" in reason


def test_status_needs_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.3.0"))
    monkeypatch.setattr(trt_backend, "_cuda_device", lambda: None)
    ok, reason = trt_backend.tensorrt_status()
    assert not ok and "no CUDA GPU" in reason
    monkeypatch.setattr(trt_backend, "_cuda_device", lambda: ("Orin", "8.7"))
    assert trt_backend.tensorrt_status() == (True, "TensorRT 10.3.0 on Orin (compute capability 8.7)")


# -- build logic, against a recording double of the TensorRT Python API ------------------------------------
class FakeTensorRT(types.ModuleType):
    """The subset of the TensorRT Python API build_engine uses; records every call. Builds nothing."""

    def __init__(self, version: str, fail_build: bool = False) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple[Any, ...]] = []
        self.fail_build = fail_build
        calls = self.calls
        fake = self

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity: str) -> None:
                self.severity = severity

        class Tensor:
            def __init__(self, name: str, shape: list[int]) -> None:
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path: str) -> bool:
                calls.append(("parse", path))
                model = onnx.load(path)
                dims = [d.dim_value if d.HasField("dim_value") else -1
                        for d in model.graph.input[0].type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(model.graph.input[0].name, dims))
                return True

            def get_error(self, i: int) -> str:
                return ""

        class TimingCache:
            def __init__(self, blob: bytes) -> None:
                self.blob = bytes(blob)

            def serialize(self) -> bytes:
                return self.blob + b"+timed"

        class Config:
            def __init__(self) -> None:
                self.flags: list[str] = []
                self.cache: TimingCache | None = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                calls.append(("pool", pool, size))

            def set_flag(self, flag: str) -> None:
                self.flags.append(flag)

            def add_optimization_profile(self, profile: Any) -> int:
                calls.append(("profile", *profile.shapes))
                return 0

            def create_timing_cache(self, blob: bytes) -> TimingCache:
                calls.append(("timing_cache_in", bytes(blob)))
                return TimingCache(blob)

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache:
                assert self.cache is not None
                return self.cache

        class Profile:
            def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
                self.shapes = (name, list(lo), list(opt), list(hi))

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int = 0) -> Network:
                calls.append(("network_flags", flags))
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                calls.append(("build", list(config.flags)))
                return None if fake.fail_build else b"serialized-by-the-double"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.Dims = list
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)

    def call(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


def tiny_onnx(path: Path, *, qdq: bool = False, fp16: bool = False, batch: int | str = "N") -> Path:
    """A 1x1 Conv image model; with `qdq` the input goes through QuantizeLinear/DequantizeLinear."""
    dtype, np_dtype = (TensorProto.FLOAT16, np.float16) if fp16 else (TensorProto.FLOAT, np.float32)
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), dtype=np_dtype), "w")
    nodes, inits, conv_in = [], [weight], "input"
    if fp16:
        nodes.append(helper.make_node("Cast", ["input"], ["input_h"], to=TensorProto.FLOAT16))
        conv_in = "input_h"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        conv_in = "dq"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["conv"]))
    nodes.append(helper.make_node("Cast", ["conv"], ["logits"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [batch, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4, 32, 32])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what torch exports; onnx 1.23's default (14) is newer than ONNX Runtime 1.31 reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(version: str, **kw: Any) -> FakeTensorRT:
        fake = FakeTensorRT(version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(trt_backend, "_cuda_device", lambda: ("Orin", "8.7"))
        return fake

    return install


def test_tensorrt10_int8_uses_the_builder_flag_profile_workspace_and_timing_cache(fake_trt: Any,
                                                                                  tmp_path: Path) -> None:
    fake = fake_trt("10.3.0")
    onnx_path = tiny_onnx(tmp_path / "model_int8.onnx", qdq=True)
    cache = tmp_path / "run" / "timing.cache"
    meta = trt_backend.build_engine(onnx_path, tmp_path / "run" / "model_int8.engine", precision="int8",
                                    workspace_mb=1024, batch_sizes=[1, 8, 32], timing_cache=cache)
    assert fake.call("network_flags") == [("network_flags", 0)]  # weakly typed on TensorRT 10
    assert fake.call("build") == [("build", ["INT8"])]
    assert fake.call("pool") == [("pool", "WORKSPACE", 1024 << 20)]
    assert fake.call("profile") == [("profile", "input", [1, 3, 32, 32], [32, 3, 32, 32], [32, 3, 32, 32])]
    assert (tmp_path / "run" / "model_int8.engine").read_bytes() == b"serialized-by-the-double"
    assert fake.call("timing_cache_in") == [("timing_cache_in", b"")]
    assert cache.read_bytes() == b"+timed"
    assert meta["tensorrt_version"] == "10.3.0" and meta["gpu"] == "Orin" and meta["compute_capability"] == "8.7"
    assert meta["precision"] == "int8" and meta["strongly_typed"] is False and meta["builder_flags"] == ["INT8"]
    assert meta["build_seconds"] >= 0 and len(meta["engine_sha256"]) == 64
    # the next build starts from the saved timing cache
    trt_backend.build_engine(onnx_path, tmp_path / "run" / "again.engine", precision="int8", workspace_mb=1024,
                             batch_sizes=[4], timing_cache=cache)
    assert fake.call("timing_cache_in")[-1] == ("timing_cache_in", b"+timed")
    assert fake.call("profile")[-1][2:] == ([4, 3, 32, 32],) * 3
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_tensorrt10_fp16_sets_the_fp16_flag(fake_trt: Any, tmp_path: Path) -> None:
    fake = fake_trt("10.14.1")
    trt_backend.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="fp16",
                             workspace_mb=512, batch_sizes=[1, 8], timing_cache=tmp_path / "t.cache", opt_batch=1)
    assert fake.call("build") == [("build", ["FP16"])]
    assert fake.call("profile")[0][2:] == ([1, 3, 32, 32], [1, 3, 32, 32], [8, 3, 32, 32])


def test_tensorrt11_is_strongly_typed_and_takes_precision_from_the_onnx(fake_trt: Any, tmp_path: Path) -> None:
    fake = fake_trt("11.4.1")
    fp32 = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(UserError, match="fp16 needs the FP16 ONNX"):
        trt_backend.build_engine(fp32, tmp_path / "m.engine", precision="fp16", workspace_mb=512,
                                 batch_sizes=[1], timing_cache=tmp_path / "t.cache")
    meta = trt_backend.build_engine(tiny_onnx(tmp_path / "m16.onnx", fp16=True), tmp_path / "m16.engine",
                                    precision="fp16", workspace_mb=512, batch_sizes=[1],
                                    timing_cache=tmp_path / "t.cache")
    assert fake.call("network_flags") == [("network_flags", 1 << 1)]  # 1 << STRONGLY_TYPED
    assert fake.call("build") == [("build", [])]  # no precision flags exist on TensorRT 11
    assert meta["strongly_typed"] is True and meta["builder_flags"] == []


def test_build_refuses_mismatched_inputs(fake_trt: Any, tmp_path: Path) -> None:
    fake_trt("10.3.0")
    fp32 = tiny_onnx(tmp_path / "m.onnx")
    kw: dict[str, Any] = {"workspace_mb": 256, "timing_cache": tmp_path / "t.cache"}
    with pytest.raises(UserError, match="Q/DQ ONNX"):
        trt_backend.build_engine(fp32, tmp_path / "e", precision="int8", batch_sizes=[1], **kw)
    with pytest.raises(UserError, match="unknown precision"):
        trt_backend.build_engine(fp32, tmp_path / "e", precision="int4", batch_sizes=[1], **kw)
    with pytest.raises(UserError, match="batch sizes"):
        trt_backend.build_engine(fp32, tmp_path / "e", precision="fp32", batch_sizes=[], **kw)
    with pytest.raises(UserError, match="fixed batch of 1"):
        trt_backend.build_engine(tiny_onnx(tmp_path / "b1.onnx", batch=1), tmp_path / "e", precision="fp32",
                                 batch_sizes=[1, 8], **kw)
    with pytest.raises(UserError, match="expected N x"):
        trt_backend.build_engine(fp32, tmp_path / "e", precision="fp32", batch_sizes=[1], input_shape=(3, 64, 64),
                                 **kw)
    with pytest.raises(UserError, match="not found"):
        trt_backend.build_engine(tmp_path / "missing.onnx", tmp_path / "e", precision="fp32", batch_sizes=[1], **kw)
    assert not (tmp_path / "e").exists()


def test_failed_build_leaves_no_engine(fake_trt: Any, tmp_path: Path) -> None:
    fake_trt("10.3.0", fail_build=True)
    with pytest.raises(RuntimeError, match="failed to build"):
        trt_backend.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="fp32",
                                 workspace_mb=256, batch_sizes=[1], timing_cache=tmp_path / "t.cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# -- mypy against tensorrt-stubs ----------------------------------------------------------------------------
MYPY_INI = """\
[mypy]
python_version = 3.10
follow_imports = silent
disallow_untyped_defs = True
warn_unused_ignores = True
# the stubs are machine-generated: their own errors are not ours
[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*,tensorrt_libs]
ignore_errors = True
# torch is huge to analyse and only used for CUDA buffers here
[mypy-torch,torch.*,onnx,onnx.*]
follow_imports = skip
"""

BAD_USE = """\
import tensorrt as trt


def build() -> None:
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    config.set_memory_pool_limit("workspace", 1 << 20)
    builder.create_optimisation_profile()
"""


def _repair_def(line: str) -> str:
    """Make one generated stub signature valid Python: keyword parameter names, defaults after defaults."""
    line = re.sub(rf"([(,]\s*)({'|'.join(keyword.kwlist)})(\s*:)", r"\1\2_\3", line)
    try:
        ast.parse(line.strip() + " ...")
        return line
    except SyntaxError:
        pass
    head, _, rest = line.partition("(")
    params, _, tail = rest.rpartition(")")
    parts, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    seen_default = False
    for i, part in enumerate(parts):
        if "=" in part:
            seen_default = True
        elif seen_default and ":" in part and not part.strip().startswith("*"):
            parts[i] = part + " = ..."
    return f"{head}({','.join(parts)}){tail}"


def repaired_tensorrt_stubs(dest: Path) -> Path:
    """Copy the .pyi files of tensorrt-stubs to `dest`, fixing what keeps mypy from parsing them.

    tensorrt-stubs 10.13.0.35.1 ships tensorrt/__init__.pyi without py.typed (mypy skips it as
    "installed, but missing library stubs"), parameters named ``in``, a non-default parameter after
    defaults, and an import of tensorrt_libs (a runtime-only package).
    """
    dist = metadata.distribution("tensorrt-stubs")
    stubs = [f for f in dist.files or [] if str(f).endswith(".pyi")]
    if not stubs:
        pytest.skip("tensorrt-stubs has no .pyi files")
    for rel in stubs:
        target = dest / str(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = Path(dist.locate_file(rel)).read_text(encoding="utf-8").splitlines()
        text = "\n".join(_repair_def(x) if x.lstrip().startswith("def ") else x for x in lines) + "\n"
        ast.parse(text)  # every stub parses now
        target.write_text(text, encoding="utf-8")
    (dest / "tensorrt_libs.pyi").write_text("")
    return dest


def test_mypy_passes_against_tensorrt_stubs(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install mypy)")
    try:
        metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    stub_dir = repaired_tensorrt_stubs(tmp_path / "stubs")
    (tmp_path / "mypy.ini").write_text(MYPY_INI)
    bad = tmp_path / "bad_use.py"
    bad.write_text(BAD_USE)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"), "--cache-dir",
         str(tmp_path / "cache"), "--no-error-summary", str(MODULE), str(bad)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "MYPYPATH": str(stub_dir)},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    ours = [line for line in out.splitlines() if line.startswith(("toolchain/", str(MODULE)))]
    assert not ours, "\n".join(ours)
    # the negative control proves the stubs were really used: both mistakes are caught
    assert 'incompatible type "str"; expected "MemoryPoolType"' in out, out
    assert '"Builder" has no attribute "create_optimisation_profile"' in out, out
