"""TensorRT engine building and inference, where TensorRT and a CUDA GPU are present (lazy import, guarded).

An engine runs only on the GPU model and TensorRT version that built it, so build-edge builds one only
when the host can (``tensorrt_status()``); otherwise the bundle's kit builds it on the device.

Precision, by TensorRT major version:

- TensorRT 10 (JetPack 6): weakly typed network; ``fp16`` sets BuilderFlag.FP16 (FP32 or FP16 ONNX),
  ``int8`` sets BuilderFlag.INT8 with a Q/DQ ONNX (explicit quantization, no calibrator).
- TensorRT >= 11: the builder precision flags and implicit calibration are gone; networks are strongly
  typed (the STRONGLY_TYPED creation flag is still accepted, and ignored), so the precision is the ONNX's:
  pass the FP16 ONNX for ``fp16`` and the Q/DQ ONNX for ``int8``.

Typechecked with mypy against the ``tensorrt-stubs`` package (TensorRT 10 Python API).
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from toolchain.backends.base import BACKENDS, Backend
from toolchain.errors import UserError
from toolchain.util import atomic_write_bytes

if TYPE_CHECKING:
    import tensorrt as trt

PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailable(UserError):
    """TensorRT or a CUDA GPU is missing on this host."""


def _import_tensorrt() -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as e:
        return None, f"the tensorrt Python package is not installed ({e})"
    except OSError as e:  # the wheel is there but libnvinfer cannot be loaded
        return None, f"tensorrt cannot load its libraries ({e})"
    if not hasattr(module, "Builder"):  # e.g. only tensorrt-stubs (a .pyi namespace) or the PyPI placeholder
        return None, "the installed tensorrt is a placeholder or type stubs, not NVIDIA's TensorRT"
    return module, ""


def _cuda_device() -> tuple[str, str] | None:
    """(GPU name, compute capability) of CUDA device 0, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT x on GPU") when engines can be built and run here, else (False, why not)."""
    module, reason = _import_tensorrt()
    if module is None:
        return False, reason
    device = _cuda_device()
    if device is None:
        return False, "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return True, f"TensorRT {module.__version__} on {device[0]} (compute capability {device[1]})"


def _require_tensorrt() -> None:
    ok, reason = tensorrt_status()
    if not ok:
        raise TensorRTUnavailable(f"cannot use TensorRT here: {reason}")


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _onnx_precision_facts(onnx_path: Path) -> dict[str, bool]:
    """Does the ONNX carry Q/DQ nodes, FP16 weights? (decides what a strongly typed build will be)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    return {
        "qdq": "QuantizeLinear" in ops or "DequantizeLinear" in ops,
        "fp16": any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer),
    }


def _check_request(onnx_path: Path, precision: str, workspace_mb: int, batch_sizes: Sequence[int],
                   trt_major: int) -> dict[str, bool]:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if workspace_mb <= 0:
        raise UserError(f"TensorRT workspace must be positive, got {workspace_mb} MB")
    if not batch_sizes or any(int(b) != b or b <= 0 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not Path(onnx_path).is_file():
        raise UserError(f"ONNX model {str(onnx_path)!r} not found")
    facts = _onnx_precision_facts(onnx_path)
    if precision == "int8" and not facts["qdq"]:
        raise UserError(f"int8 engines are built from a Q/DQ ONNX (explicit quantization); {Path(onnx_path).name} "
                        "has no QuantizeLinear/DequantizeLinear nodes")
    if precision == "fp16" and trt_major >= 11 and not facts["fp16"]:
        raise UserError(f"TensorRT {trt_major} builds strongly typed networks: fp16 needs the FP16 ONNX, "
                        f"{Path(onnx_path).name} has FP32 weights")
    if precision == "fp32" and (facts["qdq"] or facts["fp16"]):
        raise UserError(f"fp32 engine requested from {Path(onnx_path).name}, which is not an FP32 model")
    return facts


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _parse_onnx(network: trt.INetworkDefinition, logger: trt.ILogger, onnx_path: Path) -> None:
    import tensorrt as trt

    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = " | ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors}")


def _check_input(onnx_path: Path, tensor: Any, input_shape: tuple[int, int, int], batch_sizes: list[int]) -> None:
    """The network's one input must be N x input_shape, with a dynamic batch unless all sizes are its own."""
    dims = _dims(tensor.shape)
    if len(dims) != 1 + len(input_shape):
        raise UserError(f"{onnx_path.name}: input {tensor.name} has shape {dims}, expected N x {input_shape}")
    for got, want in zip(dims[1:], input_shape):
        if got not in (-1, want):
            raise UserError(f"{onnx_path.name}: input {tensor.name} has shape {dims}, expected N x {input_shape}")
    lo, hi = min(batch_sizes), max(batch_sizes)
    if dims[0] != -1 and (lo != dims[0] or hi != dims[0]):
        raise UserError(f"{onnx_path.name} has a fixed batch of {dims[0]}; export it with a dynamic batch axis "
                        f"to build for batch sizes {sorted(set(batch_sizes))}")


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str, workspace_mb: int, batch_sizes: list[int],
                 input_shape: tuple[int, int, int] = (3, 32, 32), timing_cache: Path,
                 opt_batch: int | None = None) -> dict[str, Any]:
    """Build a serialized TensorRT engine from `onnx_path` for this host's GPU; returns its metadata.

    One optimisation profile covers min(batch_sizes)..max(batch_sizes), tuned for `opt_batch` (default: the
    largest). The timing cache is read from `timing_cache` when it exists and written back after the build.
    The engine is written to a temporary file and renamed. Raises TensorRTUnavailable without TensorRT/GPU.
    """
    _require_tensorrt()
    import tensorrt as trt

    onnx_path, engine_path, timing_cache = Path(onnx_path), Path(engine_path), Path(timing_cache)
    version: str = trt.__version__
    major = _major(version)
    facts = _check_request(onnx_path, precision, workspace_mb, batch_sizes, major)
    lo, hi = min(batch_sizes), max(batch_sizes)
    opt = hi if opt_batch is None else int(opt_batch)
    if not lo <= opt <= hi:
        raise UserError(f"opt batch {opt} is outside the batch sizes {lo}..{hi}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    _parse_onnx(network, logger, onnx_path)
    if network.num_inputs != 1:
        raise UserError(f"{onnx_path.name}: expected one input, found {network.num_inputs}")
    tensor = network.get_input(0)
    _check_input(onnx_path, tensor, input_shape, batch_sizes)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    builder_flags: list[str] = []
    if not strongly_typed:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            builder_flags.append("FP16")
        elif precision == "int8":  # explicit quantization: the scales come from the Q/DQ nodes, no calibrator
            config.set_flag(trt.BuilderFlag.INT8)
            builder_flags.append("INT8")
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, trt.Dims([lo, *input_shape]), trt.Dims([opt, *input_shape]),
                      trt.Dims([hi, *input_shape]))
    config.add_optimization_profile(profile)
    cache_blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    data = memoryview(serialized)
    atomic_write_bytes(engine_path, data)
    atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    device = _cuda_device()
    gpu_name, capability = device if device is not None else ("unknown", "unknown")
    return {
        "engine": str(engine_path), "engine_bytes": engine_path.stat().st_size,
        "engine_sha256": hashlib.sha256(data).hexdigest(), "onnx": str(onnx_path),
        "tensorrt_version": version, "gpu": gpu_name, "compute_capability": capability,
        "precision": precision, "strongly_typed": strongly_typed, "builder_flags": builder_flags,
        "onnx_has_qdq": facts["qdq"], "onnx_fp16": facts["fp16"], "workspace_mb": int(workspace_mb),
        "input": tensor.name,
        "profile": {"min": [lo, *input_shape], "opt": [opt, *input_shape], "max": [hi, *input_shape]},
        "timing_cache": str(timing_cache),
        "build_seconds": round(build_s, 3),
    }


@BACKENDS.register("tensorrt")
class TensorRTBackend(Backend):
    """A serialized engine on GPU 0, I/O through torch CUDA tensors (the benchmark's TensorRT runner)."""

    name = "tensorrt"
    enforces_address_limit = False  # CUDA maps huge virtual ranges: the budget is checked after the run

    def __init__(self) -> None:
        self._engine: Any = None
        self._context: Any = None
        self._input = ""
        self._outputs: list[str] = []

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, reason = tensorrt_status()
        return ok, "" if ok else reason

    def load(self, model_path: str, threads: int) -> None:
        _require_tensorrt()
        import tensorrt as trt

        path = Path(model_path)
        if not path.is_file():
            raise UserError(f"TensorRT engine {str(path)!r} not found")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise UserError(f"{path.name} cannot be loaded here (built by another TensorRT version or GPU?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self._outputs:
            raise UserError(f"{path.name}: expected one input and at least one output, got {names}")
        self._engine, self._context, self._input = engine, engine.create_execution_context(), inputs[0]

    def input_dtype(self) -> np.dtype:
        import tensorrt as trt

        return np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import tensorrt as trt
        import torch

        device = torch.device("cuda", 0)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=self.input_dtype())).to(device)
        self._context.set_input_shape(self._input, trt.Dims(list(x.shape)))
        self._context.set_tensor_address(self._input, x.data_ptr())
        buffers: dict[str, Any] = {}
        for name in self._outputs:
            shape = _dims(self._context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            buffers[name] = torch.from_numpy(np.empty(shape, dtype=dtype)).to(device)
            self._context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        stream.synchronize()
        out: np.ndarray = buffers[self._outputs[0]].cpu().numpy()
        return out

    def device(self) -> str:
        import torch

        return torch.cuda.get_device_name(0)

    def versions(self) -> dict[str, str]:
        import tensorrt as trt

        return {**super().versions(), "tensorrt": str(trt.__version__)}

    def device_peak_bytes(self) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated()) + int(getattr(self._engine, "device_memory_size", 0) or 0)

    def close(self) -> None:
        self._context = None
        self._engine = None


def infer_engine(engine_path: Path, batch: np.ndarray) -> np.ndarray:
    """Run a serialized engine on `batch` (float32 NCHW) on GPU 0; returns the first output as numpy."""
    with TensorRTBackend() as backend:
        backend.load(str(engine_path), threads=1)
        return backend.infer(batch)


__all__ = ["PRECISIONS", "TensorRTBackend", "TensorRTUnavailable", "build_engine", "infer_engine", "tensorrt_status"]
