"""Model registry: the GraSP paper's CIFAR models, RigL's WRN-22-2, LeNet-5 and LeNet-300-100 (for the analyses),
plus any torchvision classification model by name.

``graspext.models.create("vgg19_bn", num_classes=10)``; ``create("resnet18")`` falls back to torchvision.
"""

from __future__ import annotations

from torch import nn

from graspext.models.resnet import CifarResNet, resnet20, resnet32, resnet32_grasp, resnet56, resnet110
from graspext.models.small import LeNet5, LeNet300100, lenet5, lenet300_100
from graspext.models.vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from graspext.models.wrn import WideResNet, wrn22_2, wrn28_10

REGISTRY = {
    "vgg11_bn": vgg11_bn, "vgg13_bn": vgg13_bn, "vgg16_bn": vgg16_bn, "vgg19_bn": vgg19_bn,
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet110": resnet110,
    "resnet32_grasp": resnet32_grasp, "wrn22_2": wrn22_2, "lenet5": lenet5, "lenet300_100": lenet300_100,
}


def create(name: str, num_classes: int = 10) -> nn.Module:
    """A registered CIFAR model, else a torchvision classification model of that name (random init)."""
    if name in REGISTRY:
        return REGISTRY[name](num_classes=num_classes)
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"model must be one of {sorted(REGISTRY)} or a torchvision classification model name, "
                     f"got {name!r}")


__all__ = ["REGISTRY", "create", "VGG", "CifarResNet", "WideResNet", "LeNet5", "LeNet300100",
           "wrn28_10"] + list(REGISTRY)
