"""Feature capture for data-driven criteria: post-BN-activation maps of prunable convs.

Forward hooks on the BatchNorm after each prunable conv (``PrunableLayer.bn_name``; the conv
itself when there is none) record ``PrunableLayer.activation(output)`` for a fixed sample set.
Memory stays bounded: the forward runs in sample chunks, captures only the layers asked for,
stops as soon as they are all recorded (the rest of the network is skipped), and
``FeatureCapture`` keeps at most ``max_bytes`` of maps, capturing upcoming layers together in
one pass when they fit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from toolchain.ranking.base import PrunableLayer

__all__ = ["FeatureCapture", "capture_features", "layer_nbytes"]


class _StopForward(Exception):
    """Raised from a hook once every requested layer of the chunk has been recorded."""


def layer_nbytes(layer: PrunableLayer, n: int, itemsize: int = 4) -> int:
    """Bytes of one layer's maps for n samples."""
    h, w = layer.out_hw
    return n * layer.channels * h * w * itemsize


@torch.no_grad()
def capture_features(model: nn.Module, layers: Sequence[PrunableLayer], images: torch.Tensor,
                     indices: Iterable[int], *, batch_size: int = 64,
                     device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
    """Post-BN-activation maps ``(N, C, H, W)`` (float32, on ``device``) of ``layers[i]`` for i in indices.

    One chunked forward pass over ``images``; each chunk stops after the last requested layer.
    """
    indices = sorted(set(int(i) for i in indices))
    if not indices:
        return {}
    device = torch.device(device) if device is not None else images.device
    modules = dict(model.named_modules())
    n = images.shape[0]
    out: dict[int, torch.Tensor] = {}
    state = {"start": 0, "stop": 0, "left": set()}
    handles = []

    def make_hook(i: int, layer: PrunableLayer):
        def hook(_mod, _inp, output):
            if i not in state["left"]:
                return  # a module called twice in one forward: keep the first call
            y = layer.activation(output).detach().to(device=device, dtype=torch.float32)
            if i not in out:
                out[i] = torch.empty((n, *y.shape[1:]), dtype=torch.float32, device=device)
            out[i][state["start"]:state["stop"]] = y
            state["left"].discard(i)
            if not state["left"]:
                raise _StopForward

        return hook

    try:
        for i in indices:
            layer = layers[i]
            target = layer.bn_name if layer.bn_name is not None else layer.name
            if target not in modules:
                raise KeyError(f"module {target!r} of prunable layer {layer.name!r} not found in the model")
            handles.append(modules[target].register_forward_hook(make_hook(i, layer)))
        param = next(model.parameters(), None)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            state.update(start=start, stop=stop, left=set(indices))
            x = images[start:stop]
            if param is not None:
                x = x.to(device=param.device, dtype=param.dtype)
            with contextlib.suppress(_StopForward):
                model(x)
            if state["left"]:
                missing = [layers[i].name for i in sorted(state["left"])]
                raise RuntimeError(f"forward pass never reached layers {missing}")
    finally:
        for h in handles:
            h.remove()
    return out


class FeatureCapture:
    """Lazily captured, memory-bounded feature maps of a model's prunable layers.

    ``get(i, upcoming)`` returns layer i's maps; on a miss it captures i together with as many
    of the ``upcoming`` layers as fit in ``max_bytes`` (one forward pass for the group).
    ``release(i)`` frees a layer. Thread-safe: captures are serialised by a lock, so two
    threads (e.g. the two directions of the bidirectional order) can share one instance.
    """

    def __init__(self, model: nn.Module, layers: Sequence[PrunableLayer], images: torch.Tensor, *,
                 device: torch.device | str | None = None, batch_size: int = 64, max_bytes: int = 256 << 20):
        self.model = model
        self.layers = list(layers)
        self.images = images
        self.device = torch.device(device) if device is not None else images.device
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.passes = 0  # forward passes run so far (for tests and reports)
        self._cache: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def nbytes(self, i: int) -> int:
        return layer_nbytes(self.layers[i], self.images.shape[0])

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())

    def get(self, i: int, upcoming: Sequence[int] = ()) -> torch.Tensor:
        with self._lock:
            if i in self._cache:
                return self._cache[i]
            group, used = [i], self.cached_bytes() + self.nbytes(i)
            for j in upcoming:
                if j in self._cache or j in group:
                    continue
                if used + self.nbytes(j) > self.max_bytes:
                    break
                group.append(j)
                used += self.nbytes(j)
            self._cache.update(capture_features(self.model, self.layers, self.images, group,
                                                batch_size=self.batch_size, device=self.device))
            self.passes += 1
            return self._cache[i]

    def release(self, i: int) -> None:
        with self._lock:
            self._cache.pop(i, None)
