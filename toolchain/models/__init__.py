"""Model registry and factory (timm style): ``create_model(name, num_classes=...)``."""

from __future__ import annotations

from torch import nn

from toolchain.registry import Registry

MODELS: Registry = Registry("model")


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


# Importing the family modules registers them.
from toolchain.models import resnet, vgg  # noqa: E402,F401
