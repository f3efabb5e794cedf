"""TensorRT INT8 calibration cache (the text file an IInt8EntropyCalibrator2 writes), from Q/DQ scales.

Format, as TensorRT writes it and as ONNX Runtime's TensorRT provider reads it (``ReadDynamicRange``)::

    TRT-100300-EntropyCalibration2
    input: 3c010204
    relu: 3d2e8a1f

Line 1 is ``TRT-<NV_TENSORRT_VERSION>-<algorithm>``; NV_TENSORRT_VERSION is
``major*1000 + minor*100 + patch`` up to TensorRT 9 (8.6.1 -> 8601) and
``major*10000 + minor*100 + patch`` from TensorRT 10 on (10.3.0 -> 100300, 10.14.1 -> 101401).
Each further line is ``<tensor name>: <scale>`` where the scale is the IEEE-754 float32 bit pattern
in hexadecimal, most significant byte first; the dynamic range TensorRT uses is ``scale * 127``.
The header ties the cache to one TensorRT version: another version rejects it and recalibrates.

The cache matters for TensorRT's implicit-quantization path (``trtexec --int8 --calib=...`` on
TensorRT <= 10, deprecated since 10.1, removed in 11); the Q/DQ ONNX is the portable path.
"""

from __future__ import annotations

import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

from toolchain.errors import UserError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


def trt_version_number(version: str) -> int:
    """NV_TENSORRT_VERSION of a version string: "10.3.0" -> 100300, "8.6.1.6" -> 8601."""
    parts = str(version).strip().split(".")
    try:
        major, minor, patch = (int(p) for p in (parts + ["0", "0"])[:3])
    except ValueError:
        raise UserError(f"TensorRT version must look like 10.3.0, got {version!r}") from None
    if major >= 10:
        return major * 10000 + minor * 100 + patch
    return major * 1000 + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    """The float32 bit pattern of `scale`, big-endian, as 8 lower-case hex digits (1.0 -> "3f800000")."""
    try:
        return struct.pack(">f", scale).hex()
    except OverflowError:
        raise ValueError(f"scale {scale} does not fit in a float32") from None


def hex_to_scale(text: str) -> float:
    """Inverse of :func:`scale_to_hex`; accepts fewer than 8 digits ("0" for a zero scale), as TensorRT may."""
    value = int(text, 16)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a 32-bit hex value")
    return float(struct.unpack(">f", value.to_bytes(4, "big"))[0])


def write_trt_calibration_cache(scales: Mapping[str, float], path: Path, trt_version: str = "10.3.0",
                                algorithm: str = "EntropyCalibration2") -> Path:
    """Write `scales` (tensor name -> float32 scale, ``amax / 127``) as a TensorRT calibration cache."""
    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown calibration algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    lines = [f"TRT-{trt_version_number(trt_version)}-{algorithm}"]
    for name, scale in scales.items():
        if not name or "\n" in name or "\r" in name:
            raise ValueError(f"tensor name {name!r} cannot be written to a calibration cache")
        scale = float(scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale of {name!r} must be finite and >= 0, got {scale}")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_trt_calibration_cache_header(path: Path) -> tuple[int, str]:
    """(NV_TENSORRT_VERSION, algorithm) from a cache's first line."""
    first = _read_lines(Path(path))[0]
    match = _HEADER.match(first)
    assert match is not None  # _read_lines checked it
    return int(match.group(1)), match.group(2)


def read_trt_calibration_cache(path: Path) -> dict[str, float]:
    """{tensor name: scale} from a TensorRT calibration cache; UserError if it is not one."""
    path = Path(path)
    scales: dict[str, float] = {}
    for number, line in enumerate(_read_lines(path)[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError("no 'name: hex' pair")
            scales[name] = hex_to_scale(value.strip())
        except ValueError:
            raise UserError(f"{path}: line {number} is not 'tensor: hexscale': {line[:80]!r}") from None
    return scales


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"calibration cache {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read calibration cache {str(path)!r}: {e}") from None
    lines = text.splitlines()
    if not lines or not _HEADER.match(lines[0].strip()):
        raise UserError(f"{path} is not a TensorRT calibration cache (first line should be like "
                        "TRT-100300-EntropyCalibration2)")
    lines[0] = lines[0].strip()
    return lines
