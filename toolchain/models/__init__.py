"""Model registry and factory (timm style): ``create_model(name, num_classes=...)``.

``name`` is one of four things, and the string alone rebuilds the model in a fresh process (the
bundle records it, ``load_pruned_model`` reads it back):

- a built-in name (``vgg16_bn``, ``resnet18``: the CIFAR-stem models registered below);
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=...)`` (timm is an
  optional extra);
- ``package.module:factory``: an import path to a function returning an ``nn.Module``, called with
  ``num_classes`` when its signature takes it.

Weights never download here: a user's pretrained weights come in through ``--checkpoint``. When its
head was trained for other classes (``--num-classes``: an ImageNet checkpoint brought to 10 classes),
the model is built with that head so the checkpoint loads weights-only, and ``replace_head`` swaps
it for a fresh one with the data's classes; the baseline stage then trains it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from toolchain.errors import UserError
from toolchain.registry import Registry

MODELS: Registry = Registry("model")
SOURCES: Registry = Registry("model source")  # prefix before ':' -> builder(name, num_classes)
IMAGENET_SOURCES = ("torchvision", "timm")  # their models expect ImageNet normalisation


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if ":" not in name:
        return MODELS.get(name)(num_classes=num_classes, **kwargs)
    prefix, _, rest = name.partition(":")
    if not prefix or not rest:
        raise UserError(f"model {name!r}: expected SOURCE:NAME (torchvision:resnet18, timm:NAME) or "
                        "package.module:factory")
    build = SOURCES.get(prefix) if prefix in SOURCES else _import_path_builder(prefix)
    model = build(rest, num_classes)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r} built a {type(model).__name__}, not a torch nn.Module")
    return model


def default_normalization(name: str) -> str:
    """The normalisation ``--normalization auto`` means for model `name`: ImageNet statistics for
    torchvision and timm models (what their weights were trained with), else the dataset's own."""
    return "imagenet" if name.partition(":")[0] in IMAGENET_SOURCES and ":" in name else "auto"


def replace_head(model: nn.Module, name: str, *, head_classes: int, num_classes: int) -> nn.Module:
    """Swap `model`'s `head_classes`-way classifier for a fresh `num_classes`-way one, in place: timm's
    ``reset_classifier``, else the last ``nn.Linear`` with `head_classes` outputs, replaced in its parent."""
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return model
    heads = [(path, m) for path, m in model.named_modules()
             if path and isinstance(m, nn.Linear) and m.out_features == head_classes]
    if not heads:
        raise UserError(f"model {name}: no classifier to replace (no nn.Linear with {head_classes} outputs, "
                        f"--num-classes); save the checkpoint with a head for the data's {num_classes} classes")
    path, old = heads[-1]
    parent, _, attr = path.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


@SOURCES.register("torchvision")
def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise UserError(f"unknown torchvision model {name!r}; torchvision {torchvision.__version__} has "
                        f"{len(torchvision.models.list_models())} (torchvision.models.list_models())")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@SOURCES.register("timm")
def _timm(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need timm: pip install timm (or the build-edge[timm] extra)") from None
    if name not in timm.list_models():
        raise UserError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _import_path_builder(module_name: str) -> Callable[[str, int], nn.Module]:
    def build(attr: str, num_classes: int) -> nn.Module:
        path = f"{module_name}:{attr}"
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - a user's module can fail in any way on import
            raise UserError(f"model {path}: cannot import {module_name}: {type(e).__name__}: {e}") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UserError(f"model {path}: {module_name} has no callable {attr!r}")
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        try:
            return factory(num_classes=num_classes) if takes else factory()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"model {path}: the factory failed: {type(e).__name__}: {e}") from None

    return build


# Importing the family modules registers them.
from toolchain.models import resnet, vgg  # noqa: E402,F401
