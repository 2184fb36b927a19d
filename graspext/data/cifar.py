"""CIFAR-10/100 from the standard "python version" on-disk format (pickled batches)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from graspext.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, cifar_transform

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "labels": b"labels", "meta": "batches.meta", "names": b"label_names",
                "archive": "cifar-10-python.tar.gz", "stats": (CIFAR10_MEAN, CIFAR10_STD), "classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "labels": b"fine_labels",
                 "meta": "meta", "names": b"fine_label_names", "archive": "cifar-100-python.tar.gz",
                 "stats": (CIFAR100_MEAN, CIFAR100_STD), "classes": 100},
}


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise ValueError(f"{path} is corrupt or not a CIFAR batch file ({exc}); re-extract the archive") from exc


class CIFAR(Dataset):
    """``CIFAR(root, "cifar10" | "cifar100", train=True, augment=None, download=False)``.

    Items are (normalized float 3x32x32 tensor, int label); ``augment`` defaults to ``train`` (pad-crop-flip).
    ``download=True`` fetches the archive with torchvision first (needs network access).
    """

    def __init__(self, root: str, name: str = "cifar10", train: bool = True, augment: bool | None = None,
                 download: bool = False):
        if name not in LAYOUT:
            raise ValueError(f"name must be one of {sorted(LAYOUT)}, got {name!r}")
        spec = LAYOUT[name]
        folder = os.path.join(root, spec["folder"])
        files = spec["train"] if train else spec["test"]
        if download and not all(os.path.isfile(os.path.join(folder, f)) for f in files):
            import torchvision

            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            cls(root, train=train, download=True)
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(
                f"{name} not found: expected {', '.join(os.path.join(folder, f) for f in missing)}. Extract "
                f"{spec['archive']} (the CIFAR 'python version') into {os.path.abspath(root)}, or pass download=True")
        data, labels = [], []
        for f in files:
            batch = _unpickle(os.path.join(folder, f))
            if b"data" not in batch or spec["labels"] not in batch:
                raise ValueError(f"{os.path.join(folder, f)} has no {spec['labels'].decode()!r}/'data' entries: "
                                 f"not a {name} batch file")
            data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[spec["labels"]])
        self.images = torch.from_numpy(np.concatenate(data))
        self.targets = torch.tensor(labels, dtype=torch.long)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{folder}: {len(self.images)} images but {len(self.targets)} labels")
        meta_path = os.path.join(folder, spec["meta"])
        if os.path.isfile(meta_path):
            self.classes = [n.decode() for n in _unpickle(meta_path)[spec["names"]]]
        else:
            self.classes = [str(i) for i in range(spec["classes"])]
        self.transform = cifar_transform(train if augment is None else augment, *spec["stats"])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.targets[i])
