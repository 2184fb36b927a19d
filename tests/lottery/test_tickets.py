import pytest
import torch
from torch import nn

import graspext as gx
from graspext.lottery import (
    RewindCapture,
    dense_masks,
    prune_remaining,
    prune_to,
    random_masks_like,
    reinitialized,
    rewind_,
    state_copy,
)
from tests.helpers import TinyNet, ordered_loader, tiny_data, tiny_net


def _random_weights(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_dense_masks_follow_the_layer_choice():
    model = tiny_net(torch.float32)
    assert list(dense_masks(model)) == ["conv1.weight", "conv2.weight", "fc.weight"]
    masks = dense_masks(model, keep_first_dense=True, keep_last_dense=True)  # Ma et al.: conv1 and fc dense
    assert list(masks) == ["conv2.weight"] and masks.density() == 1.0


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.37])
def test_global_round_removes_exactly_rate_of_the_remaining_by_magnitude(rate):
    model = _random_weights(tiny_net(torch.float32))
    masks = dense_masks(model)
    params = dict(model.named_parameters())
    for _ in range(4):
        kept = masks.num_kept()
        new = prune_remaining(model, masks, rate)
        assert new.num_kept() == kept - int(rate * kept)
        for n in masks:  # never revived, compared element by element
            assert not (new[n] & ~masks[n]).any()
        # The removed weights are exactly the smallest |w| among the kept (all of them continuous: no ties).
        kept_abs = torch.cat([params[n].detach().abs()[masks[n]] for n in masks])
        removed_abs = torch.cat([params[n].detach().abs()[masks[n] & ~new[n]] for n in masks])
        assert torch.equal(removed_abs.sort().values, kept_abs.sort().values[: int(rate * kept)])
        masks = new


def test_layerwise_round_removes_rate_of_each_layer():
    model = _random_weights(tiny_net(torch.float32), seed=1)
    masks = dense_masks(model)
    for _ in range(3):
        new = prune_remaining(model, masks, 0.2, scope="layerwise")
        for n in masks:
            k = int(masks[n].sum())
            assert int(new[n].sum()) == k - int(0.2 * k), n
            assert not (new[n] & ~masks[n]).any()
            w = dict(model.named_parameters())[n].detach().abs()
            assert w[masks[n] & ~new[n]].max() <= w[new[n]].min()
        masks = new


def test_one_shot_pruning_to_a_count_keeps_the_largest_magnitudes():
    model = _random_weights(tiny_net(torch.float32), seed=2)
    masks = dense_masks(model)
    params = dict(model.named_parameters())
    out = prune_to(model, masks, 1000)
    assert out.num_kept() == 1000
    kept = torch.cat([params[n].detach().abs()[out[n]] for n in out])
    dropped = torch.cat([params[n].detach().abs()[~out[n]] for n in out])
    assert kept.min() >= dropped.max()
    with pytest.raises(ValueError, match="num_kept must be an int in"):
        prune_to(model, masks, masks.num_kept() + 1)


def test_collapse_is_refused_unless_allowed():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1, bias=False))
    masks = gx.Masks({"0.weight": torch.ones(3, 4, dtype=torch.bool), "1.weight": torch.tensor([[True, False, False]])})
    with torch.no_grad():
        model[1].weight.fill_(1e-6)  # the smallest: global pruning takes the last layer's only weight
    with pytest.raises(RuntimeError, match="layer collapse"):
        prune_remaining(model, masks, 0.2)
    with pytest.warns(gx.LayerCollapseWarning):
        out = prune_remaining(model, masks, 0.2, on_collapse="warn")
    assert out.meta["collapsed_layers"] == ["1.weight"]


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.1, True, "0.2"])
def test_bad_rates(rate):
    model = tiny_net(torch.float32)
    with pytest.raises(ValueError, match=r"rate must be a fraction of the remaining weights in \(0, 1\)"):
        prune_remaining(model, dense_masks(model), rate)


def test_random_masks_keep_every_layer_count():
    model = _random_weights(tiny_net(torch.float32))
    masks = prune_remaining(model, dense_masks(model), 0.7)
    shuffled = random_masks_like(masks, seed=3)
    for n in masks:
        assert int(shuffled[n].sum()) == int(masks[n].sum())
    assert any(not torch.equal(shuffled[n], masks[n]) for n in masks)
    assert all(torch.equal(shuffled[n], random_masks_like(masks, seed=3)[n]) for n in masks)


def test_random_reinitialisation_is_a_fresh_draw_of_the_same_architecture():
    make = TinyNet  # draws from the global RNG (tiny_net seeds it)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b = reinitialized(make, 1), reinitialized(make, 2)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left as it was
    assert a.state_dict().keys() == b.state_dict().keys()
    assert not torch.equal(a.conv2.weight, b.conv2.weight)
    assert torch.equal(a.conv2.weight, reinitialized(make, 1).conv2.weight)


def test_rewind_capture_keeps_the_state_after_k_steps_and_rewinding_restores_it_bit_for_bit():
    data = tiny_data(torch.float32)
    model = tiny_net(torch.float32)
    masks = prune_remaining(_random_weights(tiny_net(torch.float32)), dense_masks(model), 0.5)
    capture = RewindCapture(3)
    gx.train(model, ordered_loader(data), ordered_loader(data), masks=masks, callbacks=[capture], epochs=1,
             progress=False)
    # The same first 3 steps, replayed with a 3-batch epoch, end where the capture stood.
    replay = tiny_net(torch.float32)
    three = torch.utils.data.Subset(data, range(24))
    gx.train(replay, ordered_loader(three), ordered_loader(three), masks=masks, epochs=1, progress=False)
    for k, v in state_copy(replay).items():
        assert torch.equal(capture.state[k], v), k
    rewind_(model, capture.state)
    handle = masks.apply_(model)
    for n in masks:
        w = dict(model.named_parameters())[n]
        assert torch.equal(w[masks[n]], capture.state[n][masks[n]])  # kept weights: the captured values exactly
    handle.remove()
    with pytest.raises(ValueError, match="rewind step 6 lies beyond the training, whose steps are 0..5"):
        gx.train(tiny_net(torch.float32), ordered_loader(data), ordered_loader(data), callbacks=[RewindCapture(6)],
                 epochs=1, progress=False)
    with pytest.raises(ValueError, match="lacks"):
        rewind_(nn.Linear(2, 2), capture.state)
