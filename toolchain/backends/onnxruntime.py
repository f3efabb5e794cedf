"""ONNX Runtime on the CPU: intra-op threads from the profile, sequential execution, all graph
optimisations."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from toolchain.backends.base import BACKENDS, Backend
from toolchain.errors import UserError

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}  # fmt: skip


@BACKENDS.register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self) -> None:
        self._sess: Any = None
        self._input: str | None = None
        self._threads: int | None = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return False, f"onnxruntime is not installed ({e})"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, "onnxruntime has no CPUExecutionProvider"
        return True, ""

    def load(self, model_path: str, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only
        try:
            self._sess = ort.InferenceSession(
                str(model_path), sess_options=so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            if "NO_SUCHFILE" in str(e) or "No such file" in str(e):
                raise UserError(f"model {model_path!r} not found") from None
            raise
        inputs = self._sess.get_inputs()
        if len(inputs) != 1:
            raise UserError(f"{model_path}: expected one model input, found {len(inputs)}")
        self._input = inputs[0].name
        self._threads = int(self._sess.get_session_options().intra_op_num_threads)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._sess.run(None, {self._input: batch})[0]

    def input_dtype(self) -> np.dtype:
        return np.dtype(_ORT_DTYPES.get(self._sess.get_inputs()[0].type, np.float32))

    def threads_used(self) -> int | None:
        return self._threads

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"python": sys.version.split()[0], "numpy": np.__version__, "onnxruntime": ort.__version__,
                "providers": "CPUExecutionProvider"}  # fmt: skip

    def close(self) -> None:
        self._sess = None
