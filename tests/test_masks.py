import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import graspext as gx
from tests.conftest import class_sorted_batch


@pytest.fixture
def model_and_masks(make_model):
    model = make_model("vgg")
    return model, gx.prune(model, "grasp", 0.9, class_sorted_batch(), seed=0)


def test_mapping_and_counts(model_and_masks):
    model, masks = model_and_masks
    params = dict(model.named_parameters())
    assert all(masks[n].dtype == torch.bool and masks[n].shape == params[n].shape for n in masks)
    assert masks.num_total() == sum(params[n].numel() for n in masks)
    assert masks.density() == pytest.approx(masks.num_kept() / masks.num_total())
    assert masks.sparsity() == pytest.approx(1 - masks.density())
    assert set(masks.layer_densities()) == set(masks)
    text = masks.summary()
    assert "features.0.weight" in text and "total" in text and "grasp" in text


def test_save_load_roundtrip(tmp_path, model_and_masks):
    _, masks = model_and_masks
    path = tmp_path / "masks.pt"
    masks.save(path)
    loaded = gx.Masks.load(path)
    assert list(loaded) == list(masks) and loaded.meta == masks.meta
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.pt"]  # no temporary left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no masks file"):
        gx.Masks.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable graspext masks file"):
        gx.Masks.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a graspext masks file"):
        gx.Masks.load(other)


def test_constructor_validation():
    with pytest.raises(TypeError, match=r"masks\['a.weight'\] must be a bool tensor"):
        gx.Masks({"a.weight": torch.ones(3)})
    with pytest.raises(TypeError, match="must be a mapping"):
        gx.Masks([torch.ones(3, dtype=torch.bool)])


def test_check_fits(make_model, model_and_masks):
    _, masks = model_and_masks
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        masks.check_fits(make_model("resnet"))
    with pytest.raises(ValueError, match="has shape"):
        masks.check_fits(make_model("vgg", width=4))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_apply_keeps_pruned_weights_exactly_zero_through_training(model_and_masks, optimizer):
    model, masks = model_and_masks
    handle = masks.apply_(model)
    params = dict(model.named_parameters())
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
           "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2)}[optimizer](model.parameters())
    x, y = class_sorted_batch()
    before = {n: params[n].detach().clone() for n in masks}
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0), n
        assert not torch.equal(params[n][m], before[n][m]), n  # kept weights do train
    handle.remove()
    assert not handle.hooks


def test_torch_prune_roundtrip(make_model, model_and_masks):
    _, masks = model_and_masks
    target = make_model("vgg")
    masks.to_torch_prune(target)
    assert torch_prune.is_pruned(target)
    back = gx.Masks.from_torch_prune(target)
    assert list(back) == list(masks)
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    # and from torch's own pruning into graspext
    other = make_model("vgg")
    torch_prune.l1_unstructured(other.features[0], "weight", amount=0.5)
    read = gx.Masks.from_torch_prune(other)
    assert list(read) == ["features.0.weight"] and read.density() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="no torch.nn.utils.prune masks"):
        gx.Masks.from_torch_prune(make_model("vgg"))
