"""INT8 calibration and deployable ONNX variants, shipped as ``toolchain.calibration``.

- :func:`select_calibration_set`: class-balanced, seeded, sorted training indices (the bundle lists them).
- :class:`ImageCalibrationReader`: ONNX Runtime calibration reader over normalised float32 NCHW images.
- :func:`quantize_int8`: symmetric INT8 Q/DQ ONNX (per-channel weights, zero points 0) for TensorRT's
  explicit quantization and ONNX Runtime; :func:`inspect_qdq` reports what is in one.
- :func:`activation_scales_from_qdq`, :func:`write_trt_calibration_cache`,
  :func:`read_trt_calibration_cache`: the TensorRT calibration cache (implicit INT8, TensorRT <= 10).
- :func:`evaluate_onnx`: top-1 accuracy with ONNX Runtime (CPU).
- :func:`to_fp16_onnx`: FP16 ONNX with FP32 inputs/outputs, TensorRT 11's FP16 path.
"""

from .evaluate import MODES as EVALUATION_MODES
from .evaluate import evaluate_onnx
from .qdq import (
    METHODS,
    activation_scales_from_model,
    activation_scales_from_qdq,
    inspect_qdq,
    quantize_int8,
    to_fp16_onnx,
)
from .selection import ImageCalibrationReader, check_images, select_calibration_set
from .trt_cache import (
    hex_to_scale,
    read_trt_calibration_cache,
    read_trt_calibration_cache_header,
    scale_to_hex,
    trt_version_number,
    write_trt_calibration_cache,
)

__all__ = [
    "EVALUATION_MODES", "METHODS", "ImageCalibrationReader", "activation_scales_from_model",
    "activation_scales_from_qdq", "check_images", "evaluate_onnx", "hex_to_scale", "inspect_qdq", "quantize_int8",
    "read_trt_calibration_cache", "read_trt_calibration_cache_header", "scale_to_hex",
    "select_calibration_set", "to_fp16_onnx", "trt_version_number", "write_trt_calibration_cache",
]  # fmt: skip
