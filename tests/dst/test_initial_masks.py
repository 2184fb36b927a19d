"""graspext.dst.initial_masks, and RigL started from the masks of a pruning method."""

import math

import pytest
import torch

import graspext as gx
from graspext.dst import RigL, initial_masks
from tests.helpers import ordered_loader, tiny_data, tiny_net


def _official_erk(shapes, density):
    """google-research/rigl get_sparsities_erdos_renyi (include_kernel, power 1), written out again."""
    dense, sparsity = set(), 1 - density
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            n_zeros = math.floor(n * sparsity)
            if i in dense:
                rhs -= n_zeros
            else:
                rhs += n - n_zeros
                raw[i] = sum(shape) / n
                divisor += raw[i] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense |= {i for i, r in raw.items() if r == top}
        else:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


def test_erk_masks_follow_the_official_densities_with_the_first_layer_dense():
    model = gx.models.create("vgg11_bn")
    masks = initial_masks(model, 0.9, "erk", seed=1)
    params = dict(model.named_parameters())
    assert "features.0.weight" not in masks
    shapes = [tuple(params[n].shape) for n in masks]
    expected = _official_erk(shapes, 0.1)
    for (name, mask), density in zip(masks.items(), expected):
        assert abs(mask.float().mean().item() - density) < 2e-3, name
    assert masks.num_total() - masks.num_kept() == int(masks.num_total() * 0.9)
    again = initial_masks(model, 0.9, "erk", seed=1)
    assert all(torch.equal(masks[n], again[n]) for n in masks)  # seeded
    other = initial_masks(model, 0.9, "erk", seed=2)
    assert any(not torch.equal(masks[n], other[n]) for n in masks)


def test_uniform_masks_give_every_layer_the_same_density():
    masks = initial_masks(gx.models.create("vgg11_bn"), 0.8, "uniform")
    for name, density in masks.layer_densities().items():
        assert density == pytest.approx(0.2, abs=2e-3), name
    with pytest.raises(ValueError, match="distribution must be one of"):
        initial_masks(gx.models.create("vgg11_bn"), 0.8, "gaussian")


def test_rigl_starts_from_grasp_masks():
    data, net = tiny_data(torch.float32), tiny_net(torch.float32)
    masks = gx.prune(net, "grasp", 0.8, ordered_loader(data), keep_first_dense=True, seed=0, num_chunks=1,
                     samples_per_class=5)
    result = gx.train(net, ordered_loader(data), ordered_loader(data), masks=masks, dst=RigL(frequency=2, end_step=8), epochs=2,
                      progress=False)
    assert result.summary["mask_updates"] == 5
    for name in masks:
        assert int(result.masks[name].sum()) == int(masks[name].sum())
    assert any(not torch.equal(result.masks[n], masks[n]) for n in masks)
