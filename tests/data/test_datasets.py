import os
import pickle

import numpy as np
import pytest
import torch

from graspext import data


def _write_cifar(root, name="cifar10", n=6, seed=0):
    rng = np.random.default_rng(seed)
    spec = data.cifar.LAYOUT[name]
    folder = os.path.join(root, spec["folder"])
    os.makedirs(folder)
    expected = {}
    for split in ("train", "test"):
        for f in spec[split]:
            images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, spec["classes"], n).tolist()
            with open(os.path.join(folder, f), "wb") as fh:
                pickle.dump({b"data": images, spec["labels"]: labels, b"filenames": [b"x"] * n}, fh)
            expected.setdefault(split, []).append((images, labels))
    names = [f"class{i}".encode() for i in range(spec["classes"])]
    with open(os.path.join(folder, spec["meta"]), "wb") as fh:
        pickle.dump({spec["names"]: names}, fh)
    return expected


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_real_format(tmp_path, name):
    expected = _write_cifar(str(tmp_path), name)
    train = data.load(name, str(tmp_path), train=True)
    test = data.load(name, str(tmp_path), train=False)
    assert len(train) == sum(len(lbl) for _, lbl in expected["train"]) and len(test) == 6
    images, labels = expected["test"][0]
    assert test.targets.tolist() == labels
    assert torch.equal(test.images[2], torch.from_numpy(images[2].reshape(3, 32, 32)))
    x, y = test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[2]
    mean, std = data.cifar.LAYOUT[name]["stats"]
    raw = torch.from_numpy(images[2].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(x, (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    assert test.classes[1] == "class1"
    torch.manual_seed(0)
    xa, _ = train[0]
    assert xa.shape == (3, 32, 32)  # augmented (pad-crop-flip) keeps the shape


def test_pad_crop_flip_is_a_shifted_crop():
    img = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    torch.manual_seed(1)
    out = data.transforms.PadCropFlip(2)(img)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    windows = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


def test_missing_and_corrupt_cifar(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz.*or pass download=True"):
        data.load("cifar10", str(tmp_path))
    _write_cifar(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        fh.write(b"\x00 not a pickle")
    with pytest.raises(ValueError, match="test_batch is corrupt"):
        data.load("cifar10", str(tmp_path), train=False)


def _write_png(path, color):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)


def test_tiny_imagenet_layout(tmp_path):
    pytest.importorskip("torchvision")
    root = str(tmp_path)
    for wnid, color in [("n01", (255, 0, 0)), ("n02", (0, 255, 0))]:
        for k in range(2):
            _write_png(os.path.join(root, "train", wnid, "images", f"{wnid}_{k}.JPEG"), color)
    _write_png(os.path.join(root, "val", "images", "val_0.JPEG"), (0, 255, 0))
    _write_png(os.path.join(root, "val", "images", "val_1.JPEG"), (255, 0, 0))
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.write("val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t0\t0\t63\t63\n")
    train = data.load("tiny-imagenet", root, train=True)
    val = data.load("tiny-imagenet", root, train=False)
    assert len(train) == 4 and sorted(set(train.targets)) == [0, 1]
    assert val.targets == [1, 0]
    x, y = val[0]
    assert x.shape == (3, 64, 64) and y == 1 and x[1].mean() > x[0].mean()  # green image, class n02


def test_imagenet_and_bad_names(tmp_path):
    pytest.importorskip("torchvision")
    _write_png(str(tmp_path / "val" / "n01" / "a.JPEG"), (1, 2, 3))
    val = data.load("imagenet", str(tmp_path), train=False)
    assert len(val) == 1 and val[0][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="ImageNet not found"):
        data.load("imagenet", str(tmp_path), train=True)
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("mnist")
    with pytest.raises(ValueError, match="root: dataset 'cifar10' is read from disk"):
        data.load("cifar10")
