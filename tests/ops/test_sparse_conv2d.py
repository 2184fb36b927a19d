"""The sparse convolution and linear ops against F.conv2d / F.linear on the masked dense weight."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from graspext import ops
from graspext.nn.layout import is_batch_innermost, to_batch_innermost
from graspext.nn.pattern import SparsePattern
from tests.conftest import hypothesis_settings

ISAS = ["avx512_bf16", "avx512", "avx2", "baseline"]


def _supported_isas():
    current = ops.cpu_isa()
    found = []
    for isa in ISAS:
        try:
            ops.cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    ops.cpu_isa(current)
    return found


SUPPORTED = _supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in SUPPORTED:
        pytest.skip(f"this CPU does not run {request.param}")
    previous = ops.cpu_isa()
    ops.cpu_isa(request.param)
    yield request.param
    ops.cpu_isa(previous)


def _case(n, cin, cout, h, w, k, density, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    mask = torch.rand(cout, cin, kh, kw, generator=g) < density
    weight = torch.randn(cout, cin, kh, kw, generator=g, dtype=dtype) * mask
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    return x, weight, b, mask


def _check_conv(x, weight, b, mask, stride, padding, tol, grad_layout=lambda g: g):
    pattern = SparsePattern.from_mask(mask)
    values = pattern.gather(weight).requires_grad_()
    xs = x.clone().requires_grad_()
    bs = b.clone().requires_grad_() if b is not None else None
    y = ops.sparse_conv2d(xs, values, pattern, bs, stride, padding)

    xr = x.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    yr = F.conv2d(xr, wr * mask, br, stride, padding)
    torch.testing.assert_close(y, yr, **tol)
    grad = grad_layout(torch.randn_like(yr))
    grads = torch.autograd.grad(y, [t for t in (xs, values, bs) if t is not None], grad)
    grads_ref = torch.autograd.grad(yr, [t for t in (xr, wr, br) if t is not None], grad)
    torch.testing.assert_close(grads[0], grads_ref[0], **tol)
    torch.testing.assert_close(grads[1], pattern.gather(grads_ref[1]), **tol)
    if b is not None:
        torch.testing.assert_close(grads[2], grads_ref[2], **tol)


F64 = {"rtol": 1e-10, "atol": 1e-10}
F32 = {"rtol": 1e-4, "atol": 1e-3}

CASES = [
    # n, cin, cout, h, w, kernel, stride, padding, density
    (4, 3, 8, 9, 9, 3, 1, 1, 0.3),
    (1, 5, 7, 6, 11, 3, 2, 1, 0.5),        # batch 1, odd sizes, stride 2
    (17, 8, 6, 7, 5, 1, 1, 0, 0.4),        # 1x1, batch not a multiple of a vector
    (33, 4, 4, 8, 8, 1, 2, 0, 0.6),        # 1x1 stride 2 (a ResNet shortcut)
    (70, 6, 5, 5, 5, 5, 2, 2, 0.2),        # 5x5
    (130, 16, 8, 4, 4, 3, 1, 1, 0.1),      # batch over 128 lanes
    (8, 4, 6, 12, 10, (3, 1), (1, 2), (1, 0), 0.5),  # rectangular kernel, per-axis stride/padding
    (3, 2, 3, 5, 5, 3, 3, 0, 0.7),         # stride larger than the overlap
    (2, 3, 4, 4, 4, 3, 1, 2, 0.5),         # padding larger than needed
    # Batches that fill whole register tiles, on images wide enough for interior tiles (no bounds tests):
    (64, 4, 5, 12, 12, 3, 1, 1, 0.5),
    (64, 4, 5, 13, 13, 3, 2, 1, 0.5),
    (128, 6, 4, 7, 9, 1, 1, 0, 0.5),       # 1x1 stride 1: taps used without per-row filtering
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv_matches_dense_float64(isa, case):
    n, cin, cout, h, w, k, stride, padding, density = case
    x, weight, b, mask = _case(n, cin, cout, h, w, k, density, torch.float64, seed=hash(case) % 1000)
    _check_conv(x, weight, b, mask, stride, padding, F64)


F32_CASES = CASES[:6] + CASES[-3:]


@pytest.mark.parametrize("case", F32_CASES, ids=[f"case{i}" for i in range(len(F32_CASES))])
def test_conv_matches_dense_float32(isa, case):
    n, cin, cout, h, w, k, stride, padding, density = case
    x, weight, b, mask = _case(n, cin, cout, h, w, k, density, torch.float32, seed=7)
    _check_conv(x, weight, b, mask, stride, padding, F32)


DEGENERATE = ["empty", "dense", "rows", "input_channels"]


def degenerate_case(pruned):
    """A 5->7 3x3 case whose mask is empty, full, or has whole output rows or input channels pruned."""
    x, weight, b, mask = _case(6, 5, 7, 6, 6, 3, 0.5, torch.float64, seed=3)
    if pruned == "empty":
        mask[:] = False
    elif pruned == "dense":
        mask[:] = True
    elif pruned == "rows":
        mask[[0, 3, 6]] = False  # output channels with no kept weight: bias only
    else:
        mask[:, [1, 2]] = False  # input channels no weight reads: their input gradient is zero
    return x, weight * mask, b, mask


@pytest.mark.parametrize("pruned", DEGENERATE)
def test_conv_degenerate_masks(isa, pruned):
    _check_conv(*degenerate_case(pruned), 1, 1, F64)


def _chwn(t):
    return t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "batch_innermost", "CHWN"])
def test_conv_any_input_layout(layout):
    x, weight, b, mask = _case(9, 6, 4, 8, 8, 3, 0.4, torch.float64, seed=5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.cat([x, x], dim=3)[:, :, :, ::2]
    elif layout == "batch_innermost":
        x = to_batch_innermost(x)
    else:  # batch stride 1 in another order: read in place through its strides (the gradient too)
        x = _chwn(x)
    _check_conv(x, weight, b, mask, 1, 1, F64, grad_layout=_chwn if layout == "CHWN" else (lambda g: g))


def test_output_is_batch_innermost():
    x, weight, b, mask = _case(5, 3, 4, 6, 6, 3, 0.5, torch.float32, seed=1)
    pattern = SparsePattern.from_mask(mask)
    y = ops.sparse_conv2d(x, pattern.gather(weight), pattern, b, 1, 1)
    assert is_batch_innermost(y)
    assert y.permute(2, 3, 1, 0).is_contiguous()  # [H, W, C, N]


# Random convolution problems (any shape, stride, padding and density), shared with the CUDA tests.
CONV_PROBLEMS = dict(
    n=st.integers(1, 40), cin=st.integers(1, 6), cout=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
    kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
    ph=st.integers(0, 2), pw=st.integers(0, 2), density=st.floats(0.0, 1.0), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)


def conv_problem(n, cin, cout, h, w, kh, kw, sh, sw, ph, pw, density, bias, seed):
    """(x, weight, bias, mask, stride, padding) in float64 for one draw of CONV_PROBLEMS, or None where the
    input has no output position (covered by the error test)."""
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return None
    return (*_case(n, cin, cout, h, w, (kh, kw), density, torch.float64, seed, bias), (sh, sw), (ph, pw))


@hypothesis_settings(60)
@given(**CONV_PROBLEMS)
def test_conv_property_float64(**draw):
    problem = conv_problem(**draw)
    if problem is not None:
        _check_conv(*problem, F64)


@contextlib.contextmanager
def _using_isa(name):
    previous = ops.cpu_isa()
    ops.cpu_isa(name)
    try:
        yield
    finally:
        ops.cpu_isa(previous)


@hypothesis_settings(60)
@given(isa_name=st.sampled_from(SUPPORTED), dtype=st.sampled_from([torch.float32, torch.float64]), **CONV_PROBLEMS)
def test_conv_property_every_isa(isa_name, dtype, **draw):
    """The property test on every code path this CPU runs (AVX-512, AVX2, baseline), in float32 and float64."""
    problem = conv_problem(**draw)
    if problem is None:
        return
    x, weight, b, mask, stride, padding = problem
    x, weight = x.to(dtype), weight.to(dtype)
    b = b.to(dtype) if b is not None else None
    with _using_isa(isa_name):
        _check_conv(x, weight, b, mask, stride, padding, F64 if dtype == torch.float64 else F32)


def _check_linear(x, weight, b, mask, grad):
    """ops.sparse_linear against F.linear on the masked weight: output, and input, value and bias gradients."""
    pattern = SparsePattern.from_mask(mask)
    values = pattern.gather(weight).requires_grad_()
    y = ops.sparse_linear(x, values, pattern, b)
    wr = weight.clone().requires_grad_()
    yr = F.linear(x, wr * mask, b)
    torch.testing.assert_close(y, yr, **F64)
    bias = [b] if b is not None else []
    got = torch.autograd.grad(y, [x, values, *bias], grad)
    want = torch.autograd.grad(yr, [x, wr, *bias], grad)
    torch.testing.assert_close(got[0], want[0], **F64)
    torch.testing.assert_close(got[1], pattern.gather(want[1]), **F64)
    if b is not None:
        torch.testing.assert_close(got[2], want[2], **F64)


@pytest.mark.parametrize("pruned", ["empty", "dense", "rows", "columns"])
def test_linear_degenerate_masks(isa, pruned):
    """Linear with nothing kept, everything kept, output rows pruned entirely and input columns no weight reads."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(9, 20, generator=g) < 0.5
    mask = {"empty": torch.zeros_like(mask), "dense": torch.ones_like(mask)}.get(pruned, mask)
    if pruned == "rows":
        mask[[0, 4, 8]] = False
    elif pruned == "columns":
        mask[:, [1, 2, 19]] = False
    weight = torch.randn(9, 20, generator=g, dtype=torch.float64) * mask
    x = torch.randn(33, 20, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    _check_linear(x, weight, b, mask, torch.randn(33, 9, generator=g, dtype=torch.float64))


@hypothesis_settings(40)
@given(n=st.integers(1, 70), fin=st.integers(1, 40), fout=st.integers(1, 40), density=st.floats(0.0, 1.0),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_property_float64(n, fin, fout, density, bias, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(fout, fin, generator=g) < density
    weight = torch.randn(fout, fin, generator=g, dtype=torch.float64) * mask
    x = torch.randn(n, fin, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(fout, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    _check_linear(x, weight, b, mask, torch.randn(n, fout, dtype=torch.float64))


def test_linear_output_allows_in_place_ops():
    mask = torch.rand(6, 5) < 0.5
    pattern = SparsePattern.from_mask(mask)
    x = torch.randn(4, 5, requires_grad=True)
    y = ops.sparse_linear(x, pattern.gather(torch.randn(6, 5)).requires_grad_(), pattern)
    F.relu(y, inplace=True).sum().backward()
    assert x.grad is not None


def test_gradcheck():
    x, weight, b, mask = _case(3, 3, 4, 5, 5, 3, 0.5, torch.float64, seed=11)
    pattern = SparsePattern.from_mask(mask)
    values = pattern.gather(weight)
    torch.autograd.gradcheck(
        lambda x_, v_, b_: ops.sparse_conv2d(x_, v_, pattern, b_, 2, 1),
        (x.requires_grad_(), values.requires_grad_(), b.requires_grad_()),
    )
    lin_mask = torch.rand(5, 7) < 0.5
    lin = SparsePattern.from_mask(lin_mask)
    torch.autograd.gradcheck(
        lambda x_, v_: ops.sparse_linear(x_, v_, lin),
        (torch.randn(3, 7, dtype=torch.float64, requires_grad=True),
         torch.randn(lin.nnz, dtype=torch.float64, requires_grad=True)),
    )


def test_opcheck():
    x, weight, b, mask = _case(4, 3, 5, 6, 6, 3, 0.5, torch.float32, seed=2)
    p = SparsePattern.from_mask(mask)
    values = p.gather(weight)
    conv_args = (x.requires_grad_(), values.requires_grad_(), *p.tensors(), b, list(p.weight_shape), [2, 2], [1, 1])
    torch.library.opcheck(torch.ops.graspext.sparse_conv2d.default, conv_args)
    y = torch.ops.graspext.sparse_conv2d(*conv_args).detach()
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.graspext.sparse_conv2d_backward_input.default,
                          (dy, values.detach(), p.col_ptr, p.col_taps, p.col_order, list(p.weight_shape),
                           list(x.shape), [2, 2], [1, 1]))
    torch.library.opcheck(torch.ops.graspext.sparse_conv2d_backward_weight.default,
                          (dy, x.detach(), p.row_ptr, p.row_taps, list(p.weight_shape), [2, 2], [1, 1]))
    lin = SparsePattern.from_mask(torch.rand(6, 5) < 0.5)
    torch.library.opcheck(torch.ops.graspext.sparse_linear.default,
                          (torch.randn(3, 5, requires_grad=True), torch.randn(lin.nnz, requires_grad=True),
                           *lin.tensors(), torch.randn(6, requires_grad=True)))


def test_compiles_with_torch_compile():
    x, weight, b, mask = _case(4, 3, 5, 6, 6, 3, 0.5, torch.float32, seed=4)
    p = SparsePattern.from_mask(mask)
    values = p.gather(weight)
    fn = torch.compile(lambda x_: F.relu(ops.sparse_conv2d(x_, values, p, b, 1, 1)), fullgraph=True)
    torch.testing.assert_close(fn(x), F.relu(F.conv2d(x, weight, b, 1, 1)), rtol=1e-4, atol=1e-4)


# ---- bad input -------------------------------------------------------------------------------------------


def _small():
    x, weight, b, mask = _case(2, 3, 4, 5, 5, 3, 0.5, torch.float32, seed=0)
    p = SparsePattern.from_mask(mask)
    return x, p.gather(weight), p, b


def test_rejects_wrong_channels():
    x, values, p, b = _small()
    with pytest.raises(ValueError, match="channels"):
        ops.sparse_conv2d(x[:, :2], values, p, b, 1, 1)


def test_rejects_wrong_values():
    x, values, p, b = _small()
    with pytest.raises(ValueError, match="values must have shape"):
        ops.sparse_conv2d(x, values[:-1], p, b, 1, 1)
    with pytest.raises(TypeError, match="values has dtype"):
        ops.sparse_conv2d(x, values.double(), p, b, 1, 1)


def test_rejects_integer_input_and_bad_geometry():
    x, values, p, b = _small()
    with pytest.raises(RuntimeError, match="input must be float32, float64 or bfloat16"):
        torch.ops.graspext.sparse_conv2d(x.long(), values.long(), *p.tensors(), None, list(p.weight_shape),
                                         [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        ops.sparse_conv2d(x[:, :, :1, :1], values, p, b, 1, 0)
    with pytest.raises(RuntimeError, match="stride must be"):
        ops.sparse_conv2d(x, values, p, b, 0, 1)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.sparse_conv2d(x, values, p, b[:2], 1, 1)


def test_rejects_corrupt_indices():
    x, values, p, b = _small()
    bad_taps = p.row_taps.clone()
    bad_taps[0] = 10_000
    with pytest.raises(RuntimeError, match=r"row_taps\[0\] = 10000 is outside"):
        torch.ops.graspext.sparse_conv2d(x, values, p.row_ptr, bad_taps, p.col_ptr, p.col_taps, p.col_order, b,
                                         list(p.weight_shape), [1, 1], [1, 1])
    bad_ptr = p.row_ptr.clone()
    bad_ptr[-1] += 1
    with pytest.raises(RuntimeError, match="row_ptr must start at 0 and end at the number of values"):
        torch.ops.graspext.sparse_conv2d(x, values, bad_ptr, p.row_taps, p.col_ptr, p.col_taps, p.col_order, b,
                                         list(p.weight_shape), [1, 1], [1, 1])


def test_rejects_unknown_isa():
    with pytest.raises(RuntimeError, match="isa must be one this CPU supports"):
        ops.cpu_isa("sse9")
