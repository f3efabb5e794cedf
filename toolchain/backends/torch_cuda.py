"""PyTorch on CUDA: eager, ``torch.compile``, and CUDA graphs (no TorchScript).

The model comes from a factory, not a serialized graph:

- in process: ``TorchCudaBackend(factory=lambda: MyNet())`` then ``load(weights_or_None, threads)``;
- through ``benchmark()`` (a child process, so only strings travel): ``model_path`` is
  ``"package.module:callable"`` or ``"package.module:callable@/path/state_dict.pt"``; the callable
  takes no arguments and returns an ``nn.Module``; the optional state dict is loaded with
  ``torch.load(weights_only=True)``.

``infer`` takes a host numpy batch and returns a host numpy array: the timed span includes the
host-to-device copy, the forward pass and the device-to-host copy (which synchronises).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from toolchain.backends.base import BACKENDS, Backend
from toolchain.errors import UserError


def resolve_factory(spec: str) -> tuple[Callable[[], Any], str | None]:
    """ "pkg.mod:fn" or "pkg.mod:fn@weights.pt" -> (callable, weights path or None)."""
    target, _, weights = spec.partition("@")
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"torch model spec {spec!r} must look like 'package.module:factory[@weights.pt]'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r} for model spec {spec!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{module_name!r} has no attribute {attr!r} (model spec {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{spec!r} is not callable")
    return obj, (weights or None)


@BACKENDS.register("torch-cuda")
class TorchCudaBackend(Backend):
    """Eager PyTorch on the first CUDA device."""

    name = "torch-cuda"
    mode: ClassVar[str] = "eager"
    enforces_address_limit = False  # CUDA reserves far more virtual address space than it uses

    def __init__(self, factory: Callable[[], Any] | None = None) -> None:
        self._factory = factory
        self._model: Any = None
        self._run: Callable[[Any], Any] | None = None
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import torch
        except ImportError as e:
            return False, f"torch is not installed ({e})"
        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA"
            return (
                False,
                f"CUDA is not available (torch {torch.__version__}, built with {built}; no GPU visible)",
            )
        return True, ""

    # -- loading ---------------------------------------------------------------------------------------
    def load(self, model_path: str | None, threads: int) -> None:
        import torch

        torch.set_num_threads(int(threads))
        if self._factory is not None:
            factory, weights = self._factory, model_path
        elif model_path is None:
            raise UserError("torch-cuda needs a factory or a 'package.module:factory' model spec")
        elif str(model_path).endswith((".onnx", ".engine", ".plan")):
            raise UserError(
                f"torch-cuda runs PyTorch modules, not {Path(model_path).suffix} files: {model_path}"
            )
        else:
            factory, weights = resolve_factory(str(model_path))
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a training checkpoint dict
            model.load_state_dict(state)
        self._model = model.eval().to("cuda")
        self._run = self._prepare(self._model)
        torch.cuda.reset_peak_memory_stats()

    def _prepare(self, model: Any) -> Callable[[Any], Any]:
        return model

    # -- inference ------------------------------------------------------------------------------------
    def _param_dtype(self) -> Any:
        p = next(self._model.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else None

    def input_dtype(self) -> np.dtype:
        import torch

        dt = self._param_dtype()
        return np.dtype(np.float16) if dt == torch.float16 else np.dtype(np.float32)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).to("cuda", non_blocking=False)
        with torch.inference_mode():
            y = self._run(x)
        if isinstance(y, tuple | list):
            y = y[0]
        return y.float().cpu().numpy()  # .cpu() waits for the kernels

    # -- reporting ------------------------------------------------------------------------------------
    def device(self) -> str:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"

    def versions(self) -> dict[str, str]:
        import torch

        return {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
                "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version()),
                "mode": self.mode}  # fmt: skip

    def threads_used(self) -> int | None:
        import torch

        return torch.get_num_threads()

    def device_peak_bytes(self) -> int:
        import torch

        return int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else 0

    def close(self) -> None:
        self._graphs.clear()
        self._model = self._run = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


@BACKENDS.register("torch-cuda-compile")
class TorchCompileBackend(TorchCudaBackend):
    """``torch.compile`` (Inductor, default mode); the first call per shape compiles (warm-up)."""

    name = "torch-cuda-compile"
    mode = "compile"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        if importlib.util.find_spec("triton") is None:
            return False, "torch.compile on CUDA needs triton, which is not installed"
        return True, ""

    def _prepare(self, model: Any) -> Callable[[Any], Any]:
        import torch

        return torch.compile(model)


@BACKENDS.register("torch-cuda-graph")
class TorchCudaGraphBackend(TorchCudaBackend):
    """Eager module captured into one CUDA graph per input shape, replayed on static buffers."""

    name = "torch-cuda-graph"
    mode = "cuda-graph"

    def _prepare(self, model: Any) -> Callable[[Any], Any]:
        return self._replay

    def _replay(self, x: Any) -> Any:
        import torch

        key = (*x.shape, str(x.dtype))
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):  # warm up cuDNN autotuning / lazy init outside the capture
                    self._model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_out = self._model(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).to("cuda")
        y = self._replay(x)  # capture happens outside inference_mode (graph-captured tensors)
        if isinstance(y, tuple | list):
            y = y[0]
        return y.float().cpu().numpy()
