"""Datasets: the embedded digits default, CIFAR-10/100 from disk, Tiny-ImageNet and ImageNet from folders.

``graspext.data.load(name, root=None, train=True, download=False)``.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from graspext.data.cifar import CIFAR
from graspext.data.digits import digits_dataset
from graspext.data.folders import imagenet, tiny_imagenet

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200, "imagenet": 1000}


def load(name: str, root: str | None = None, train: bool = True, download: bool = False) -> Dataset:
    if name not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {name!r}")
    if name == "digits":
        return digits_dataset(train=train)
    if root is None:
        raise ValueError(f"root: dataset {name!r} is read from disk; pass the folder that holds it")
    if name in ("cifar10", "cifar100"):
        return CIFAR(root, name, train=train, download=download)
    if download:
        raise ValueError(f"download=True is not available for {name!r}: place the files under {root!r}")
    return tiny_imagenet(root, train) if name == "tiny-imagenet" else imagenet(root, train)


__all__ = ["load", "CIFAR", "digits_dataset", "tiny_imagenet", "imagenet", "NUM_CLASSES"]
