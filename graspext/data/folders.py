"""Tiny-ImageNet and ImageNet from image folders (torchvision's ImageFolder layout)."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from graspext.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _torchvision():
    try:
        import torchvision
        from torchvision import transforms as T
    except ImportError as exc:
        raise ImportError("image-folder datasets need torchvision: pip install torchvision") from exc
    return torchvision, T


class LabeledFiles(Dataset):
    """(path, label) pairs read with PIL, as ImageFolder items."""

    def __init__(self, samples, transform, classes):
        self.samples, self.transform, self.classes = samples, transform, classes
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, target = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), target


def _missing(name: str, path: str, layout: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name} not found: {path} does not exist. Expected layout: {layout}")


def tiny_imagenet(root: str, train: bool = True) -> Dataset:
    """``root/train/<wnid>/images/*.JPEG`` and ``root/val/images`` + ``root/val/val_annotations.txt``
    (the archive's own layout); 64x64 images, 200 classes. Train: 4-pixel pad, random crop, flip."""
    torchvision, T = _torchvision()
    layout = "ROOT/train/<wnid>/images/*.JPEG, ROOT/val/images/*.JPEG, ROOT/val/val_annotations.txt"
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise _missing("Tiny-ImageNet", train_dir, layout)
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    index = {c: i for i, c in enumerate(classes)}
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        ds = torchvision.datasets.ImageFolder(train_dir, T.Compose([T.RandomCrop(64, padding=4),
                                                                    T.RandomHorizontalFlip(), *normalize]))
        return ds
    val_dir = os.path.join(root, "val")
    ann = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isfile(ann):
        raise _missing("Tiny-ImageNet validation annotations", ann, layout)
    samples = []
    with open(ann) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise ValueError(f"{ann}:{line_no}: expected '<file>\\t<wnid>...' with a known wnid, got {line!r}")
            samples.append((os.path.join(val_dir, "images", parts[0]), index[parts[1]]))
    return LabeledFiles(samples, T.Compose(normalize), classes)


def imagenet(root: str, train: bool = True) -> Dataset:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; the standard 224 crops."""
    torchvision, T = _torchvision()
    folder = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(folder):
        raise _missing("ImageNet", folder, "ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG")
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *normalize])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), *normalize])
    return torchvision.datasets.ImageFolder(folder, tf)
