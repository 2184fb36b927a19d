import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graspext import ops
from tests.conftest import DEVICES, hypothesis_settings, skip_without_kernel

REFERENCE = {
    "neg_product": lambda w, v: -(w * v),
    "abs_product": lambda w, v: (w * v).abs(),
    "product": lambda w, v: w * v,
}


def _lists(shapes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda: [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]  # noqa: E731
    return make(), make(), make()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", sorted(REFERENCE))
@pytest.mark.parametrize("shapes", [[(7,)], [(3, 5), (64, 3, 3, 3), (0,), (100_003,)], [(1,)] * 9])
def test_matches_reference(device, dtype, mode, shapes):
    skip_without_kernel("score_accumulate_", device)
    scores, weights, values = _lists(shapes, dtype, device, seed=len(shapes))
    expected = [s + 0.25 * REFERENCE[mode](w, v) for s, w, v in zip(scores, weights, values)]
    ops.score_accumulate_(scores, weights, values, 0.25, mode)
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@hypothesis_settings(40)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4).map(tuple), min_size=1, max_size=6),
    alpha=st.floats(-10, 10, allow_nan=False),
    mode=st.sampled_from(sorted(REFERENCE)),
    seed=st.integers(0, 2**16),
)
def test_property_float64(shapes, alpha, mode, seed):
    scores, weights, values = _lists(shapes, torch.float64, "cpu", seed)
    expected = [s + alpha * REFERENCE[mode](w, v) for s, w, v in zip(scores, weights, values)]
    ops.score_accumulate_(scores, weights, values, alpha, mode)
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want)


def test_mixed_input_dtype_computed_in_score_dtype():
    w = torch.randn(50, dtype=torch.float16)
    v = torch.randn(50, dtype=torch.bfloat16)
    s = torch.zeros(50)
    ops.score_accumulate_([s], [w], [v], 1.0, "abs_product")
    torch.testing.assert_close(s, (w.float() * v.float()).abs())


def test_non_contiguous_inputs():
    w = torch.randn(8, 6).t()
    v = torch.randn(6, 8)
    s = torch.zeros(6, 8)
    ops.score_accumulate_([s], [w], [v], 2.0, "product")
    torch.testing.assert_close(s, 2 * w * v)


@pytest.mark.parametrize("bad, match", [
    (dict(mode="sum"), "mode must be one of"),
    (dict(values=[torch.randn(3)]), r"values\[0\] has shape"),
    (dict(weights=[]), "weights must be a non-empty list"),
    (dict(scores=[torch.zeros(4, dtype=torch.int64)]), r"scores\[0\] must be float32 or float64"),
    (dict(scores=[torch.zeros(4, 2).t()], weights=[torch.ones(2, 4)], values=[torch.ones(2, 4)]), "contiguous"),
    (dict(weights=[torch.ones(4, dtype=torch.int32)]), r"weights\[0\] must be floating point"),
])
def test_bad_input_names_argument(bad, match):
    args = dict(scores=[torch.zeros(4)], weights=[torch.ones(4)], values=[torch.ones(4)], alpha=1.0, mode="product")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.score_accumulate_(**args)


def test_raw_op_checks_in_cpp():
    with pytest.raises(RuntimeError, match="mode must be one of"):
        torch.ops.graspext.score_accumulate_([torch.zeros(2)], [torch.ones(2)], [torch.ones(2)], 1.0, "nope")
    with pytest.raises(RuntimeError, match="values must have one tensor per score"):
        torch.ops.graspext.score_accumulate_([torch.zeros(2)], [torch.ones(2)], [], 1.0, "product")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_without_kernel("score_accumulate_", device)
    s, w, v = _lists([(3, 4), (5,)], torch.float32, device, 0)
    torch.library.opcheck(torch.ops.graspext.score_accumulate_.default, (s, w, v, 0.5, "neg_product"))
