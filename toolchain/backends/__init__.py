"""Benchmark backends behind one interface (see ``base.py``); libraries are imported lazily, so a
missing one only makes its backend report itself unavailable."""

from __future__ import annotations

import importlib
import importlib.util

from toolchain.backends.base import BACKENDS, Backend, BatchStats, BenchResult, benchmark, make_input

# registration side effects; each module imports its library only when used
from toolchain.backends import onnxruntime as _onnxruntime  # noqa: F401, E402  isort: skip
from toolchain.backends import torch_cuda as _torch_cuda  # noqa: F401, E402  isort: skip

# TensorRT lives in its own module (written separately); register it when it is there
if importlib.util.find_spec("toolchain.backends.tensorrt") is not None:
    importlib.import_module("toolchain.backends.tensorrt")


def available_backends() -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) for every registered backend."""
    return {name: BACKENDS.get(name).available() for name in BACKENDS.names()}


__all__ = [
    "BACKENDS",
    "Backend",
    "BatchStats",
    "BenchResult",
    "available_backends",
    "benchmark",
    "make_input",
]
