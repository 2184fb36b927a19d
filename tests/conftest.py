import os

import pytest
import torch
from hypothesis import settings
from torch import nn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def hypothesis_settings(max_examples: int) -> settings:
    """Hypothesis settings of the op tests: no deadline (first calls compile and allocate), and at most
    GRASPEXT_HYPOTHESIS_EXAMPLES examples when that is set (runs under compute-sanitizer are slow)."""
    cap = int(os.environ.get("GRASPEXT_HYPOTHESIS_EXAMPLES", max_examples))
    return settings(max_examples=min(max_examples, cap), deadline=None)


def skip_without_kernel(op: str, device: str) -> None:
    """CUDA kernels land op by op; until one exists its CUDA test cases are skipped, not failed."""
    from graspext._extension import has_cuda_kernel

    if device == "cuda" and not has_cuda_kernel(op):
        pytest.skip(f"graspext::{op} has no CUDA kernel in this build")


def _block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallVGG(nn.Module):
    """VGG-style as the GraSP code: conv-BN-ReLU blocks, max-pooling, AvgPool then one Linear."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_block(3, w), *_block(w, w), nn.MaxPool2d(2), *_block(w, 2 * w),
                                      nn.MaxPool2d(2), *_block(2 * w, 4 * w))
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style: 1x1 conv + BN shortcut where shapes change."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn(self.conv(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {"vgg": SmallVGG, "resnet": SmallResNet}


@pytest.fixture
def make_model():
    def make(kind="vgg", dtype=torch.float32, seed=0, **kw):
        torch.manual_seed(seed)
        return MODELS[kind](**kw).to(dtype)
    return make


def class_sorted_batch(num_classes=10, per_class=4, size=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.randn(len(y), 3, size, size, generator=g, dtype=dtype)
    return x, y


class TiedLinears(nn.Module):
    """Two Linear layers sharing one weight tensor (tied layers), then a classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x.flatten(1)[:, :8])))))
