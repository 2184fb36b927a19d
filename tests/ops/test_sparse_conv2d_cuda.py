"""The CUDA sparse convolution and linear ops against F.conv2d / F.linear in float64 (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from graspext import ops
from graspext.nn.layout import to_batch_innermost
from graspext.nn.pattern import SparsePattern
from tests.conftest import hypothesis_settings, skip_without_kernel
from tests.ops.test_sparse_conv2d import CASES, CONV_PROBLEMS, DEGENERATE, F64, _case, conv_problem, degenerate_case

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_kernel():
    skip_without_kernel("sparse_conv2d", "cuda")


def _leaf(t, device):
    return t.to(device).requires_grad_() if t is not None else None


def _check_conv_cuda(x, weight, b, mask, stride, padding):
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.cuda()).requires_grad_()
    xs, bs = _leaf(x, "cuda"), _leaf(b, "cuda")
    y = ops.sparse_conv2d(xs, values, pattern, bs, stride, padding)
    assert y.is_cuda and y.stride(0) == 1
    xr, wr, br = _leaf(x, "cpu"), _leaf(weight, "cpu"), _leaf(b, "cpu")
    yr = F.conv2d(xr, wr * mask, br, stride, padding)
    torch.testing.assert_close(y.cpu(), yr, **F64)
    grad = torch.randn_like(yr)
    grads = torch.autograd.grad(y, [t for t in (xs, values, bs) if t is not None], grad.cuda())
    grads_ref = torch.autograd.grad(yr, [t for t in (xr, wr, br) if t is not None], grad)
    torch.testing.assert_close(grads[0].cpu(), grads_ref[0], **F64)
    torch.testing.assert_close(grads[1].cpu(), SparsePattern.from_mask(mask).gather(grads_ref[1]), **F64)
    if b is not None:
        torch.testing.assert_close(grads[2].cpu(), grads_ref[2], **F64)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv_matches_dense_float64(case):
    n, cin, cout, h, w, k, stride, padding, density = case
    x, weight, b, mask = _case(n, cin, cout, h, w, k, density, torch.float64, seed=hash(case) % 1000)
    _check_conv_cuda(x, weight, b, mask, stride, padding)


@pytest.mark.parametrize("pruned", DEGENERATE)
def test_conv_degenerate_masks(pruned):
    _check_conv_cuda(*degenerate_case(pruned), 1, 1)


@pytest.mark.parametrize("n,fin,fout,density", [(1, 7, 5, 0.5), (33, 64, 40, 0.1), (256, 300, 129, 0.05)])
def test_linear_matches_dense_float64(n, fin, fout, density):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(fout, fin, generator=g) < density
    weight = torch.randn(fout, fin, generator=g, dtype=torch.float64) * mask
    x = torch.randn(n, fin, generator=g, dtype=torch.float64)
    b = torch.randn(fout, generator=g, dtype=torch.float64)
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.cuda()).requires_grad_()
    xs, bs = _leaf(x, "cuda"), _leaf(b, "cuda")
    y = ops.sparse_linear(xs, values, pattern, bs)
    xr, wr, br = _leaf(x, "cpu"), _leaf(weight, "cpu"), _leaf(b, "cpu")
    yr = F.linear(xr, wr * mask, br)
    torch.testing.assert_close(y.cpu(), yr, **F64)
    grad = torch.randn_like(yr)
    y.backward(grad.cuda())
    yr.backward(grad)
    torch.testing.assert_close(xs.grad.cpu(), xr.grad, **F64)
    torch.testing.assert_close(values.grad.cpu(), SparsePattern.from_mask(mask).gather(wr.grad), **F64)
    torch.testing.assert_close(bs.grad.cpu(), br.grad, **F64)


def test_gradcheck_and_opcheck():
    x, weight, b, mask = _case(3, 3, 4, 5, 5, 3, 0.5, torch.float64, seed=11)
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.cuda())
    args = (x.cuda().requires_grad_(), values.requires_grad_(), b.cuda().requires_grad_())
    torch.autograd.gradcheck(lambda x_, v_, b_: ops.sparse_conv2d(x_, v_, pattern, b_, 2, 1), args)
    torch.library.opcheck(torch.ops.graspext.sparse_conv2d.default,
                          (*args[:2], *pattern.tensors(), args[2], list(pattern.weight_shape), [2, 2], [1, 1]))


@hypothesis_settings(40)
@given(**CONV_PROBLEMS)
def test_conv_property_float64(**draw):
    """The CPU suite's property test on the CUDA kernels: any shape, stride, padding and density."""
    problem = conv_problem(**draw)
    if problem is not None:
        _check_conv_cuda(*problem)


def _half_tolerance(dtype, reference):
    """One rounding of a float32 sum to `dtype`, with room for cancellation against the largest value."""
    eps = torch.finfo(dtype).eps
    return {"rtol": 2 * eps, "atol": 2 * eps * float(reference.abs().max())}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv_half_precision_accumulates_in_float32(case, dtype):
    """float16/bfloat16 inputs: the products equal the float64 ones of the same (rounded) inputs up to one
    rounding of the result, which a float16 accumulator would not reach on the longer sums."""
    n, cin, cout, h, w, k, stride, padding, density = case
    x, weight, b, mask = _case(n, cin, cout, h, w, k, density, torch.float64, seed=hash(case) % 1000)
    x, weight, b = (t.to(dtype) for t in (x, weight, b))
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.cuda()).requires_grad_()
    xs, bs = _leaf(x, "cuda"), _leaf(b, "cuda")
    y = ops.sparse_conv2d(xs, values, pattern, bs, stride, padding)
    assert y.dtype == dtype
    xr, wr, br = (_leaf(t.double(), "cpu") for t in (x, weight, b))
    yr = F.conv2d(xr, wr * mask, br, stride, padding)
    torch.testing.assert_close(y.cpu().double(), yr, **_half_tolerance(dtype, yr))
    grad = torch.randn(yr.shape, dtype=torch.float64).to(dtype)
    gx_, gv, gb = torch.autograd.grad(y, (xs, values, bs), grad.cuda())
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), grad.double())
    assert gx_.dtype == gv.dtype == dtype
    torch.testing.assert_close(gx_.cpu().double(), rx, **_half_tolerance(dtype, rx))
    rv = SparsePattern.from_mask(mask).gather(rw)
    torch.testing.assert_close(gv.cpu().double(), rv, **_half_tolerance(dtype, rv))
    torch.testing.assert_close(gb.cpu().double(), rb, **_half_tolerance(dtype, rb))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_computes_in_its_dtype_with_float32_weight_gradients(dtype):
    x, weight, b, mask = _case(8, 16, 24, 10, 10, 3, 0.2, torch.float32, seed=5)
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.cuda()).requires_grad_()
    xs, bs = _leaf(x, "cuda"), _leaf(b, "cuda")
    g = torch.Generator().manual_seed(6)
    lin_mask = torch.rand(12, 40, generator=g) < 0.3
    lin_pattern = SparsePattern.from_mask(lin_mask).to("cuda")
    lin_values = torch.randn(lin_pattern.nnz, generator=g).cuda().requires_grad_()
    lin_x = torch.randn(20, 40, generator=g).cuda().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y = ops.sparse_conv2d(xs, values, pattern, bs, 1, 1)
        lin = ops.sparse_linear(lin_x, lin_values, lin_pattern)
        y64 = ops.sparse_conv2d(xs.double(), values.double(), pattern, bs.double(), 1, 1)
    assert y.dtype == lin.dtype == dtype
    assert y64.dtype == torch.float64  # autocast leaves float64 alone
    (y.float().square().sum() + lin.float().square().sum()).backward()
    for t in (values, bs, xs, lin_values, lin_x):
        assert t.grad.dtype == torch.float32
    # Against float32 products of the same inputs rounded to `dtype`: one more rounding, of the result.
    rounded = [t.detach().to(dtype).float() for t in (xs, values, bs, lin_x, lin_values)]
    reference = ops.sparse_conv2d(rounded[0], rounded[1], pattern, rounded[2], 1, 1)
    torch.testing.assert_close(y.float(), reference, **_half_tolerance(dtype, reference))
    lin_reference = ops.sparse_linear(rounded[3], rounded[4], lin_pattern)
    torch.testing.assert_close(lin.float(), lin_reference, **_half_tolerance(dtype, lin_reference))


def test_bad_index_raises():
    x, weight, b, mask = _case(2, 3, 4, 5, 5, 3, 0.5, torch.float32, seed=0)
    pattern = SparsePattern.from_mask(mask).to("cuda")
    row_ptr, row_taps, *rest = pattern.tensors()
    x, values = x.cuda(), pattern.gather(weight.cuda())

    def conv(taps):
        return torch.ops.graspext.sparse_conv2d(x, values, row_ptr, taps, *rest, None, list(pattern.weight_shape),
                                                [1, 1], [1, 1])

    bad_taps = row_taps.clone()
    bad_taps[0] = 10_000
    with pytest.raises(RuntimeError, match="row_taps has a tap outside"):
        conv(bad_taps)
    # Validated indices are remembered while unchanged; an in-place change is checked again.
    taps = row_taps.clone()
    torch.testing.assert_close(conv(taps), conv(row_taps))
    taps[-1] = -1
    with pytest.raises(RuntimeError, match="row_taps has a tap outside"):
        conv(taps)


def _conv_cuda_float32(x, weight, b, mask, stride, padding, view=lambda t: t):
    """The CUDA op in float32 on ``view`` of the batch-innermost input, with its gradients."""
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.float().cuda()).requires_grad_()
    xs = view(to_batch_innermost(x.float().cuda())).detach().requires_grad_()
    y = ops.sparse_conv2d(xs, values, pattern, b.float().cuda() if b is not None else None, stride, padding)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).cuda()
    gx_, gv = torch.autograd.grad(y, (xs, values), grad)
    return y, gx_, gv, grad


@pytest.mark.parametrize("n", [4, 8, 64, 132, 256])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)])
def test_conv_float32_vector_loads(n, k, stride, padding):
    """Batches that are multiples of four take the kernels' vector loads; against float64 on the CPU."""
    x, weight, b, mask = _case(n, 12, 20, 9, 7, k, 0.15, torch.float64, seed=n + k)
    mask[3] = False  # an empty row
    mask[5] = True  # a full row: rows of very unequal length (the block order puts the longest first)
    weight = torch.randn(mask.shape, dtype=torch.float64) * mask
    y, gx_, gv, grad = _conv_cuda_float32(x, weight, b, mask, stride, padding)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    yr = F.conv2d(xr, wr * mask, b, stride, padding)
    rx, rw = torch.autograd.grad(yr, (xr, wr), grad.double().cpu())
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.cpu().double(), yr, **tol)
    torch.testing.assert_close(gx_.cpu().double(), rx, **tol)
    torch.testing.assert_close(gv.cpu().double(), SparsePattern.from_mask(mask).gather(rw), **tol)


def test_unaligned_views_take_the_scalar_path():
    """A view starting one sample in (batch stride 1, data pointer not 16-byte aligned) and a batch not a multiple
    of four compute what the aligned vector path computes on the same values."""
    x, weight, b, mask = _case(9, 6, 10, 8, 8, 3, 0.3, torch.float64, seed=21)
    aligned = _conv_cuda_float32(x[1:], weight, b, mask, 1, 1)  # batch 8: vector loads
    shifted = _conv_cuda_float32(x, weight, b, mask, 1, 1, view=lambda t: t[1:])  # the same 8 samples, offset
    for got, expected in zip(shifted[:3], aligned[:3]):  # the weight gradient sums in another order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    odd = _conv_cuda_float32(x, weight, b, mask, 1, 1)  # batch 9: scalar loads
    torch.testing.assert_close(odd[0][1:], aligned[0], rtol=1e-6, atol=1e-6)


def test_row_order_is_cached_per_index():
    """The block order (rows longest first) is derived once per validated index: a second call launches no sort,
    and an in-place change of the index is validated and ordered again."""
    x, weight, _, mask = _case(8, 4, 6, 5, 5, 3, 0.5, torch.float32, seed=2)
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.cuda())
    xs = x.cuda()
    first = ops.sparse_conv2d(xs, values, pattern, None, 1, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        second = ops.sparse_conv2d(xs, values, pattern, None, 1, 1)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not [k for k in kernels if "sort" in k.lower()], kernels
    torch.testing.assert_close(first, second)
    # Reverse the row lengths in place (same nnz): a stale order would skip rows or compute one twice.
    reversed_mask = mask.flip(0)
    fresh = SparsePattern.from_mask(reversed_mask)
    pattern.row_ptr.copy_(fresh.row_ptr)
    pattern.row_taps.copy_(fresh.row_taps)
    out = ops.sparse_conv2d(xs, pattern.gather(weight.flip(0).cuda()), pattern, None, 1, 1)
    torch.testing.assert_close(out.cpu(), F.conv2d(x, weight.flip(0) * reversed_mask, None, 1, 1), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("n", [256, 12, 7])
def test_linear_float32_vector_loads(n):
    """A linear layer's input is a 1x1 image whose unit dimensions have arbitrary strides: batches that are
    multiples of four still take the vector loads (7 the scalar ones); against float64 on the CPU."""
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(70, 96, generator=g) < 0.1
    weight = torch.randn(70, 96, generator=g, dtype=torch.float64) * mask
    x = torch.randn(n, 96, generator=g, dtype=torch.float64)
    pattern = SparsePattern.from_mask(mask).to("cuda")
    values = pattern.gather(weight.float().cuda()).requires_grad_()
    xs = x.float().cuda().t().contiguous().t().requires_grad_()  # batch innermost, as the layers pass it
    y = ops.sparse_linear(xs, values, pattern)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad.float().cuda())
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    yr = F.linear(xr, wr * mask)
    yr.backward(grad)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.cpu().double(), yr, **tol)
    torch.testing.assert_close(xs.grad.cpu().double(), xr.grad, **tol)
    torch.testing.assert_close(values.grad.cpu().double(), SparsePattern.from_mask(mask).gather(wr.grad), **tol)
