"""Data for DataLens: MNIST / Fashion-MNIST from IDX files, the embedded digits as 1-channel images, and the
class-balanced, disjoint split of the training set among the teacher discriminators."""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

# IDX type code -> (big-endian numpy dtype, name).
IDX_TYPES = {
    0x08: (np.dtype(">u1"), "uint8"),
    0x09: (np.dtype(">i1"), "int8"),
    0x0B: (np.dtype(">i2"), "int16"),
    0x0C: (np.dtype(">i4"), "int32"),
    0x0D: (np.dtype(">f4"), "float32"),
    0x0E: (np.dtype(">f8"), "float64"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the file is called)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: starts with the gzip magic but is not a valid gzip stream ({exc})") from exc


def read_idx(path: str) -> torch.Tensor:
    """Reads one IDX file (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, one big-endian uint32 per dimension, then the big-endian data.
    Returns a tensor of that dtype and shape (uint8 for images and labels). A malformed file (bad magic, unknown
    type code, truncated header or data, trailing bytes) raises ``ValueError`` naming the file.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for the 4-byte IDX magic "
                         "(0x00 0x00 <type code> <number of dimensions>)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file: expected the magic to start with two zero bytes, "
                         f"got 0x{data[0]:02x} 0x{data[1]:02x}")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X} ({name})" for c, (_, name) in IDX_TYPES.items())
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    if ndim == 0:
        raise ValueError(f"{path}: the IDX header declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header} header bytes, "
                         f"the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype, name = IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header
    if actual < expected:
        raise ValueError(f"{path}: truncated IDX data: shape {shape} of {name} needs {expected} bytes after "
                         f"the header, the file has {actual}")
    if actual > expected:
        raise ValueError(f"{path}: {actual - expected} trailing bytes: shape {shape} of {name} needs exactly "
                         f"{expected} bytes after the header, the file has {actual}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


# name -> (torchvision folder / class name, class names)
IDX_DATASETS = {
    "mnist": ("MNIST", [str(i) for i in range(10)]),
    "fashion_mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot"]),
}


def _candidates(root: str, folder: str, stem: str) -> list[str]:
    """Where a file may lie: ``root/<stem>`` or torchvision's ``root/<folder>/raw/<stem>``, each also ``.gz``."""
    return [os.path.join(base, stem + ext) for base in (root, os.path.join(root, folder, "raw"))
            for ext in ("", ".gz")]


class IDXDataset(Dataset):
    """``IDXDataset(root, "mnist" | "fashion_mnist", train=True, download=False)``: items are (float32
    1x28x28 image in [0, 1], int64 label).

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root`` or from torchvision's layout
    ``root/MNIST/raw`` / ``root/FashionMNIST/raw``. ``download=True`` fetches missing files with torchvision
    (needs network access). ``.images`` (uint8 N x 28 x 28), ``.targets`` (int64 N) and ``.classes``.
    """

    def __init__(self, root: str, name: str = "mnist", train: bool = True, download: bool = False):
        if name not in IDX_DATASETS:
            raise ValueError(f"name must be one of {sorted(IDX_DATASETS)}, got {name!r}")
        root = os.fspath(root)
        folder, self.classes = IDX_DATASETS[name]
        self.classes = list(self.classes)
        split = "train" if train else "t10k"
        stems = {"images": f"{split}-images-idx3-ubyte", "labels": f"{split}-labels-idx1-ubyte"}
        found = self._find(root, folder, stems)
        if download and None in found.values():
            self._download(root, folder, train)
            found = self._find(root, folder, stems)
        missing = [key for key, path in found.items() if path is None]
        if missing:
            tried = [p for key in missing for p in _candidates(root, folder, stems[key])]
            raise FileNotFoundError(f"{name} {split} {' and '.join(missing)} not found; tried: {', '.join(tried)}. "
                                    "Place the IDX files there, or pass download=True")
        images, labels = read_idx(found["images"]), read_idx(found["labels"])
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"{found['images']}: expected uint8 images of shape N x H x W, "
                             f"got {images.dtype} of shape {tuple(images.shape)}")
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise ValueError(f"{found['labels']}: expected a 1-D integer label vector, "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{found['images']} holds {len(images)} images but {found['labels']} holds "
                             f"{len(labels)} labels; the counts must agree")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise ValueError(f"{found['labels']}: labels must lie in [0, {len(self.classes)}), "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")
        self.images = images
        self.targets = labels.to(torch.int64)
        self.files = found

    @staticmethod
    def _find(root: str, folder: str, stems: dict) -> dict:
        return {key: next((p for p in _candidates(root, folder, stem) if os.path.isfile(p)), None)
                for key, stem in stems.items()}

    @staticmethod
    def _download(root: str, folder: str, train: bool) -> None:
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError("IDXDataset(download=True) needs torchvision: pip install torchvision, or place the "
                              f"IDX files under {root!r} yourself") from exc
        getattr(torchvision.datasets, folder)(root, train=train, download=True)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i].unsqueeze(0).to(torch.float32) / 255.0, self.targets[i]


def digits_images(train: bool = True, size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """The embedded scikit-learn digits as single-channel float32 images [1, size, size] in [0, 1] (bilinear
    from 8x8 when size != 8) and int64 labels: DataLens's default data, no download, fast on a CPU.

    The train/test split is the one of ``graspext.data.digits.digits_dataset`` with the same arguments."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    from graspext.data.digits import digits_images_8x8

    x, y = digits_images_8x8(train, test_fraction, seed)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    ds = TensorDataset(x, y)
    ds.targets = y
    ds.classes = [str(i) for i in range(10)]
    return ds


def load_images(dataset: str, train: bool = True, image_size: int = 8, root: str | None = None,
                download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a DataLens dataset split: float32 ``[N, 1, H, W]`` in [0, 1] and int64 ``[N]``.
    ``dataset``: ``"digits"`` (embedded, ``image_size`` square) or ``"mnist"`` / ``"fashion_mnist"`` (IDX files
    under ``root``, 28x28)."""
    if dataset == "digits":
        ds = digits_images(train, size=image_size)
        return ds.tensors[0], ds.tensors[1]
    if dataset not in IDX_DATASETS:
        raise ValueError(f"dataset must be 'digits' or one of {sorted(IDX_DATASETS)}, got {dataset!r}")
    if root is None:
        raise ValueError(f"{dataset} needs a data root (the folder holding its IDX files)")
    ds = IDXDataset(root, dataset, train=train, download=download)
    return ds.images.unsqueeze(1).to(torch.float32) / 255.0, ds.targets


def class_balanced_partition(targets, teachers: int, seed: int = 0) -> list[torch.Tensor]:
    """Indices (int64, ascending) of the examples given to each of ``teachers`` teacher discriminators.

    Each class is shuffled with a ``torch.Generator`` seeded by ``seed``; the classes, in ascending label order,
    are then dealt round-robin as one sequence, the dealing position carrying over from one class to the next.
    Guarantees: the partitions are pairwise disjoint and cover every example exactly once; within every class
    the teachers' counts differ by at most 1; the partition sizes differ by at most 1. Deterministic per seed.

    DataLens's privacy argument needs each example to influence exactly one teacher. The official partitioner
    wraps around inside a class that has fewer examples than its per-teacher quota, so such an example reaches
    two teachers; here a small class simply gives some teachers no example of it.
    """
    if not isinstance(targets, torch.Tensor):
        try:
            targets = torch.as_tensor(np.asarray(targets))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"targets must be a 1-D integer tensor of labels, got {type(targets).__name__}") from exc
    if targets.dtype == torch.bool or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise TypeError(f"targets must be a 1-D integer tensor of labels, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D integer tensor of labels, got shape {tuple(targets.shape)}")
    if isinstance(teachers, bool) or not isinstance(teachers, int) or teachers < 1:
        raise ValueError(f"teachers must be an int >= 1, got {teachers!r}")
    n = len(targets)
    if teachers > n:
        raise ValueError(f"teachers={teachers} is more than the {n} examples: every teacher needs at least one")
    targets = targets.detach().cpu().to(torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = []
    for c in torch.unique(targets, sorted=True):
        members = torch.nonzero(targets == c).flatten()
        order.append(members[torch.randperm(len(members), generator=g)])
    order = torch.cat(order)
    return [order[t::teachers].sort().values for t in range(teachers)]


__all__ = ["IDX_DATASETS", "IDX_TYPES", "IDXDataset", "class_balanced_partition", "digits_images",
           "load_images", "read_idx"]
