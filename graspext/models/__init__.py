"""Model registry. ``graspext.models.vgg19_bn(num_classes=10)`` etc.; ``create(name, **kw)``."""

from graspext.models.vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn

REGISTRY = {"vgg11_bn": vgg11_bn, "vgg13_bn": vgg13_bn, "vgg16_bn": vgg16_bn, "vgg19_bn": vgg19_bn}


def create(name: str, **kwargs):
    if name not in REGISTRY:
        raise ValueError(f"model must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name](**kwargs)


__all__ = ["VGG", "create", "REGISTRY", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
