"""The CUDA fused BatchNorm (+ residual, + ReLU) op against F.batch_norm (+ add, F.relu) in float64 on the CPU
(skipped without CUDA)."""

import pytest
import torch
from hypothesis import given

from graspext import ops
from tests.conftest import hypothesis_settings, skip_without_kernel
from tests.ops.test_batch_norm_relu import _reference, _within_bf16_rounding, float32_problem, problem, problems

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_kernel():
    skip_without_kernel("batch_norm_relu", "cuda")


def _leaf(t, device):
    return t.detach().to(device, copy=True).requires_grad_() if t is not None else None


def _check_cuda(x, weight, bias, eps, relu, tol, residual=None):
    xs, ws, bs, rs = (_leaf(t, "cuda") for t in (x, weight, bias, residual))
    y, mean, var = ops.batch_norm_relu(xs, ws, bs, eps, relu, rs)
    assert y.is_cuda and mean.is_cuda
    xr, wr, br, rr = (_leaf(t.double(), "cpu") if t is not None else None for t in (x, weight, bias, residual))
    yr = _reference(xr, wr, br, eps, relu, rr)
    torch.testing.assert_close(y.cpu().double(), yr, **tol)
    torch.testing.assert_close(mean.cpu().double(), x.double().mean((0, 2)), **tol)
    torch.testing.assert_close(var.cpu().double(), x.double().var((0, 2), unbiased=False), **tol)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(x.dtype)
    y.backward(grad.cuda())
    yr.backward(grad.double())
    torch.testing.assert_close(xs.grad.cpu().double(), xr.grad, **tol)
    for ours, ref in ((ws, wr), (bs, br), (rs, rr)):
        if ours is not None:
            torch.testing.assert_close(ours.grad.cpu().double(), ref.grad, **tol)


@hypothesis_settings(40)
@given(**problems(max_length=300))
def test_matches_torch_float64(relu, **draw):
    """The CPU suite's property test, with rows shorter and longer than a block (up to 300 against 256 threads)."""
    drawn = problem(**draw)
    if drawn is not None:
        x, weight, bias, shortcut = drawn
        _check_cuda(x, weight, bias, 1e-5, relu, {}, shortcut)


# [H*W, C, N] of batch-innermost activations (ResNet-50's 7x7x2048 at batch 32, a 14x14 map at batch 4) and
# [N, C, H*W] of NCHW ones; P above and below the 64 ranges of the sums.
@pytest.mark.parametrize("shape", [(49, 64, 256), (196, 24, 4), (8, 16, 3136), (300, 5, 32), (2, 3, 7)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_torch_float32(shape, relu, residual):
    x, weight, bias, shortcut = float32_problem(shape, residual)
    _check_cuda(x, weight, bias, 1e-5, relu, {"rtol": 1e-4, "atol": 1e-4}, shortcut)


@pytest.mark.parametrize("shape", [(49, 64, 256), (9, 5, 37), (1, 7, 130)])
@pytest.mark.parametrize("relu", [True, False])
def test_bfloat16_input_float32_statistics(shape, relu):
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1).to(torch.bfloat16)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    xs, ws, bs = (_leaf(t, "cuda") for t in (x, w, b))
    y, mean, var = ops.batch_norm_relu(xs, ws, bs, 1e-5, relu)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    xr, wr, br = (_leaf(t.double(), "cpu") for t in (x, w, b))
    yr = _reference(xr, wr, br, 1e-5, relu)
    _within_bf16_rounding(y.cpu(), yr.detach(), "output")
    torch.testing.assert_close(var.cpu().double(), x.double().var((0, 2), unbiased=False), rtol=1e-5, atol=1e-5)
    grad = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(grad.cuda())
    yr.backward(grad.double())
    assert xs.grad.dtype == torch.bfloat16 and ws.grad.dtype == bs.grad.dtype == torch.float32
    _within_bf16_rounding(xs.grad.cpu(), xr.grad, "input gradient")
    torch.testing.assert_close(ws.grad.cpu().double(), wr.grad, rtol=1e-4, atol=1e-4)


def test_deterministic_and_as_the_cpu_kernels():
    """Fixed ranges and reduction trees: two calls give the same bits; the CPU kernels agree to rounding."""
    x = torch.randn(300, 8, 32)
    grad = torch.randn_like(x)
    results = []
    for device in ("cuda", "cuda", "cpu"):
        xs = x.to(device).requires_grad_()
        y, mean, var = ops.batch_norm_relu(xs, None, None, 1e-5, True)
        y.backward(grad.to(device))
        results.append([t.detach().cpu() for t in (y, mean, var, xs.grad)])
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_variance_survives_a_large_mean():
    x = torch.randn(64, 4, 128, dtype=torch.float64) * 0.01 + 1e4
    _, _, var = ops.batch_norm_relu(x.float().cuda(), None, None, 1e-5, False)
    torch.testing.assert_close(var.cpu().double(), x.float().double().var((0, 2), unbiased=False), rtol=1e-3, atol=0)


def test_nan_passes_relu_as_in_torch():
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    residual = torch.zeros_like(x)
    residual[0, 0, 0] = float("nan")
    y, _, _ = ops.batch_norm_relu(x.cuda(), None, None, 1e-5, True, residual.cuda())
    assert torch.isnan(y[0, 0, 0]) and not torch.isnan(y[1:]).any()


def test_gradcheck_and_opcheck():
    x = torch.randn(3, 2, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn(3, 2, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    for relu in (False, True):
        fn = lambda x_, w_, b_, r_, relu=relu: ops.batch_norm_relu(x_, w_, b_, 1e-5, relu, r_)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, r))
        torch.library.opcheck(torch.ops.graspext.batch_norm_relu.default, (x, w, b, r, 1e-5, relu))


def test_rejects_parameters_on_another_device():
    x = torch.randn(4, 3, 6, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        ops.batch_norm_relu(x, torch.ones(3), None)
    with pytest.raises(RuntimeError, match="residual must match input"):
        ops.batch_norm_relu(x, None, None, 1e-5, True, torch.randn(4, 3, 6))


def test_layout_batch_norm_uses_it_when_enabled(monkeypatch):
    """graspext.nn.layout.BatchNorm2d on CUDA: torch's kernels by default, the fused op with
    GRASPEXT_CUDA_FUSED_BN=1; the same results and running statistics either way."""
    from graspext.nn.layout import BatchNorm2d, to_batch_innermost

    x = to_batch_innermost(torch.randn(16, 6, 5, 5, device="cuda"))
    outputs = []
    for enabled in ("0", "1"):
        monkeypatch.setenv("GRASPEXT_CUDA_FUSED_BN", enabled)
        torch.manual_seed(0)
        bn = BatchNorm2d(6).cuda().train()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = bn(x)
        fused = any("graspext::batch_norm_relu" in e.name for e in prof.events())
        assert fused == (enabled == "1")
        outputs.append((y, bn.running_mean, bn.running_var))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
