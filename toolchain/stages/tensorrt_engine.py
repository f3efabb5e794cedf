"""Engine stage: build the TensorRT engine here when TensorRT and a CUDA GPU are present; otherwise
say so once, plainly: the bundle's kit builds it on the device (engines are tied to the GPU model
and TensorRT version that built them, so a Jetson engine cannot be built on an x86 host anyway)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.backends import tensorrt as trt_backend
from toolchain.stages import quantize
from toolchain.stages.base import StageContext

log = logging.getLogger("build_edge")
NAME = "engine"


@dataclass(frozen=True)
class Inputs:
    export: str  # digest (the fp32 ONNX)
    quantize: str  # digest (the int8 and fp16 ONNX)
    precision: str
    batch_sizes: tuple[int, ...]  # the optimisation profile spans them
    workspace_mb: int


@dataclass
class Result:
    built: bool
    precision: str
    file: str | None = None  # the engine's name in the stage folder, when built
    details: dict[str, Any] = field(default_factory=dict)  # why not built and where the kit builds it, or the
    # build's metadata (TensorRT version, GPU, flags, profile, timings)

    def to_manifest(self) -> dict[str, Any]:
        return {"built": self.built, "precision": self.precision, **({"file": self.file} if self.file else {}),
                **self.details}


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    onnx = quantize.onnx_files(ctx, inputs.export, inputs.quantize, ctx.result(quantize, inputs.quantize))
    info = build_or_defer(onnx, inputs.precision, folder, workspace_mb=inputs.workspace_mb,
                          batch_sizes=list(inputs.batch_sizes), input_shape=ctx.data.input_shape)
    built, precision, file = info.pop("built"), info.pop("precision"), info.pop("file", None)
    return Result(built=built, precision=precision, file=file, details=info)


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
