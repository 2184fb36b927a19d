"""CIFAR ResNets (He et al. 2016, depth 6n+2) as in the GraSP code.

Three stages of n BasicBlocks at widths (16, 32, 64) x ``width``; a 1x1 conv + BN shortcut where the shape
changes; global average pooling and one Linear. GraSP's "ResNet32" is the 2x-wide variant (32/64/128).
Init as the GraSP code's ``weights_init``: conv kaiming-normal (fan_out, ReLU), linear N(0, 0.01) with zero
bias, BN weight 1 / bias 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from graspext.models.init import grasp_init_
from graspext.nn.layout import norm_add_relu


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        # relu(bn(.)) and relu(bn(.) + shortcut), fused into one op each once the model is sparsified
        out = norm_add_relu(self.bn1, self.conv1(x))
        return norm_add_relu(self.bn2, self.conv2(out), self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 32, num_classes: int = 10, width: int = 1, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        grasp_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = norm_add_relu(self.bn1, self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)


def resnet32_grasp(num_classes: int = 10) -> CifarResNet:
    """The GraSP paper's "ResNet32": 2x wide (stages of 32/64/128 channels)."""
    return CifarResNet(32, num_classes, width=2)
