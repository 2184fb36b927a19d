import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import graspext as gx
from graspext.masks import Masks
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


def test_mask_handle_moves_a_masked_weight_and_clears_the_state_of_dropped_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    mask = torch.rand(5, 6) < 0.5
    masks = Masks({"0.weight": mask})
    handle = masks.apply_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    weight = model[0].weight
    before = weight.detach().clone()
    buf_before = opt.state[weight]["momentum_buffer"].clone()
    new = mask.clone().view(-1)
    kept, free = new.nonzero().flatten(), (~new).nonzero().flatten()
    new[kept[:2]], new[free[:2]] = False, True
    new = new.view(5, 6)
    assert handle.set_mask_("0.weight", new, opt) == 2
    assert torch.equal(masks["0.weight"], mask)  # the Masks object is the initial pattern, untouched
    assert torch.equal(handle.mask("0.weight"), new)
    buf = opt.state[weight]["momentum_buffer"]
    assert torch.equal(weight[new & mask], before[new & mask]) and torch.equal(buf[new & mask], buf_before[new & mask])
    assert not weight[~new].any() and not buf[~new].any()  # dropped: zero, and no momentum to move them
    # Training keeps the new pattern: the hooks enforce it, and the dense gradient is there on request.
    handle.request_dense_grad("0.weight")
    opt.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    dense = handle.dense_grad("0.weight")
    assert bool((dense[~new] != 0).any()) and not weight.grad[~new].any()
    opt.step()
    assert not weight[~new].any()
    with pytest.raises(ValueError, match="mask keeps"):
        handle.set_mask_("0.weight", torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(KeyError, match="not a masked parameter"):
        handle.mask("1.weight")
    with pytest.raises(RuntimeError, match="no dense gradient was captured"):
        handle.dense_grad("0.weight")
