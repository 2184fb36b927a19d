"""The embedded default dataset: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes),
shipped inside the scikit-learn package, so nothing is downloaded. Adapted to CIFAR's 3x32x32 layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as float32 N x 1 x 8 x 8 in [0, 1], and their int64 labels, in scikit-learn's order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the embedded digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(bunch.target)


def _split(n: int, train: bool, test_fraction: float, seed: int) -> torch.Tensor:
    """The indices of one side of the fixed, seeded train/test split that every digits dataset shares."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * test_fraction)
    return perm[n_test:] if train else perm[:n_test]


def digits_images_8x8(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw digits of one split: float32 images N x 1 x 8 x 8 in [0, 1] and int64 labels."""
    x, y = _all_digits()
    idx = _split(len(y), train, test_fraction, seed)
    return x[idx], y[idx].long()


def digits_dataset(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """Normalized 3x32x32 float tensors and int64 labels; a fixed, seeded train/test split."""
    x, y = _all_digits()
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    idx = _split(len(y), train, test_fraction, seed)
    ds = TensorDataset(x[idx], y[idx].long())
    ds.classes = [str(i) for i in range(10)]
    return ds
