"""The update rule against the plain-torch re-implementation of the official TF1 rule, in float64."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graspext.dst.rule import drop_and_grow, stateless_generator, top_k_first_index
from graspext.dst.schedule import num_to_drop
from graspext.testing.official_rigl import rigl_mask_update_official, set_mask_update_official
from tests.conftest import hypothesis_settings


def _layer(shape, density, seed):
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    keep = max(1, int(n * density))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:keep]] = True
    weight = torch.randn(n, generator=gen, dtype=torch.float64) * mask
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    return mask.view(shape), weight.view(shape), grad.view(shape)


@given(shape=st.sampled_from([(8, 4, 3, 3), (16, 8), (5, 3, 1, 1), (32, 16, 3, 3), (1, 7)]),
       density=st.floats(0.02, 0.9), fraction=st.floats(0.0, 0.99), seed=st.integers(0, 10_000),
       noise=st.booleans())
@hypothesis_settings(60)
def test_rigl_update_equals_the_official_rule(shape, density, fraction, seed, noise):
    mask, weight, grad = _layer(shape, density, seed)
    drop_noise = full_noise = None
    if noise:
        drop_noise = torch.randn(int(mask.sum()), generator=stateless_generator(seed, "drop"),
                                 dtype=torch.float64) * 1e-5
        full_noise = torch.zeros(shape, dtype=torch.float64)
        full_noise[mask] = drop_noise  # the official draws noise everywhere; only the active entries matter
    n_drop = num_to_drop(int(mask.sum()), fraction)
    new_mask, grown = drop_and_grow(mask, weight, grad.abs(), n_drop, drop_noise)
    official_mask, _, official_new = rigl_mask_update_official(mask, weight, grad, fraction, full_noise)
    assert torch.equal(new_mask, official_mask)
    assert torch.equal(grown & ~mask, official_new)
    assert int(new_mask.sum()) == int(mask.sum())  # the kept count is exact


@given(shape=st.sampled_from([(8, 4, 3, 3), (16, 8), (64, 3)]), density=st.floats(0.05, 0.8),
       fraction=st.floats(0.01, 0.99), seed=st.integers(0, 10_000))
@hypothesis_settings(40)
def test_set_update_equals_the_official_rule_and_never_grows_at_a_kept_position(shape, density, fraction, seed):
    mask, weight, _ = _layer(shape, density, seed)
    uniform = torch.rand(shape, generator=stateless_generator(seed, "grow"), dtype=torch.float64)
    n_drop = num_to_drop(int(mask.sum()), fraction)
    new_mask, grown = drop_and_grow(mask, weight, uniform, n_drop)
    official_mask, _, _ = set_mask_update_official(mask, weight, uniform, fraction)
    assert torch.equal(new_mask, official_mask)
    kept_by_drop = new_mask & ~grown
    assert not (grown & kept_by_drop).any()
    assert int(grown.sum()) == n_drop and int(kept_by_drop.sum()) == int(mask.sum()) - n_drop


def test_dropped_weights_are_the_smallest_and_grown_ones_the_largest_gradients():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    weight = torch.tensor([0.5, -0.1, 2.0, 0.3, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    grad = torch.tensor([0.0, 9.0, 0.0, 0.0, 1.0, 5.0, 0.2, 3.0], dtype=torch.float64)
    new_mask, grown = drop_and_grow(mask, weight, grad.abs(), 2)
    # |w| ranks 2.0, 0.5 to keep; 0.3 and -0.1 go. Grow: among the rest, grad 9.0 (the just-dropped index 1)
    # and 5.0 (index 5) are largest.
    assert new_mask.tolist() == [True, True, True, False, False, True, False, False]
    assert grown.tolist() == [False, True, False, False, False, True, False, False]


def test_ties_go_to_the_lower_index_as_tf_top_k():
    score = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert sorted(top_k_first_index(score, 2).tolist()) == [1, 2]
    assert sorted(top_k_first_index(score, 4).tolist()) == [1, 2, 3, 4]
    assert top_k_first_index(score, 0).numel() == 0
    mask = torch.zeros(6, dtype=torch.bool)
    mask[0] = True
    weight = torch.zeros(6, dtype=torch.float64)
    weight[0] = 1.0
    _, grown = drop_and_grow(mask, weight, torch.zeros(6), 1)  # every grow score ties at zero
    assert grown.nonzero().flatten().tolist() == [0]  # the dropped weight itself, index 0, wins the tie


def test_nan_gradients_are_refused():
    mask, weight, grad = _layer((4, 4), 0.5, 0)
    grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinity"):
        drop_and_grow(mask, weight, grad.abs(), 1)
    with pytest.raises(ValueError, match="n_drop must be in"):
        drop_and_grow(mask, weight, grad.abs().nan_to_num(), int(mask.sum()) + 1)


def test_stateless_generator_depends_on_the_key_only():
    a = torch.rand(5, generator=stateless_generator(0, "layer", 100, "grow"))
    b = torch.rand(5, generator=stateless_generator(0, "layer", 100, "grow"))
    c = torch.rand(5, generator=stateless_generator(0, "layer", 200, "grow"))
    assert torch.equal(a, b) and not torch.equal(a, c)
