"""TopAgg (DataLens) against its plain-torch reference, and the properties its privacy argument rests on."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graspext.ops.topagg import topagg, topagg_reference, topagg_votes, topagg_votes_reference
from tests.conftest import DEVICES


@settings(max_examples=40, deadline=None)
@given(samples=st.integers(1, 3), teachers=st.integers(1, 20), d=st.integers(1, 70), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**62))
def test_votes_have_exactly_k_signs_and_match_the_reference(samples, teachers, d, data, dtype, seed):
    k = data.draw(st.integers(1, d))
    max_grad = data.draw(st.floats(1e-3, 10.0))
    g = torch.randn(samples, teachers, d, generator=torch.Generator().manual_seed(seed % 1000), dtype=dtype)
    votes = topagg_votes(g, k, max_grad, seed)
    assert votes.dtype == torch.int8 and votes.shape == g.shape
    assert bool(((votes == -1) | (votes == 0) | (votes == 1)).all())
    assert bool(((votes != 0).sum(-1) == k).all())
    assert torch.equal(votes, topagg_votes_reference(g, k, max_grad, seed))
    # the kept coordinates are the k largest |g|
    kept_min = g.abs().masked_fill(votes == 0, math.inf).amin(-1)
    dropped_max = g.abs().masked_fill(votes != 0, -math.inf).amax(-1)
    assert bool((kept_min >= dropped_max).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_op_matches_the_reference(device, dtype):
    g = torch.randn(5, 300, 64, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    for k, sigma, beta in ((8, 20.0, 0.2), (64, 0.5, 0.0), (1, 100.0, 0.9)):
        out, noisy = topagg(g, k, 1.0, sigma, beta, seed=7)
        ref_out, ref_noisy = topagg_reference(g, k, 1.0, sigma, beta, seed=7)
        assert out.dtype == torch.int8 and noisy.dtype == torch.float64 and out.shape == (5, 64)
        torch.testing.assert_close(noisy, ref_noisy, rtol=0, atol=1e-9)  # libm against torch: an ulp or so
        near = (ref_noisy.abs() - beta * 300).abs() < 1e-6
        assert torch.equal(out[~near], ref_out[~near])
        votes_sum = topagg_votes(g, k, 1.0, 7).sum(1, dtype=torch.int64).double()
        z = (noisy - votes_sum) / sigma  # the noise alone: standard normal
        assert abs(float(z.mean())) < 0.2 and abs(float(z.std()) - 1) < 0.2


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_index_and_seeds_are_deterministic(device):
    g = torch.zeros(2, 3, 10, device=device)
    g[..., [2, 5, 7]] = 0.5
    votes = topagg_votes(g, 2, 1.0, seed=3)
    assert bool((votes[..., [2, 5]] != 0).all()) and not bool(votes[..., 7].any())
    zero = topagg_votes(torch.zeros(1, 2, 6, device=device), 3, 1.0, seed=0)
    assert bool((zero[..., :3] != 0).all())  # an all-zero row keeps its first k, each vote a fair coin
    g = torch.randn(4, 10, 30, device=device)  # max_grad 10: b = max |g|, so the kept votes are coin flips
    assert torch.equal(topagg_votes(g, 5, 10.0, 9), topagg_votes(g, 5, 10.0, 9))
    assert not torch.equal(topagg_votes(g, 5, 10.0, 9), topagg_votes(g, 5, 10.0, 10))


def test_stochastic_sign_is_unbiased_on_the_kept_coordinates():
    """E[vote] = clip(g, b) / b with b = min(max |g|, max_grad), over many independent rows (fixed seed)."""
    rows, d, k, max_grad = 40_000, 12, 6, 0.8
    g = torch.tensor([1.5, -1.2, 0.9, -0.6, 0.4, 0.3, 0.2, -0.1, 0.05, 0.0, 0.01, -0.02], dtype=torch.float64)
    votes = topagg_votes(g.expand(rows, d).contiguous(), k, max_grad, seed=123).double()
    b = min(float(g.abs().max()), max_grad)
    expected = g.clamp(-b, b) / b
    kept = torch.arange(k)
    mean = votes.mean(0)
    stderr = torch.sqrt((1 - expected[kept] ** 2) / rows)
    assert bool(((mean[kept] - expected[kept]).abs() <= 4 * stderr + 1e-12).all())
    assert bool((votes[:, k:] == 0).all())


def test_one_teacher_changes_the_vote_sum_by_at_most_two_root_k():
    g = torch.randn(1, 50, 100, generator=torch.Generator().manual_seed(2))
    k = 17
    base = topagg_votes(g, k, 1.0, seed=4).sum(1).double()
    worst = 0.0
    for teacher in range(0, 50, 7):
        for replacement in (torch.randn(100), -g[0, teacher], torch.zeros(100)):
            changed = g.clone()
            changed[0, teacher] = replacement
            diff = topagg_votes(changed, k, 1.0, seed=4).sum(1).double() - base
            worst = max(worst, float(diff.norm()))
    assert 0 < worst <= 2 * math.sqrt(k) + 1e-12


def test_bad_input_gets_clear_errors():
    g = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        topagg(g, 11, 1.0, 1.0, 0.5, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        topagg_votes(g, 0, 1.0, 0)
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        topagg(g, 3, 1.0, 0.0, 0.5, 0)
    for beta in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
            topagg(g, 3, 1.0, 1.0, beta, 0)
    with pytest.raises(ValueError, match="max_grad must be a positive finite number"):
        topagg_votes(g, 3, 0.0, 0)
    with pytest.raises(ValueError, match=r"grads must be \[samples, teachers, d\]"):
        topagg(g[0], 3, 1.0, 1.0, 0.5, 0)
    with pytest.raises(TypeError, match="grads must be float32 or float64"):
        topagg_votes(g.to(torch.int32), 3, 1.0, 0)
    with pytest.raises(ValueError, match="grads contains NaN or Inf"):
        topagg_votes(torch.full((2, 5), float("nan")), 2, 1.0, 0)
    with pytest.raises(ValueError, match="seed must be an int"):
        topagg_votes(g, 3, 1.0, -1)


def test_opcheck():
    g = torch.randn(2, 6, 9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.graspext.topagg_votes, (g, 3, 1.0, 5))
    torch.library.opcheck(torch.ops.graspext.topagg, (g, 3, 1.0, 2.0, 0.3, 5))
