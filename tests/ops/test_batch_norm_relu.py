"""The fused BatchNorm (+ residual, + ReLU) op against F.batch_norm (+ add, F.relu) in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from graspext import ops
from tests.conftest import hypothesis_settings


def _reference(x, weight, bias, eps, relu, residual=None):
    y = F.batch_norm(x.unsqueeze(-1), None, None, weight, bias, True, 0.1, eps).squeeze(-1)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _leaf(t):
    return t.clone().requires_grad_() if t is not None else None


def _check(x, weight, bias, eps, relu, tol, residual=None):
    xs, ws, bs, rs = (_leaf(t) for t in (x, weight, bias, residual))
    y, mean, var = ops.batch_norm_relu(xs, ws, bs, eps, relu, rs)
    xr, wr, br, rr = (_leaf(t) for t in (x, weight, bias, residual))
    yr = _reference(xr, wr, br, eps, relu, rr)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(mean, x.mean((0, 2)), **tol)
    torch.testing.assert_close(var, x.var((0, 2), unbiased=False), **tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    yr.backward(grad)
    torch.testing.assert_close(xs.grad, xr.grad, **tol)
    for ours, ref in ((ws, wr), (bs, br), (rs, rr)):
        if ours is not None:
            torch.testing.assert_close(ours.grad, ref.grad, **tol)


def problems(max_length: int):
    """Draws of a float64 problem (and whether to fuse the ReLU) for the property tests of every backend."""
    return {"p": st.integers(1, 9), "c": st.integers(1, 7), "length": st.integers(1, max_length),
            "relu": st.booleans(), "affine": st.booleans(), "residual": st.booleans(),
            "offset": st.sampled_from([0.0, 3.0, -50.0]), "seed": st.integers(0, 2**16)}


def problem(p, c, length, affine, residual, offset, seed):
    """(x, weight, bias, residual) for one draw of :func:`problems`, or None where a channel has one value (no
    variance; rejected, see test_rejects_bad_input)."""
    if p * length < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, c, length, generator=g, dtype=torch.float64) * 2 + offset
    weight = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    shortcut = torch.randn(p, c, length, generator=g, dtype=torch.float64) if residual else None
    return x, weight, bias, shortcut


@hypothesis_settings(60)
@given(**problems(max_length=40))
def test_matches_torch_float64(relu, **draw):
    drawn = problem(**draw)
    if drawn is not None:
        x, weight, bias, shortcut = drawn
        _check(x, weight, bias, 1e-5, relu, {}, shortcut)


@pytest.mark.parametrize("shape", [(1024, 16, 128), (16, 64, 128), (128, 8, 64), (4, 3, 2)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_torch_float32(shape, relu, residual):
    x, weight, bias, shortcut = float32_problem(shape, residual)
    _check(x, weight, bias, 1e-5, relu, {"rtol": 1e-4, "atol": 1e-4}, shortcut)


def float32_problem(shape, residual: bool):
    """(x, weight, bias, residual or None) in float32, the input off zero mean and unit variance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 3 + 1
    c = shape[1]
    shortcut = torch.randn(*shape, generator=g) if residual else None
    return x, torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), shortcut


def test_output_without_relu_may_be_modified_in_place():
    """As after torch's batch_norm: a ResNet block adds its shortcut into the output in place."""
    g = torch.Generator().manual_seed(7)
    x, w, b, shortcut = (torch.randn(shape, generator=g, dtype=torch.float64)
                         for shape in ((4, 3, 6), (3,), (3,), (4, 3, 6)))
    xs, ws, bs = (_leaf(t) for t in (x, w, b))
    y, _, _ = ops.batch_norm_relu(xs, ws, bs, 1e-5, False)
    y += shortcut
    xr, wr, br = (_leaf(t) for t in (x, w, b))
    yr = _reference(xr, wr, br, 1e-5, False) + shortcut
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad)
    yr.backward(grad)
    for ours, ref in ((xs, xr), (ws, wr), (bs, br)):
        torch.testing.assert_close(ours.grad, ref.grad)


def test_nan_passes_relu_as_in_torch():
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    residual = torch.zeros_like(x)
    residual[0, 0, 0] = float("nan")
    y, _, _ = ops.batch_norm_relu(x, None, None, 1e-5, True, residual)
    assert torch.isnan(y[0, 0, 0]) and not torch.isnan(y[1:]).any()


def test_variance_survives_a_large_mean():
    # Sums are taken around each channel's first value: E[x^2] - E[x]^2 in float32 would lose the variance.
    x = torch.randn(64, 4, 128, dtype=torch.float64) * 0.01 + 1e4
    _, _, var = ops.batch_norm_relu(x.float(), None, None, 1e-5, False)
    torch.testing.assert_close(var.double(), x.float().double().var((0, 2), unbiased=False), rtol=1e-3, atol=0)


def test_deterministic_across_thread_counts():
    x = torch.randn(300, 8, 32)
    grad = torch.randn_like(x)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs = x.clone().requires_grad_()
            y, mean, var = ops.batch_norm_relu(xs, None, None, 1e-5, True)
            y.backward(grad)
            results.append((y, mean, var, xs.grad))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gradcheck():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    for relu in (False, True):
        fn = lambda x_, w_, b_, r_, relu=relu: ops.batch_norm_relu(x_, w_, b_, 1e-5, relu, r_)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, r))


def test_opcheck():
    x = torch.randn(4, 3, 6, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    r = torch.randn(4, 3, 6, requires_grad=True)
    op = torch.ops.graspext.batch_norm_relu.default
    for relu in (False, True):
        torch.library.opcheck(op, (x, w, b, None, 1e-5, relu))
        torch.library.opcheck(op, (x, None, None, r, 1e-5, relu))
    y, mean, var = op(x.detach(), w.detach(), b.detach(), None, 1e-5, True)
    for residual_grad in (False, True):
        torch.library.opcheck(torch.ops.graspext.batch_norm_relu_backward.default,
                              (torch.randn_like(y), x.detach(), y, w.detach(), mean, var, 1e-5, True, residual_grad))


def test_rejects_bad_input():
    x = torch.randn(4, 3, 6)
    with pytest.raises(ValueError, match="3-D"):
        ops.batch_norm_relu(x[0], None, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.batch_norm_relu(x, torch.ones(4), None)
    with pytest.raises(ValueError, match="more than one value"):
        ops.batch_norm_relu(torch.randn(1, 3, 1), None, None)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.batch_norm_relu(x, torch.ones(3, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16, got Half"):
        ops.batch_norm_relu(x.half(), None, None)
    with pytest.raises(RuntimeError, match="eps must be"):
        ops.batch_norm_relu(x, None, None, -1.0)
    with pytest.raises(ValueError, match="residual must have"):
        ops.batch_norm_relu(x, None, None, 1e-5, True, x[:2])
    with pytest.raises(RuntimeError, match="residual must match"):
        ops.batch_norm_relu(x, None, None, 1e-5, True, x.double())


def _within_bf16_rounding(actual, reference, what):
    """One rounding to bfloat16 (relative 2^-8) of a value computed in float32 (a floor of 1e-4 of the scale)."""
    err = (actual.double() - reference).abs()
    bound = 2.0**-8 * reference.abs() + 1e-4 * reference.abs().max()
    assert bool((err <= bound).all()), f"{what}: error {err.max().item():.3g} exceeds the bfloat16 rounding bound"


@pytest.mark.parametrize("shape", [(64, 16, 128), (9, 5, 37), (4, 3, 2), (1, 7, 130)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_bfloat16_input_float32_statistics(shape, relu, residual):
    """bfloat16 activations (as under CPU autocast) with float32 parameters: float32 statistics and parameter
    gradients, bfloat16 output and input gradients each within one rounding of the float64 reference."""
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1).to(torch.bfloat16)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    shortcut = torch.randn(*shape, generator=g).to(torch.bfloat16) if residual else None
    xs, ws, bs, rs = (_leaf(t) for t in (x, w, b, shortcut))
    y, mean, var = ops.batch_norm_relu(xs, ws, bs, 1e-5, relu, rs)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    xr, wr, br, rr = (_leaf(t.double()) if t is not None else None for t in (x, w, b, shortcut))
    yr = _reference(xr, wr, br, 1e-5, relu, rr)
    _within_bf16_rounding(y, yr.detach(), "output")
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), x.double().var((0, 2), unbiased=False), rtol=1e-5, atol=1e-5)
    grad = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(grad)
    yr.backward(grad.double())
    assert xs.grad.dtype == torch.bfloat16 and ws.grad.dtype == bs.grad.dtype == torch.float32
    _within_bf16_rounding(xs.grad, xr.grad, "input gradient")
    torch.testing.assert_close(ws.grad.double(), wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bs.grad.double(), br.grad, rtol=1e-4, atol=1e-4)
    if residual:
        assert torch.equal(rs.grad.double(), rr.grad if not relu else rr.grad.to(torch.bfloat16).double())


def test_bfloat16_rejects_float64_parameters():
    x = torch.randn(4, 3, 8).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight has dtype Double but input has BFloat16"):
        ops.batch_norm_relu(x, torch.ones(3, dtype=torch.float64), None)
