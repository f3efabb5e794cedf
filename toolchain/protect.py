"""Protected layers (``--protect``): prunable convs that keep every channel whatever the ratio or budget.

The spec is ``auto`` (default), ``none``, ``stem`` or a comma list of prunable layer names, fnmatch
patterns over them and ``stem``. It is resolved against the model's prunable layers in preflight,
and the prune stage's key holds the resolved names only when there are any, so runs that protect
nothing (every built-in model under ``auto``) keep their earlier keys.

``stem`` is the first conv in execution order, the one that reads the image, when it owns a
prunable group that is not a residual stream. Every later layer builds on the stem's few channels,
and cutting them saves little (its convolution has 3 input channels), so it is kept whole by
default, as the classifier is (never pruned: a linear layer's outputs are not prunable,
``toolchain.stages.prune``). When its channels are a residual
stream (torchvision's resnet18: ``conv1`` is added to layer1's block outputs) protecting it keeps
the whole stream, all of layer1, whole: at 64x64 and ``--keep-ratio 0.5`` resnet18 would keep
0.371 of its FLOPs instead of 0.266, so that group stays prunable.
With the stem protected mobilenet_v2 keeps 0.306 instead of 0.276, efficientnet_b0 0.302 instead
of 0.279 and resnet50 0.276 instead of 0.257 (toolchain.cost.CostModel).

``auto`` is ``stem`` for models from ``torchvision:``, ``timm:`` and import paths, and ``none`` for
the built-in CIFAR models: every VGG16 figure in docs/ was measured with the built-in stem pruned and
stays reproducible by the same command.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

from toolchain.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from toolchain.ranking.base import PrunableLayer

WORDS = ("auto", "none", "stem")


def _items(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",") if item.strip()]


def check_spec(spec: str) -> None:
    """The spec's form (the layer names are checked against the model in preflight, ``resolve``)."""
    items = _items(spec)
    if not items:
        raise UserError("protect must be auto, none, stem or a comma list of prunable layer names or patterns, "
                        f"got {spec!r}")
    for word in ("auto", "none"):
        if word in items and len(items) > 1:
            raise UserError(f"protect: {word} stands alone, got {spec!r}")


def stem(model: nn.Module, example: torch.Tensor, layers: Sequence[PrunableLayer]) -> str | None:
    """The prunable layer the stem is (module docstring), or None: the first conv run on `example` reads the
    image, owns a prunable group and that group is not a residual stream."""
    from torch import nn

    from toolchain.compensation import consumer_order

    convs = consumer_order(model, example, {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)})
    first = model.get_submodule(convs[0]) if convs else None
    if first is None or first.in_channels != example.shape[1]:
        return None
    layer = next((layer for layer in layers if layer.conv is first), None)
    return layer.name if layer is not None and not layer.residual else None


def resolve(spec: str, model_name: str, model: nn.Module, example: torch.Tensor,
            layers: Sequence[PrunableLayer]) -> list[str]:
    """The protected layers' names, in network order; UserError for a name or pattern that matches no prunable
    layer (the message lists them)."""
    check_spec(spec)
    items = _items(spec)
    if items == ["auto"]:
        items = ["stem"] if ":" in model_name else []  # torchvision:, timm: and import paths; not built-ins
    if items == ["none"]:
        return []
    names = [layer.name for layer in layers]
    chosen: set[str] = set()
    for item in items:
        if item == "stem":
            found = stem(model, example, layers)
            chosen.update([found] if found else [])
            continue
        matched = [n for n in names if fnmatch.fnmatchcase(n, item)]
        if not matched:
            raise UserError(f"protect: {item!r} matches no prunable layer of {model_name}; its prunable layers: "
                            f"{', '.join(names)}")
        chosen.update(matched)
    return [n for n in names if n in chosen]
