"""Small networks for analyses that need a full Hessian or many products: LeNet-5 and LeNet-300-100, for the
CIFAR-shaped inputs of graspext's datasets (3x32x32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LeNet5(nn.Module):
    """LeCun et al. (1998): two 5x5 convolutions with 2x2 max-pooling, then 120-84-classes (ReLU)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 of the lottery-ticket and pruning literature, on flattened images."""

    def __init__(self, num_classes: int = 10, in_features: int = 3 * 32 * 32):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


def lenet5(num_classes: int = 10) -> LeNet5:
    return LeNet5(num_classes)


def lenet300_100(num_classes: int = 10) -> LeNet300100:
    return LeNet300100(num_classes)
