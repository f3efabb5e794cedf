"""Engine stage: build the TensorRT engine here when TensorRT and a CUDA GPU are present; otherwise
say so once, plainly: the bundle's kit builds it on the device (engines are tied to the GPU model
and TensorRT version that built them, so a Jetson engine cannot be built on an x86 host anyway)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolchain.backends import tensorrt as trt_backend

log = logging.getLogger("build_edge")


def build_or_defer(onnx_by_precision: dict[str, Path], precision: str, folder: Path, *, workspace_mb: int,
                   batch_sizes: list[int], input_shape: tuple[int, int, int]) -> dict[str, Any]:
    ok, reason = trt_backend.tensorrt_status()
    if not ok:
        log.info("TensorRT is not usable here (%s): the engine will be built on the device by the kit "
                 "(kit/build_engine.sh)", reason)
        return {"built": False, "reason": reason, "precision": precision, "kit": "kit/build_engine.sh"}
    engine = folder / f"model.{precision}.engine"
    meta = trt_backend.build_engine(onnx_by_precision[precision], engine, precision=precision,
                                    workspace_mb=workspace_mb, batch_sizes=batch_sizes, input_shape=input_shape,
                                    timing_cache=folder / "timing.cache")
    return {"built": True, "precision": precision, "file": engine.name, **meta}
