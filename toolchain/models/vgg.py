"""VGG for 32x32 inputs: torchvision's feature layers, one linear classifier, no avgpool.

State-dict layout matches ../shared/models/vgg16_bn_cifar10.pt: ``features.*`` from
``torchvision.models.vgg.make_layers(cfgs[...], batch_norm=True)`` and ``classifier`` a
``Linear(512, num_classes)``. ``vgg11_bn_half`` has half the channels of every conv.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from toolchain.models import MODELS


class CifarVGG(nn.Module):
    def __init__(self, cfg: str, num_classes: int = 10, batch_norm: bool = True, width: float = 1.0):
        super().__init__()
        layers = [v if v == "M" else max(1, round(v * width)) for v in cfgs[cfg]]
        self.features = make_layers(layers, batch_norm=batch_norm)
        self.classifier = nn.Linear(layers[-2], num_classes)
        for m in self.modules():  # torchvision's VGG init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


for _name, _cfg in (("vgg11_bn", "A"), ("vgg13_bn", "B"), ("vgg16_bn", "D"), ("vgg19_bn", "E")):
    MODELS.register(_name)(lambda num_classes=10, _cfg=_cfg: CifarVGG(_cfg, num_classes))
# half the channels of every conv (a quarter of the FLOPs): the demo's model, small enough for minutes on a CPU
MODELS.register("vgg11_bn_half")(lambda num_classes=10: CifarVGG("A", num_classes, width=0.5))
