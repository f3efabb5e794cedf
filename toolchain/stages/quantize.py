"""Quantize stage: symmetric INT8 Q/DQ ONNX (TensorRT explicit quantization), its TensorRT calibration
cache, and a FP16 ONNX (TensorRT 11's FP16 path), with accuracy measured by ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import calibration
from toolchain.data import Dataset
from toolchain.stages.base import OMIT_IF_NONE, StageContext
from toolchain.util import atomic_write_json

NAME = "quantize"


@dataclass(frozen=True)
class Inputs:
    export: str  # digest
    samples: int  # class-balanced calibration images from the training split
    method: str
    seed: int
    tensorrt_version: str  # the calibration cache's header names it
    fp16: bool  # the target computes FP16: write and check model.fp16.onnx too
    # 7: weights in [-64, 64] (the target profile's int8_weight_bits); None: 8 bits (keys from before)
    weight_bits: int | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class Result:
    quantization: dict[str, Any]
    acc_int8: float
    acc_int8_host: float
    files: list[str]
    acc_fp16: float | None = None


def run(inputs: Inputs, ctx: StageContext, folder: Path) -> Result:
    fp32 = ctx.folder("export", inputs.export) / "pruned.onnx"
    return Result(**quantize(fp32, ctx.data, folder, samples=inputs.samples, method=inputs.method, seed=inputs.seed,
                             tensorrt_version=inputs.tensorrt_version, fp16=inputs.fp16,
                             weight_bits=inputs.weight_bits or 8))


def onnx_files(ctx: StageContext, export: str, quantize_digest: str, result: Result) -> dict[str, Path]:
    """The deployable ONNX file of each precision: fp32 from the export stage, int8 (and fp16) from this one."""
    files = {"fp32": ctx.folder("export", export) / "pruned.onnx",
             "int8": ctx.folder(NAME, quantize_digest) / "model.int8.onnx"}
    if "model.fp16.onnx" in result.files:
        files["fp16"] = ctx.folder(NAME, quantize_digest) / "model.fp16.onnx"
    return files


def quantize(fp32_onnx: Path, data: Dataset, folder: Path, *, samples: int, method: str, seed: int,
             tensorrt_version: str, fp16: bool, weight_bits: int = 8) -> dict[str, Any]:
    """Writes model.int8.onnx, calibration.cache, calibration.json (and model.fp16.onnx) into `folder`.

    ``weight_bits`` 7 quantizes the weights to [-64, 64] (ONNX Runtime's ``reduce_range``): for targets that run
    int8 in ONNX Runtime on x86 CPUs without VNNI, where full-range weights saturate the kernels' 16-bit sums."""
    idx = calibration.select_calibration_set(data.train.labels.numpy(), n=samples, seed=seed)
    images = data.normalize(data.train.images[idx]).numpy().astype(np.float32)
    int8_path = folder / "model.int8.onnx"
    info = calibration.quantize_int8(fp32_onnx, int8_path, images, method=method, per_channel=True,
                                     reduce_range=weight_bits == 7)
    scales = calibration.activation_scales_from_qdq(int8_path)
    calibration.write_trt_calibration_cache(scales, folder / "calibration.cache", trt_version=tensorrt_version)
    atomic_write_json(folder / "calibration.json", {"split": "train", "indices": idx.tolist(), "seed": seed,
                                                    "method": method, "images": len(idx)})
    test_images = data.normalize(data.test.images).numpy().astype(np.float32)
    labels = data.test.labels.numpy()
    result = {
        "quantization": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        # exact int8 arithmetic, as TensorRT's kernels compute it
        "acc_int8": calibration.evaluate_onnx(int8_path, test_images, labels, mode="reference"),
        # ONNX Runtime's fused int8 kernels on this host (saturate on x86 CPUs without VNNI)
        "acc_int8_host": calibration.evaluate_onnx(int8_path, test_images, labels, mode="host"),
        "files": ["model.int8.onnx", "calibration.cache", "calibration.json"],
    }
    if fp16:
        calibration.to_fp16_onnx(fp32_onnx, folder / "model.fp16.onnx")
        result["acc_fp16"] = calibration.evaluate_onnx(folder / "model.fp16.onnx", test_images, labels)
        result["files"].append("model.fp16.onnx")
    return result
