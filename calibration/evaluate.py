"""Top-1 accuracy of an ONNX model (FP32, FP16 or Q/DQ INT8) with ONNX Runtime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import UserError

from .selection import check_images

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
MODES = ("reference", "host")


def evaluate_onnx(onnx_path: Path, images_f32: np.ndarray, labels: np.ndarray, batch: int = 256,
                  threads: int | None = None, *, mode: str = "reference") -> float:
    """Fraction of `images_f32` (normalised float32 NCHW) whose arg-max logit equals `labels`, in [0, 1].

    `mode` matters for Q/DQ models only:

    - ``"reference"`` (default): basic graph optimisations only, so every QuantizeLinear/DequantizeLinear
      runs as written: activations and weights are rounded to the int8 grid and the arithmetic is exact,
      as in TensorRT's INT8 kernels (int32 accumulation). This is the accuracy the INT8 engine should have.
    - ``"host"``: all optimisations, so ONNX Runtime fuses Q/DQ into its own int8 kernels on this CPU.
      On x86 CPUs without VNNI (AVX2/AVX-512 only) those use VPMADDUBSW, whose 16-bit partial sums
      saturate: accuracy can fall far below the reference (seen here: 85% -> 51% on a small CNN; the digits
      demo 98.89% -> 86.11%, and 98.89% again with its weights in 7 bits, where the sums cannot saturate).
    """
    import onnxruntime as ort

    if mode not in MODES:
        raise UserError(f"unknown evaluation mode {mode!r}; valid: {', '.join(MODES)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model {str(onnx_path)!r} not found")
    images = check_images(images_f32, "evaluation images")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise UserError(f"{len(images)} evaluation images but {len(labels)} labels")
    if batch <= 0:
        raise UserError(f"evaluation batch must be positive, got {batch}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_BASIC if mode == "reference" else level.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = _ORT_FLOAT_TYPES.get(inp.type, np.float32)
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch
    correct = 0
    for start in range(0, len(images), step):
        x = images[start:start + step].astype(dtype, copy=False)
        n = len(x)
        if fixed and n < fixed:  # pad the last batch of a fixed-batch model, score only the real rows
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        logits = sess.run(None, {inp.name: x})[0]
        correct += int((np.asarray(logits)[:n].argmax(axis=1) == labels[start:start + n]).sum())
    return correct / len(images)
