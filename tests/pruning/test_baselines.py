import pytest
import torch

import graspext as gx
import graspext.pruning as pruning_pkg
from graspext.testing.official import snip_official, synflow_official
from tests.conftest import class_sorted_batch
from tests.pruning.rounds import assert_round_counts, assert_rounds_nested, masks_by_round, record_round_masks


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
@pytest.mark.parametrize("reinit", [True, False])
def test_snip_identical_to_port_float64(make_model, kind, reinit):
    model = make_model(kind, dtype=torch.float64)
    x, y = class_sorted_batch(dtype=torch.float64)
    ours = gx.prune(model, "snip", 0.9, (x, y), reinit=reinit, seed=5)
    ref = snip_official(model, 0.9, x, y, reinit=reinit, reinit_generator=torch.Generator().manual_seed(5))
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
@pytest.mark.parametrize("rounds", [1, 20])
def test_synflow_identical_to_official_loop_float64(make_model, kind, rounds):
    model = make_model(kind, dtype=torch.float64)
    ours = gx.prune(model, "synflow", 0.95, input_shape=(3, 8, 8), rounds=rounds)
    ref = synflow_official(model, 0.95, (3, 8, 8), rounds=rounds)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


def test_synflow_defaults_and_data_free(make_model):
    model = make_model("vgg")
    masks = gx.prune(model, "synflow", 0.9, class_sorted_batch())  # input shape read from the data
    assert masks.meta["rounds"] == 100
    assert masks.num_total() - masks.num_kept() == int(masks.num_total() * 0.9)
    with pytest.raises(ValueError, match="needs the input shape"):
        gx.prune(model, "synflow", 0.9)
    with pytest.raises(ValueError, match="input_shape must be a tuple of positive ints"):
        gx.prune(model, "synflow", 0.9, input_shape=(3, -1))


def test_iterative_rounds_never_revive(make_model, monkeypatch):
    model = make_model("vgg")
    calls = record_round_masks(monkeypatch)
    few = gx.prune(model, "synflow", 0.9, input_shape=(3, 8, 8), rounds=5)
    names = list(few)
    assert len(calls) == 5  # global scope: one selection over all layers per round
    rounds = masks_by_round(calls, len(names), 5)
    assert_rounds_nested(rounds)
    assert_round_counts(rounds, 0.9)
    assert all(torch.equal(few[n], rounds[-1][i].to(few[n].device)) for i, n in enumerate(names))
    assert few.num_total() - few.num_kept() == int(few.num_total() * 0.9)


def test_revival_check_fails_on_a_swapped_weight(make_model, monkeypatch):
    """The check above is not vacuous: a round that revives one weight and drops another (same totals) fails it."""
    selection_calls = []
    real = pruning_pkg.select_masks

    def reviving(scores, num_remove, remove_largest):
        masks, kept = real(scores, num_remove, remove_largest)
        if len(selection_calls) == 1:  # round 2: bring back one weight round 1 removed, drop a kept one
            prev = selection_calls[0][0].flatten()
            flat = masks[0].view(-1)
            revive = int((~prev & ~flat).nonzero()[0])
            drop = int(flat.nonzero()[0])
            flat[revive], flat[drop] = True, False
        selection_calls.append([m.clone() for m in masks])
        return masks, kept

    monkeypatch.setattr(pruning_pkg, "select_masks", reviving)
    calls = record_round_masks(monkeypatch)
    masks = gx.prune(make_model("vgg"), "synflow", 0.9, input_shape=(3, 8, 8), rounds=5)
    rounds = masks_by_round(calls, len(masks), 5)
    assert_round_counts(rounds, 0.9)  # the totals alone cannot see it
    with pytest.raises(AssertionError, match=r"round 2 revives weights removed by round 1: .* \[\(0, 1\)\]"):
        assert_rounds_nested(rounds)


def test_magnitude_is_global_top_k(make_model):
    model = make_model("resnet", dtype=torch.float64)
    masks = gx.prune(model, "magnitude", 0.8)
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().abs().flatten() for n in masks])
    threshold = torch.kthvalue(flat, int(flat.numel() * 0.8)).values
    for n, m in masks.items():
        assert torch.equal(m, params[n].detach().abs() > threshold)


def test_random_seeded_and_exact(make_model):
    model = make_model("vgg")
    a = gx.prune(model, "random", 0.9, seed=1)
    b = gx.prune(model, "random", 0.9, seed=1)
    c = gx.prune(model, "random", 0.9, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert a.num_total() - a.num_kept() == int(a.num_total() * 0.9)


def test_synflow_overflow_rescored_in_float64():
    from graspext.models import resnet110

    torch.manual_seed(0)
    model = resnet110()
    with pytest.warns(RuntimeWarning, match="overflowed float32"):
        masks = gx.prune(model, "synflow", 0.9, input_shape=(3, 32, 32), rounds=1, on_collapse="ignore")
    direct = gx.prune(model, "synflow", 0.9, input_shape=(3, 32, 32), rounds=1, double=True, on_collapse="ignore")
    assert all(torch.equal(masks[n], direct[n]) for n in masks)
