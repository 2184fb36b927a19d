"""The bfloat16 CPU sparse kernels against a float64 reference, within a rounding bound per output.

The kernels read bfloat16 images and float32 (or bfloat16) weights, multiply and accumulate in float32, and
round each forward or input-gradient value to bfloat16 once; weight gradients stay float32. So for an output
y = b + sum of n products p_i, computed from exactly representable inputs, the error is at most

    gamma(n + 1) * (|b| + sum |p_i|)        float32 accumulation, any order (gamma(k) = k u / (1 - k u), u = 2^-24)
  + 2^-8 * (|y| + that)                      the one rounding to bfloat16 (its unit roundoff), bf16 outputs only

with n the number of terms of that output. The magnitudes sum |p_i| come from the same reference on |inputs|.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from graspext import ops
from graspext.nn.pattern import SparsePattern
from tests.conftest import hypothesis_settings
from tests.ops.test_sparse_conv2d import CASES, CONV_PROBLEMS, ISAS, SUPPORTED, _case, _using_isa, conv_problem

U32 = 2.0**-24
U_BF16 = 2.0**-8


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _assert_within(actual, reference, magnitude, terms: int, rounds_to_bf16: bool, what: str):
    accumulation = _gamma(terms + 1) * magnitude
    bound = accumulation + (U_BF16 * (reference.abs() + accumulation) if rounds_to_bf16 else 0)
    err = (actual.double() - reference).abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the rounding bound by {worst:.3g} (max error {err.max().item():.3g})"


def _check_bf16_conv(x, weight, b, mask, stride, padding, values_dtype=torch.float32):
    """Output, input, value and bias gradients of the bf16 op against float64, each within its bound."""
    x = x.to(torch.bfloat16)  # the inputs the kernel sees are exact in every dtype below
    weight = weight.to(values_dtype).to(torch.float64)
    b = b.to(values_dtype).to(torch.float64) if b is not None else None
    pattern = SparsePattern.from_mask(mask)
    values = pattern.gather(weight).to(values_dtype).requires_grad_()
    xs = x.clone().requires_grad_()
    bs = b.to(values_dtype).requires_grad_() if b is not None else None
    y = ops.sparse_conv2d(xs, values, pattern, bs, stride, padding)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(y.shape, dtype=torch.float64).to(torch.bfloat16)
    grads = torch.autograd.grad(y, [t for t in (xs, values, bs) if t is not None], grad)

    xr = x.double().requires_grad_()
    wr = weight.clone().requires_grad_()
    yr = F.conv2d(xr, wr, b, stride, padding)
    g_x, g_w = torch.autograd.grad(yr, [xr, wr], grad.double())
    # Magnitudes: the same products on absolute values.
    xa = x.double().abs().requires_grad_()
    wa = weight.abs().requires_grad_()
    ya = F.conv2d(xa, wa, b.abs() if b is not None else None, stride, padding)
    a_x, a_w = torch.autograd.grad(ya, [xa, wa], grad.double().abs())
    cout, cin, kh, kw = weight.shape
    _assert_within(y, yr.detach(), ya.detach(), cin * kh * kw, True, "output")
    _assert_within(grads[0], g_x, a_x, cout * kh * kw, True, "input gradient")
    assert grads[1].dtype == values_dtype
    terms = y.shape[0] * y.shape[2] * y.shape[3]
    if values_dtype == torch.float32:
        _assert_within(grads[1], pattern.gather(g_w), pattern.gather(a_w), terms, False, "value gradient")
    else:  # bfloat16 values get their float32 gradient rounded once
        _assert_within(grads[1], pattern.gather(g_w), pattern.gather(a_w), terms, True, "value gradient")
    if b is not None:
        assert grads[2].dtype == values_dtype
        g_b = grad.double().sum((0, 2, 3))
        _assert_within(grads[2], g_b, grad.double().abs().sum((0, 2, 3)), terms, values_dtype == torch.bfloat16,
                       "bias gradient")


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in SUPPORTED:
        pytest.skip(f"this CPU does not run {request.param}")
    with _using_isa(request.param):
        yield request.param


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bf16_conv_within_rounding_bound(isa, case):
    n, cin, cout, h, w, k, stride, padding, density = case
    x, weight, b, mask = _case(n, cin, cout, h, w, k, density, torch.float64, seed=11)
    _check_bf16_conv(x, weight, b, mask, stride, padding)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[-1]], ids=["small", "batch130", "1x1"])
def test_bf16_conv_with_bfloat16_values(isa, case):
    n, cin, cout, h, w, k, stride, padding, density = case
    x, weight, b, mask = _case(n, cin, cout, h, w, k, density, torch.float64, seed=12)
    _check_bf16_conv(x, weight, b, mask, stride, padding, values_dtype=torch.bfloat16)


@hypothesis_settings(60)
@given(isa_name=st.sampled_from(SUPPORTED), **CONV_PROBLEMS)
def test_bf16_conv_property_every_isa(isa_name, **draw):
    """Any shape, stride, padding, density and batch (1 included), on every code path this CPU runs."""
    problem = conv_problem(**draw)
    if problem is not None:
        with _using_isa(isa_name):
            _check_bf16_conv(*problem)


def test_bf16_large_magnitudes_and_non_finite_values():
    """Rounding of large values and the bfloat16 of NaN and infinity, as torch rounds them."""
    x = torch.tensor([3.0e38, -3.0e38, float("nan"), float("inf"), 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -0.0, 1.0])
    x = x.repeat(5)[:37].view(37, 1, 1, 1)  # a partial vector at the end of the batch
    pattern = SparsePattern.from_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool))
    values = torch.ones(1)
    # float32 inputs carry values bfloat16 cannot hold: compare with torch's rounding of the float32 product.
    y = torch.ops.graspext.sparse_conv2d(x.to(torch.bfloat16), values, *pattern.tensors(), None, [1, 1, 1, 1],
                                         [1, 1], [0, 0])
    expected = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])
    # A float32 weight that rounds differently: the product rounds once, from float32.
    w = torch.tensor([1.0 + 2.0**-9])
    one = torch.ones(33, 1, 1, 1, dtype=torch.bfloat16)
    y = torch.ops.graspext.sparse_conv2d(one, w, *pattern.tensors(), None, [1, 1, 1, 1], [1, 1], [0, 0])
    assert torch.equal(y.flatten(), (one.float() * w).to(torch.bfloat16).flatten())


def test_bf16_linear_within_rounding_bound(isa):
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(37, 45, generator=g) < 0.3
    weight = torch.randn(37, 45, generator=g, dtype=torch.float64) * mask
    x = torch.randn(70, 45, generator=g, dtype=torch.float64).to(torch.bfloat16)
    b = torch.randn(37, generator=g)
    pattern = SparsePattern.from_mask(mask[:, :, None, None])
    values = pattern.gather(weight[:, :, None, None]).float().requires_grad_()
    xs = x.clone().requires_grad_()
    y = ops.sparse_linear(xs, values, pattern, b)
    assert y.dtype == torch.bfloat16
    yr = F.linear(x.double(), values.detach().double().new_zeros(37 * 45).index_put_(
        (pattern.flat_indices(),), values.detach().double()).view(37, 45), b.double())
    ya = F.linear(x.double().abs(), weight.abs().float().double(), b.double().abs())
    _assert_within(y, yr, ya, 45, True, "linear output")
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16


# ---- autocast --------------------------------------------------------------------------------------------


def _layer_case():
    x, weight, b, mask = _case(9, 4, 6, 7, 7, 3, 0.4, torch.float32, seed=21)
    pattern = SparsePattern.from_mask(mask)
    return x, pattern.gather(weight), pattern, b, weight


def test_autocast_bf16_runs_the_kernels_in_bfloat16_with_float32_gradients():
    x, values, pattern, b, weight = _layer_case()
    xs, vs, bs = x.clone().requires_grad_(), values.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.sparse_conv2d(xs, vs, pattern, bs, 1, 1)
        ref = F.conv2d(x, weight, b, 1, 1)  # autocast's dense conv, for the dtype rule
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xs.grad.dtype == vs.grad.dtype == bs.grad.dtype == torch.float32
    # The same as the op on the bfloat16 input outside autocast: autocast only cast the image.
    direct = ops.sparse_conv2d(x.to(torch.bfloat16), values, pattern, b, 1, 1)
    assert torch.equal(y, direct)


def test_autocast_keeps_float64():
    x, values, pattern, b, weight = _layer_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.sparse_conv2d(x.double(), values.double(), pattern, b.double(), 1, 1)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.conv2d(x.double(), weight.double(), b.double(), 1, 1))


@pytest.mark.slow
def test_float16_autocast_computes_in_float32_and_warns_once():
    """The CPU kernels have no float16 path: float32 results, one warning per process (checked in a fresh one)."""
    script = """
import warnings, torch, graspext
from graspext import ops
from graspext.nn.pattern import SparsePattern
p = SparsePattern.from_mask(torch.rand(4, 3, 3, 3) < 0.5)
x, v = torch.randn(2, 3, 5, 5), torch.randn(p.nnz)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.autocast("cpu", dtype=torch.float16):
        y1 = ops.sparse_conv2d(x, v, p, None, 1, 1)
        y2 = ops.sparse_conv2d(x.half(), v, p, None, 1, 1)
assert y1.dtype == y2.dtype == torch.float32, (y1.dtype, y2.dtype)
torch.testing.assert_close(y1, ops.sparse_conv2d(x, v, p, None, 1, 1))
ours = [w for w in caught if "no float16 path" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---- bad input -------------------------------------------------------------------------------------------


def test_rejects_mismatched_dtypes_with_bfloat16():
    x, values, pattern, b, _ = _layer_case()
    xb = x.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"values has dtype torch.float64 but input has torch.bfloat16.*float32"):
        ops.sparse_conv2d(xb, values.double(), pattern, None, 1, 1)
    with pytest.raises(TypeError, match="values has dtype torch.bfloat16 but input has torch.float32"):
        ops.sparse_conv2d(x, values.to(torch.bfloat16), pattern, None, 1, 1)
    with pytest.raises(RuntimeError, match="bias has dtype Double but input has BFloat16"):
        ops.sparse_conv2d(xb, values, pattern, b.double(), 1, 1)
    with pytest.raises(RuntimeError, match="input must be float32, float64 or bfloat16, got Half"):
        torch.ops.graspext.sparse_conv2d(x.half(), values.half(), *pattern.tensors(), None,
                                         list(pattern.weight_shape), [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="grad_output has dtype BFloat16 but input has Float"):
        torch.ops.graspext.sparse_conv2d_backward_weight(torch.zeros(9, 6, 7, 7, dtype=torch.bfloat16), x,
                                                         pattern.row_ptr, pattern.row_taps,
                                                         list(pattern.weight_shape), [1, 1], [1, 1])
