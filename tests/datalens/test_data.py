"""DataLens data: IDX reading (built here byte by byte), the digits images, the teacher partition."""

import gzip
import os
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graspext.data.digits import digits_dataset
from graspext.datalens.data import IDXDataset, class_balanced_partition, digits_images, read_idx
from tests.conftest import hypothesis_settings

N = 7


def idx_bytes(code: int, shape, payload: bytes) -> bytes:
    """The IDX format written independently of the reader: magic, big-endian uint32 sizes, data."""
    return struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + payload


def sample_images(n=N):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    return images


def sample_labels(n=N):
    return np.arange(n, dtype=np.uint8) % 10


def write(path, data: bytes, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)
    return str(path)


def write_split(folder, split="train", gz=False, images=None, labels=None):
    images = sample_images() if images is None else images
    labels = sample_labels() if labels is None else labels
    ext = ".gz" if gz else ""
    write(os.path.join(folder, f"{split}-images-idx3-ubyte{ext}"),
          idx_bytes(0x08, images.shape, images.tobytes()), gz)
    write(os.path.join(folder, f"{split}-labels-idx1-ubyte{ext}"),
          idx_bytes(0x08, labels.shape, labels.tobytes()), gz)
    return images, labels


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_images_and_labels(tmp_path, gz):
    images, labels = sample_images(), sample_labels()
    p_img = write(tmp_path / "img", idx_bytes(0x08, images.shape, images.tobytes()), gz)
    p_lab = write(tmp_path / "lab", idx_bytes(0x08, labels.shape, labels.tobytes()), gz)
    x, y = read_idx(p_img), read_idx(p_lab)
    assert x.dtype == torch.uint8 and x.shape == (N, 28, 28)
    assert torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.uint8 and torch.equal(y, torch.from_numpy(labels))


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path):
    labels = sample_labels()
    plain_named_gz = write(tmp_path / "a.gz", idx_bytes(0x08, labels.shape, labels.tobytes()))
    gz_named_plain = write(tmp_path / "b", idx_bytes(0x08, labels.shape, labels.tobytes()), gz=True)
    assert torch.equal(read_idx(plain_named_gz), torch.from_numpy(labels))
    assert torch.equal(read_idx(gz_named_plain), torch.from_numpy(labels))


@pytest.mark.parametrize("code, fmt, dtype, values", [
    (0x09, "b", torch.int8, [-128, -1, 0, 5, 127, 3]),
    (0x0B, "h", torch.int16, [-32768, -2, 0, 300, 32767, 7]),
    (0x0C, "i", torch.int32, [-(2 ** 31), -5, 0, 70000, 2 ** 31 - 1, 9]),
    (0x0D, "f", torch.float32, [-1.5, 0.0, 0.25, 3.0e5, 1e-3, 2.0]),
    (0x0E, "d", torch.float64, [-1.5, 0.0, 0.1, 3.0e100, 1e-300, 2.0]),
])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_other_type_codes(tmp_path, code, fmt, dtype, values, gz):
    payload = struct.pack(f">{len(values)}{fmt}", *values)
    path = write(tmp_path / "f", idx_bytes(code, (2, 3), payload), gz)
    out = read_idx(path)
    assert out.dtype == dtype and out.shape == (2, 3)
    assert torch.equal(out, torch.tensor(values, dtype=dtype).view(2, 3))


def test_read_idx_empty_dimension(tmp_path):
    out = read_idx(write(tmp_path / "f", idx_bytes(0x08, (0, 28, 28), b"")))
    assert out.shape == (0, 28, 28) and out.dtype == torch.uint8


GOOD = idx_bytes(0x08, (2, 3), bytes(range(6)))


@pytest.mark.parametrize("data, match", [
    (b"", "too short"),
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "two zero bytes"),
    (b"\x00\x07\x08\x01" + struct.pack(">I", 1) + b"\x00", "two zero bytes"),
    (struct.pack(">HBB", 0, 0x0A, 1) + struct.pack(">I", 1) + b"\x00", "unknown IDX type code 0x0A"),
    (struct.pack(">HBB", 0, 0x08, 0), "0 dimensions"),
    (struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">I", 2), "truncated IDX header"),
    (GOOD[:-1], "truncated IDX data"),
    (idx_bytes(0x0B, (3,), b"\x00" * 5), "truncated IDX data"),
    (GOOD + b"\x00", "1 trailing bytes"),
    (b"\x1f\x8b" + b"not really gzip", "not a valid gzip stream"),
])
def test_read_idx_malformed_files_name_the_file(tmp_path, data, match):
    path = write(tmp_path / "bad-file-idx", data)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert path in str(info.value)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "trunc.gz"
    path.write_bytes(gzip.compress(GOOD)[:-6])
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(str(path))
    assert str(path) in str(info.value)


def test_read_idx_gzip_content_is_validated_too(tmp_path):
    path = write(tmp_path / "f.gz", GOOD + b"\x00\x00", gz=True)
    with pytest.raises(ValueError, match="2 trailing bytes") as info:
        read_idx(path)
    assert path in str(info.value)


# ---------------------------------------------------------------- IDXDataset


def torchvision_layout(root, name):
    return os.path.join(root, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name], "raw")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_idx_dataset_reads_both_layouts(tmp_path, name, layout, gz, train):
    folder = str(tmp_path) if layout == "flat" else torchvision_layout(str(tmp_path), name)
    images, labels = write_split(folder, "train" if train else "t10k", gz)
    ds = IDXDataset(str(tmp_path), name, train=train)
    assert len(ds) == N and len(ds.classes) == 10
    assert ds.targets.dtype == torch.int64 and torch.equal(ds.targets, torch.from_numpy(labels).long())
    for i in range(N):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
        assert torch.equal(x, torch.from_numpy(images[i]).float().unsqueeze(0) / 255.0)
        assert y.dtype == torch.int64 and int(y) == labels[i]
    x0 = ds[0][0]
    assert float(x0.min()) >= 0.0 and float(x0.max()) <= 1.0
    assert x0[0, 0, 0] == 0.0 and x0[0, 0, 1] == 1.0


def test_idx_dataset_train_and_test_are_separate_files(tmp_path):
    write_split(str(tmp_path), "train")
    other = np.full((3, 28, 28), 9, dtype=np.uint8)
    write_split(str(tmp_path), "t10k", images=other, labels=np.array([4, 5, 6], dtype=np.uint8))
    assert len(IDXDataset(str(tmp_path), train=True)) == N
    test = IDXDataset(str(tmp_path), train=False)
    assert test.targets.tolist() == [4, 5, 6]
    assert torch.allclose(test[1][0], torch.full((1, 28, 28), 9 / 255.0))


def test_idx_dataset_class_names(tmp_path):
    write_split(str(tmp_path))
    assert IDXDataset(str(tmp_path), "mnist").classes == [str(i) for i in range(10)]
    assert IDXDataset(str(tmp_path), "fashion_mnist").classes[9] == "Ankle boot"


def test_idx_dataset_missing_files_list_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        IDXDataset(str(tmp_path), "fashion_mnist", train=False)
    msg = str(info.value)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        for base in (str(tmp_path), os.path.join(str(tmp_path), "FashionMNIST", "raw")):
            assert os.path.join(base, stem) in msg and os.path.join(base, stem + ".gz") in msg


def test_idx_dataset_only_labels_missing(tmp_path):
    images = sample_images()
    write(os.path.join(tmp_path, "train-images-idx3-ubyte"), idx_bytes(0x08, images.shape, images.tobytes()))
    with pytest.raises(FileNotFoundError, match="labels") as info:
        IDXDataset(str(tmp_path))
    assert os.path.join(str(tmp_path), "train-labels-idx1-ubyte") in str(info.value)
    assert "train-images-idx3-ubyte," not in str(info.value)


def test_idx_dataset_count_mismatch(tmp_path):
    write_split(str(tmp_path), labels=sample_labels(N - 1))
    with pytest.raises(ValueError, match=f"{N} images but .* {N - 1} labels"):
        IDXDataset(str(tmp_path))


def test_idx_dataset_malformed_file_is_named(tmp_path):
    write_split(str(tmp_path))
    bad = os.path.join(str(tmp_path), "train-labels-idx1-ubyte")
    with open(bad, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="trailing") as info:
        IDXDataset(str(tmp_path))
    assert bad in str(info.value)


def test_idx_dataset_wrong_content(tmp_path):
    labels = sample_labels()
    write(os.path.join(tmp_path, "train-images-idx3-ubyte"), idx_bytes(0x08, labels.shape, labels.tobytes()))
    write(os.path.join(tmp_path, "train-labels-idx1-ubyte"), idx_bytes(0x08, labels.shape, labels.tobytes()))
    with pytest.raises(ValueError, match="N x H x W"):
        IDXDataset(str(tmp_path))
    write_split(str(tmp_path), labels=np.full(N, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        IDXDataset(str(tmp_path))


def test_idx_dataset_bad_name(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        IDXDataset(str(tmp_path), "cifar10")


# ---------------------------------------------------------------- digits_images


@pytest.mark.parametrize("size", [8, 16, 28])
def test_digits_images_shapes_and_range(size):
    ds = digits_images(train=True, size=size)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and x.shape[1:] == (1, size, size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert y.dtype == torch.int64 and torch.equal(ds.targets, y)
    assert ds.classes == [str(i) for i in range(10)]
    assert set(y.tolist()) == set(range(10))


def test_digits_images_size_8_is_the_raw_digits():
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    x = digits_images(train=False, size=8).tensors[0]
    assert all(any(torch.equal(img[0], r) for r in raw) for img in x[:5])


@pytest.mark.parametrize("train", [True, False])
def test_digits_images_split_matches_digits_dataset(train):
    ours, theirs = digits_images(train=train), digits_dataset(train=train)
    assert len(ours) == len(theirs)
    assert torch.equal(ours.tensors[1], theirs.tensors[1])
    # same images in the same order: standardizing ours the way digits_dataset does gives its first channel
    x32 = digits_images(train=train, size=32).tensors[0]
    assert torch.corrcoef(torch.stack([x32.flatten(), theirs.tensors[0][:, 0].flatten()]))[0, 1] > 0.9999


def test_digits_images_train_and_test_are_disjoint_and_cover():
    train, test = digits_images(train=True), digits_images(train=False)
    assert len(train) + len(test) == 1797 and len(test) == int(1797 * 0.2)


def test_digits_images_bad_size():
    for size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            digits_images(size=size)


# ---------------------------------------------------------------- class_balanced_partition


def check_partition(targets, teachers, parts):
    n = len(targets)
    assert len(parts) == teachers
    assert all(p.dtype == torch.int64 and p.dim() == 1 for p in parts)
    joined = torch.cat(parts)
    assert len(joined) == n and torch.equal(joined.sort().values, torch.arange(n))    # disjoint and covering
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1
    for c in torch.unique(targets).tolist():
        counts = [int((targets[p] == c).sum()) for p in parts]
        assert max(counts) - min(counts) <= 1, (c, counts)


@st.composite
def labels_and_teachers(draw):
    classes = draw(st.integers(1, 12))
    n = draw(st.integers(1, 300))
    labels = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    teachers = draw(st.integers(1, n))
    return torch.tensor(labels, dtype=torch.int64), teachers


@hypothesis_settings(200)
@given(labels_and_teachers(), st.integers(0, 2 ** 31 - 1))
def test_partition_properties(case, seed):
    targets, teachers = case
    parts = class_balanced_partition(targets, teachers, seed=seed)
    check_partition(targets, teachers, parts)
    again = class_balanced_partition(targets, teachers, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


@hypothesis_settings(50)
@given(st.lists(st.integers(-5, 1000), min_size=1, max_size=200), st.integers(1, 20), st.sampled_from(
    [torch.int64, torch.int32, torch.int16, torch.uint8]))
def test_partition_any_integer_labels(labels, teachers, dtype):
    targets = torch.tensor(labels) if dtype == torch.int64 else torch.tensor(labels).clamp(0, 255).to(dtype)
    teachers = min(teachers, len(labels))
    check_partition(targets.long(), teachers, class_balanced_partition(targets, teachers, seed=3))


def test_partition_imbalanced_small_class_is_not_duplicated():
    # class 2 has 3 examples for 10 teachers: the official wrap-around would give some of them to two teachers
    targets = torch.tensor([0] * 500 + [1] * 47 + [2] * 3 + [3] * 250)
    parts = class_balanced_partition(targets, 10, seed=0)
    check_partition(targets, 10, parts)
    small = [int((targets[p] == 2).sum()) for p in parts]
    assert sum(small) == 3 and sorted(small) == [0] * 7 + [1] * 3
    assert Counter(len(p) for p in parts) == Counter({80: 10})


def test_partition_totals_within_one_despite_many_classes():
    # 10 classes of 1 example for 3 teachers: a per-class restart of the dealing would give sizes 10/0/0
    targets = torch.arange(10)
    sizes = sorted(len(p) for p in class_balanced_partition(targets, 3))
    assert sizes == [3, 3, 4]


def test_partition_seed_determinism_and_variation():
    targets = torch.arange(200) % 5
    a = class_balanced_partition(targets, 4, seed=0)
    b = class_balanced_partition(targets, 4, seed=0)
    c = class_balanced_partition(targets, 4, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    check_partition(targets, 4, c)


def test_partition_one_teacher_and_one_per_example():
    targets = torch.tensor([3, 1, 3, 0, 1])
    assert torch.equal(class_balanced_partition(targets, 1)[0], torch.arange(5))
    parts = class_balanced_partition(targets, 5)
    assert sorted(int(p) for p in parts) == list(range(5)) and all(len(p) == 1 for p in parts)


def test_partition_accepts_dataset_targets():
    ds = digits_images(train=True)
    parts = class_balanced_partition(ds.targets, 7)
    check_partition(ds.targets, 7, parts)
    assert isinstance(class_balanced_partition([0, 1, 1], 2)[0], torch.Tensor)


@pytest.mark.parametrize("teachers", [0, -2, 2.0, "3", None, True])
def test_partition_bad_teachers(teachers):
    with pytest.raises(ValueError, match="teachers must be an int >= 1"):
        class_balanced_partition(torch.arange(10), teachers)


def test_partition_more_teachers_than_examples():
    with pytest.raises(ValueError, match="teachers=4 is more than the 3 examples"):
        class_balanced_partition(torch.tensor([0, 1, 2]), 4)
    with pytest.raises(ValueError, match="teachers=1 is more than the 0 examples"):
        class_balanced_partition(torch.tensor([], dtype=torch.long), 1)


@pytest.mark.parametrize("targets, error, match", [
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (torch.tensor([True, False]), TypeError, "integer"),
    (torch.zeros(2, 3, dtype=torch.long), ValueError, "1-D"),
    (torch.tensor(3), ValueError, "1-D"),
    (object(), TypeError, "integer"),
])
def test_partition_bad_targets(targets, error, match):
    with pytest.raises(error, match=match):
        class_balanced_partition(targets, 1)
