"""The embedded default dataset: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes),
shipped inside the scikit-learn package, so nothing is downloaded. Adapted to CIFAR's 3x32x32 layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def digits_dataset(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """Normalized 3x32x32 float tensors and int64 labels; a fixed, seeded train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the embedded digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0      # N x 1 x 8 x 8 in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    idx = perm[n_test:] if train else perm[:n_test]
    ds = TensorDataset(x[idx], y[idx])
    ds.classes = [str(i) for i in range(10)]
    return ds
