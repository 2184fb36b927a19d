"""Standard augmentation on uint8 image tensors (N or C x H x W), without PIL round trips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        return (img.float() / 255.0 - self.mean) / self.std


class PadCropFlip:
    """4-pixel zero pad, random crop back to size, horizontal flip with p = 0.5 (the CIFAR recipe)."""

    def __init__(self, padding: int = 4):
        self.padding = padding

    def __call__(self, img: Tensor) -> Tensor:
        c, h, w = img.shape
        p = self.padding
        padded = F.pad(img, (p, p, p, p))
        i = int(torch.randint(0, 2 * p + 1, ()))
        j = int(torch.randint(0, 2 * p + 1, ()))
        out = padded[:, i:i + h, j:j + w]
        if bool(torch.rand(()) < 0.5):
            out = out.flip(-1)
        return out


class Compose:
    def __init__(self, *steps):
        self.steps = steps

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img


def cifar_transform(train: bool, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    return Compose(PadCropFlip(4), Normalize(mean, std)) if train else Normalize(mean, std)
