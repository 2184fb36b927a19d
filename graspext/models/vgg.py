"""CIFAR VGG with BatchNorm as in the GraSP code (``models/base/vgg.py``).

Convs without bias, BN, ReLU, max-pooling per stage; then ``AvgPool2d(2)`` and one ``Linear(512, classes)``.
Init: conv kaiming-normal (fan_out, ReLU), linear N(0, 0.01) with zero bias, BN weight 1 / bias 0.
"""

from __future__ import annotations

from torch import nn

from graspext.models.init import grasp_init_

CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, depth: int = 19, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth not in CFGS:
            raise ValueError(f"depth must be one of {sorted(CFGS)}, got {depth}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Linear(c, num_classes)
        grasp_init_(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg11_bn(num_classes: int = 10) -> VGG:
    return VGG(11, num_classes)


def vgg13_bn(num_classes: int = 10) -> VGG:
    return VGG(13, num_classes)


def vgg16_bn(num_classes: int = 10) -> VGG:
    return VGG(16, num_classes)


def vgg19_bn(num_classes: int = 10) -> VGG:
    return VGG(19, num_classes)
