"""INT8 Q/DQ ONNX for TensorRT (explicit quantization) and ONNX Runtime, and the FP16 ONNX for TensorRT 11.

TensorRT takes only symmetric quantization (every zero point 0), per-tensor activations and
per-output-channel weights, and cannot parse a DequantizeLinear of an int32 bias ("only activation
types allowed as input to this layer"), so biases stay float (``QuantizeBias: False``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from toolchain.errors import UserError

from .selection import ImageCalibrationReader, check_images

log = logging.getLogger("build_edge")

METHODS = ("minmax", "entropy", "percentile")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # ORT renames a quantized graph output's producer tensor


@contextmanager
def _atomic_path(out: Path) -> Iterator[Path]:
    """A temporary path beside `out` that is renamed onto `out` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model {str(path)!r} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"cannot read ONNX model {str(path)!r}: {e}") from None


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"expected an image model with one input, found {len(inputs)}: {[i.name for i in inputs]}")
    return inputs[0]


def _fixed_batch(value_info: onnx.ValueInfoProto) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def inspect_qdq(onnx_path: Path) -> dict[str, Any]:
    """Facts about a Q/DQ model: node counts, zero points, per-channel weights, what TensorRT would refuse."""
    model = _load(onnx_path)
    consts = _constants(model)
    ops = Counter(n.op_type for n in model.graph.node)
    zero_points: list[np.ndarray] = []
    weight_scales: dict[str, int] = {}  # quantized weight initializer -> number of scales
    activation_scales = activation_scales_from_model(model)
    int32_dq: list[str] = []
    for node in model.graph.node:
        if node.op_type not in _QDQ_OPS:
            continue
        if len(node.input) > 2 and node.input[2]:
            zero_points.append(np.asarray(consts[node.input[2]]))
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            data = consts[node.input[0]]
            if data.dtype == np.int32:
                int32_dq.append(node.input[0])
            else:
                weight_scales[node.input[0]] = int(np.asarray(consts[node.input[1]]).size)
    zp_dtypes = sorted({str(z.dtype) for z in zero_points})
    return {
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "ops": dict(sorted(ops.items())),
        "zero_points": len(zero_points),
        "nonzero_zero_points": int(sum(int(np.count_nonzero(z)) for z in zero_points)),
        "zero_point_dtypes": zp_dtypes,
        "quantized_weights": len(weight_scales),
        "per_channel_weights": sum(1 for n in weight_scales.values() if n > 1),
        "per_tensor_weights": sum(1 for n in weight_scales.values() if n == 1),
        "activation_tensors": len(activation_scales),
        "int32_dequantize": int32_dq,
    }


def activation_scales_from_model(model: onnx.ModelProto) -> dict[str, float]:
    """{tensor name: scale} for every per-tensor QuantizeLinear on an activation (not on a weight)."""
    consts = _constants(model)
    scales: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue
        scale = np.asarray(consts.get(node.input[1], np.array([])))
        if scale.size != 1:
            continue  # per-channel or computed at run time: not an activation range TensorRT caches
        name = node.input[0]
        if name.endswith(_QUANT_INPUT_SUFFIX):
            name = name[: -len(_QUANT_INPUT_SUFFIX)]
        scales[name] = float(np.float32(scale.reshape(())))
    return scales


def activation_scales_from_qdq(onnx_path: Path) -> dict[str, float]:
    """Activation scales of a Q/DQ model, keyed by the original (float) tensor each QuantizeLinear quantizes."""
    return activation_scales_from_model(_load(onnx_path))


ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128  # TensorRT's EntropyCalibration2 histogram


def _entropy_ranges(model_path: Path, reader: ImageCalibrationReader, work: Path,
                    bins: int = ENTROPY_BINS) -> dict[str, list[dict]]:
    """{tensor: [{"rmin", "rmax"}]}: symmetric KL-divergence thresholds of every activation ONNX Runtime calibrates."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(
        Path(model_path), [], augmented_model_path=str(work / "entropy_augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
        extra_options={"symmetric": True, "num_bins": bins, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )  # fmt: skip
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    overrides: dict[str, list[dict]] = {}
    for name in ranges:
        lo, hi = ranges[name].range_value
        amax = max(abs(float(np.asarray(lo).reshape(-1)[0])), abs(float(np.asarray(hi).reshape(-1)[0])))
        if amax > 0 and np.isfinite(amax):
            overrides[name] = [{"rmin": np.float32(-amax), "rmax": np.float32(amax)}]
    return overrides


def _preprocessed(fp32_onnx: Path, work: Path, info: dict[str, Any]) -> Path:
    """``quant_pre_process`` (shape inference + graph optimisation) into `work`; the model as is if it fails
    (shape inference can fail on exotic graphs), with the reason in `info`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "preprocessed.onnx"
    try:
        quant_pre_process(str(fp32_onnx), str(pre))
        return pre
    except Exception as e:  # noqa: BLE001 - whatever it raises, quantizing the model as is still works
        info["preprocess_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        log.warning("quant_pre_process failed (%s); quantizing the model as is", info["preprocess_error"])
        return fp32_onnx


def quantize_int8(fp32_onnx: Path, out_onnx: Path, images: np.ndarray, method: str = "minmax",
                  per_channel: bool = True, *, batch_size: int = 32, preprocess: bool = True,
                  reduce_range: bool = False, nodes_to_exclude: list[str] | None = None,
                  entropy_bins: int = ENTROPY_BINS) -> dict[str, Any]:
    """Symmetric INT8 Q/DQ ONNX of `fp32_onnx`, calibrated on `images` (normalised float32 NCHW).

    Weights per output channel (with `per_channel`), activations per tensor, int8 with zero points 0,
    biases left in float. `method`: minmax, entropy or percentile (ONNX Runtime's calibrators).
    Runs ``quant_pre_process`` (shape inference + graph optimisation) first when `preprocess`; if it fails,
    quantizes the model as is and says so in the returned info. Writes `out_onnx` atomically.

    `entropy_bins`: histogram bins of the entropy method (TensorRT: 2048; its cost grows with the square).
    `reduce_range` (7-bit weights) is only for ONNX Runtime on x86 CPUs without VNNI, whose fused int8
    kernels (VPMADDUBSW) saturate 16-bit partial sums; it costs precision and TensorRT does not need it.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise UserError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    images = check_images(images)
    model = _load(fp32_onnx)
    graph_input = _graph_input(model)
    fixed = _fixed_batch(graph_input)
    if fixed is not None:  # a static batch axis: feed exactly that many images per run
        if len(images) < fixed:
            raise UserError(f"{fp32_onnx.name} has a fixed batch of {fixed} but only {len(images)} "
                            "calibration images were given")
        batch_size = fixed
        images = images[: len(images) // fixed * fixed]
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    extra_options: dict[str, Any] = {
        "ActivationSymmetric": True,  # zero point 0: TensorRT rejects anything else
        "WeightSymmetric": True,
        "QuantizeBias": False,  # TensorRT cannot take a DequantizeLinear of an int32 bias
    }
    if method == "percentile":
        extra_options["CalibTensorRangeSymmetric"] = True

    info: dict[str, Any] = {"method": method, "per_channel": per_channel, "reduce_range": reduce_range,
                            "entropy_bins": entropy_bins if method == "entropy" else None,
                            "images": int(len(images)), "batch_size": int(batch_size), "input": graph_input.name}
    with tempfile.TemporaryDirectory(prefix="build-edge-quant-") as work:
        source = _preprocessed(fp32_onnx, Path(work), info) if preprocess else fp32_onnx
        info["preprocessed"] = source != fp32_onnx
        reader = ImageCalibrationReader(images, graph_input.name, batch_size)
        if method == "entropy":
            # ONNX Runtime's entropy calibrator defaults to 128 histogram bins for 128 quantized bins: one
            # candidate threshold, i.e. min-max. Run it with TensorRT's EntropyCalibration2 setting (2048 bins
            # folded to 128 levels) and hand the thresholds over as overrides of a min-max pass.
            if entropy_bins < 2 * ENTROPY_QUANTIZED_BINS:
                raise UserError(f"entropy calibration needs at least {2 * ENTROPY_QUANTIZED_BINS} bins")
            extra_options["TensorQuantOverrides"] = _entropy_ranges(source, reader, Path(work), entropy_bins)
            reader.rewind()
            calibrate_method = CalibrationMethod.MinMax
        with _atomic_path(out_onnx) as tmp:
            quantize_static(
                str(source), str(tmp), reader,
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method, nodes_to_exclude=nodes_to_exclude or [],
                calibration_providers=["CPUExecutionProvider"], extra_options=extra_options,
            )  # fmt: skip
            onnx.checker.check_model(str(tmp))
            report = inspect_qdq(tmp)
            if report["nonzero_zero_points"]:
                raise RuntimeError(f"quantize_static wrote {report['nonzero_zero_points']} non-zero zero points")
    info.update(report)
    info["bytes"] = out_onnx.stat().st_size
    return info


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs.

    ``convert_float_to_float16(keep_io_types=True)`` appends its input Casts at the end of the node list;
    ONNX Runtime copes, but the ONNX checker and TensorRT's ONNX parser need a sorted graph.
    """
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:  # a cycle or an input nobody produces: keep the rest as it was, the checker will say
            ordered += pending
            break
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            ordered.append(n)
            known.update(n.output)
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def to_fp16_onnx(in_onnx: Path, out_onnx: Path) -> dict[str, Any]:
    """FP16 weights and activations (inputs/outputs stay FP32, Cast at the edges): TensorRT 11's FP16 path."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    in_onnx, out_onnx = Path(in_onnx), Path(out_onnx)
    model = _load(in_onnx)
    fp32_inits = sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    half = convert_float_to_float16(model, keep_io_types=True)
    topological_sort(half.graph)
    onnx.checker.check_model(half)
    with _atomic_path(out_onnx) as tmp:
        onnx.save(half, str(tmp))
    fp16_inits = sum(1 for i in half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
    return {"fp32_initializers": fp32_inits, "fp16_initializers": fp16_inits,
            "casts": sum(1 for n in half.graph.node if n.op_type == "Cast"), "bytes": out_onnx.stat().st_size}
