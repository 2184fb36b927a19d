"""graspext's IMP pruning against the independent re-implementation of Ma et al.'s official pruning step."""

import numpy as np
import pytest
import torch

import graspext as gx
from graspext.lottery import IMPConfig, dense_masks, prune_remaining, prune_to, run_imp
from graspext.masks import Masks
from graspext.testing.official_lth import (
    RESNET20_PRUNABLE,
    official_harden,
    official_layer_mask,
    official_masked_layers,
    official_round_sparsity,
)
from tests.helpers import TinyNet, ordered_loader, tiny_data


def _official_masks(model, masks):
    """The official hardening of ``model``'s weights, its pruned positions zero as the official code holds them."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().numpy() * masks[n].numpy() for n in masks}


def test_resnet20_prunes_the_layers_of_the_official_profile():
    masks = dense_masks(gx.models.resnet20(), keep_first_dense=True, keep_last_dense=True)
    assert sorted(masks) == sorted(RESNET20_PRUNABLE)


@pytest.mark.parametrize("seed", [0, 1])
def test_fourteen_rounds_select_what_the_official_code_selects(seed):
    """Each round re-draws the "trained" weights and prunes them. At the official count graspext's global magnitude
    selection is the official mask bit for bit; graspext's own count (exactly 20 % of the remaining weights) is
    within the official rounding of the cumulative sparsity to 3 decimals, on a nested mask."""
    torch.manual_seed(seed)
    model = gx.models.resnet20()
    masks = dense_masks(model, keep_first_dense=True, keep_last_dense=True)
    total = sum(m.numel() for m in masks.values())
    for r in range(14):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * p.abs().mean())
        weights = _official_masks(model, masks)
        official = Masks({n: torch.from_numpy(m) for n, m in official_harden(weights, official_round_sparsity(r, 0.2))
                          .items()})
        same_count = prune_to(model, masks, official.num_kept())
        assert all(torch.equal(same_count[n], official[n]) for n in masks), f"round {r}"
        ours = prune_remaining(model, masks, 0.2)
        small, large = sorted((ours, official), key=Masks.num_kept)
        assert all(not (small[n] & ~large[n]).any() for n in masks)
        assert abs(ours.num_kept() - official.num_kept()) <= 0.0005 * total + r + 1
        masks = ours


def test_layerwise_rounds_keep_what_the_official_per_layer_percentile_keeps():
    """The official "irregular" (per-layer) pruning at our per-layer ratio: the same masks."""
    torch.manual_seed(2)
    model = TinyNet()
    masks = dense_masks(model)
    for _ in range(4):
        ours = prune_remaining(model, masks, 0.3, scope="layerwise")
        for name, w in _official_masks(model, masks).items():
            pruned = w.size - ours[name].sum().item()
            # np.percentile interpolates at position ratio * (n - 1) of the sorted |w|; a position between the
            # last pruned and the first kept value is our count: aim at the middle of that gap.
            official = official_layer_mask(w, (pruned - 0.5) / (w.size - 1))
            assert np.array_equal(official, ours[name].numpy()), name
        masks = ours


def test_official_round_sparsities_and_quirks():
    assert [official_round_sparsity(r, 0.2) for r in (0, 1, 13)] == [0.2, 0.36, 0.956]
    masks = {"a": np.array([True] * 19 + [False]), "b": np.array([True] * 8 + [False] * 2)}
    assert official_masked_layers(masks) == ["b"]  # a is 5 % sparse: the official code trains it dense


def test_imp_run_prunes_its_pruned_on_checkpoint_as_the_official_code_does(tmp_path):
    """Round 1's masks come from round 0's checkpoint of best validation accuracy (``pruned_on.pt``): the same
    weights the official code reloads before hardening."""
    data = tiny_data(torch.float32, n=32)
    train = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = ordered_loader(tiny_data(torch.float32, n=16, seed=1))
    run_imp(TinyNet, train, val, IMPConfig(rounds=1, rate=0.2), str(tmp_path), seed=0, log=lambda _: None,
            epochs=3, lr=0.05, progress=False)
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "round-00" / "pruned_on.pt", weights_only=True))
    round1 = Masks.load(tmp_path / "round-01" / "masks.pt")
    full = dense_masks(model)
    weights = _official_masks(model, full)
    total = sum(w.size for w in weights.values())
    official = official_harden(weights, (total - round1.num_kept() - 0.5) / (total - 1))  # as in the test above
    assert all(np.array_equal(official[n], round1[n].numpy()) for n in round1)
