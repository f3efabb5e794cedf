"""torchvision ResNets with the usual CIFAR stem (3x3 stride-1 conv, no max-pool)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet34

from toolchain.models import MODELS


def _cifar_stem(model: nn.Module) -> nn.Module:
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS.register("resnet18")(lambda num_classes=10: _cifar_stem(resnet18(num_classes=num_classes)))
MODELS.register("resnet34")(lambda num_classes=10: _cifar_stem(resnet34(num_classes=num_classes)))
