"""CIFAR Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), WRN-d-k.

A 3x3 stem conv to 16 channels, three groups of (d-4)/6 pre-activation basic blocks
(BN-ReLU-conv3x3-BN-ReLU-conv3x3) at widths (16k, 32k, 64k) with strides (1, 2, 2), a 1x1 conv shortcut
(no BN) where the shape changes, a final BN-ReLU, global average pooling and one Linear. WRN-22-2 is the
CIFAR-10 model of RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners").
Init as the other registry models (the GraSP code's ``weights_init``): conv kaiming-normal (fan_out, ReLU),
linear N(0, 0.01) with zero bias, BN weight 1 / bias 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from graspext.models.init import grasp_init_
from graspext.nn.layout import norm_add_relu


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # WRN puts dropout between the two convs of a block
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # relu(bn(.)) through norm_add_relu: one fused op once the model is sparsified; its output is a new
        # tensor, so x itself (the identity shortcut, and saved by bn1 for backward) is never written.
        act = norm_add_relu(self.bn1, x)
        # As in the WRN code, a projection shortcut reads the pre-activated input, the identity the raw one.
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = norm_add_relu(self.bn2, self.conv1(act))
        # Out-of-place sum: the residual stream is the next block's input and a sparse layer's output may have
        # batch-innermost strides.
        return self.conv2(self.dropout(out)) + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int = 22, widen_factor: int = 2, num_classes: int = 10, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be an int >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        # The stem has no BN-ReLU of its own: the first block's pre-activation normalizes its output.
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups, in_planes = [], 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1, dropout=dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = groups
        # Pre-activation blocks end on a conv, so the head normalizes and activates once more.
        self.bn = nn.BatchNorm2d(widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        grasp_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = norm_add_relu(self.bn, x)
        # flatten, not view: the pooled output of a sparse layer keeps batch-innermost strides
        return self.fc(self.pool(x).flatten(1))


def wrn22_2(num_classes: int = 10) -> WideResNet:
    """WRN-22-2 (about 1.1 M parameters), RigL's CIFAR-10 model."""
    return WideResNet(22, 2, num_classes)


def wrn28_10(num_classes: int = 10) -> WideResNet:
    """WRN-28-10 (about 36.5 M parameters), the WRN paper's main CIFAR model (trained there with dropout 0.3)."""
    return WideResNet(28, 10, num_classes)
