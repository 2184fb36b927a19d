"""The layout-keeping BatchNorm and pooling modules compute exactly what their torch classes do."""

import copy

import pytest
import torch
from torch import nn

from graspext.nn.layout import (
    FusedReLU,
    from_layout_module,
    fuse_batch_norm_relu,
    is_batch_innermost,
    norm_add_relu,
    to_batch_innermost,
    to_layout_module,
    to_nchw,
)


def _check_outputs_and_grads(y, y_ref, leaves):
    """``y`` equals ``y_ref`` and stays batch-innermost; under one output gradient, each (ours, reference)
    pair of leaves gets the same gradient."""
    torch.testing.assert_close(y, y_ref)
    assert is_batch_innermost(y)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    for ours, ref in leaves:
        torch.testing.assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm2d(5),
    lambda: nn.BatchNorm2d(5, affine=False, momentum=None),
    lambda: nn.BatchNorm2d(5, track_running_stats=False),
    lambda: nn.MaxPool2d(2),
    lambda: nn.MaxPool2d(3, 2, 1),
    lambda: nn.AvgPool2d(2),
    lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
    lambda: nn.AdaptiveAvgPool2d(1),
    lambda: nn.AdaptiveAvgPool2d((2, 3)),
    lambda: nn.ReLU(),
])
@pytest.mark.parametrize("training", [True, False])
def test_same_results_and_layout_kept(make, training):
    torch.manual_seed(0)
    base = make().double().train(training)
    kept = to_layout_module(make().double().train(training))
    assert type(kept) is not type(base) and isinstance(kept, type(base))
    x = torch.randn(6, 5, 8, 8, dtype=torch.float64)
    xb = to_batch_innermost(x).requires_grad_()
    xr = x.clone().requires_grad_()
    _check_outputs_and_grads(kept(xb), base(xr), [(xb, xr)])
    for a, b in zip(base.buffers(), kept.buffers()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kept(x), base(x))  # NCHW input takes the torch path
    assert type(from_layout_module(kept)) is type(base)


def test_detection():
    x = torch.randn(4, 3, 5, 5)
    assert not is_batch_innermost(x)
    assert is_batch_innermost(to_batch_innermost(x))
    assert not is_batch_innermost(torch.randn(4, 3))


def test_relu_after_batchnorm_needs_no_copy_in_backward():
    bn, relu = to_layout_module(nn.BatchNorm2d(5).double()), to_layout_module(nn.ReLU(inplace=True))
    x = to_batch_innermost(torch.randn(6, 5, 4, 4, dtype=torch.float64)).requires_grad_()
    y = relu(bn(x))
    assert "CopySlices" not in type(y.grad_fn).__name__
    ref = torch.relu(nn.BatchNorm2d(5).double()(x.detach()))
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("layout", ["batch_innermost", "nchw", "channels_last"])
def test_fused_batch_norm_relu_matches_torch(layout):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU(inplace=True), nn.BatchNorm2d(5), nn.ReLU()).double()
    fused = nn.Sequential(*[to_layout_module(m) for m in copy.deepcopy(plain)])
    fuse_batch_norm_relu(fused)
    assert [type(m) for m in fused] == [type(fused[0]), FusedReLU, type(fused[2]), FusedReLU]
    assert fused[0].fuse_relu and fused[2].fuse_relu
    x = torch.randn(6, 5, 8, 8, dtype=torch.float64) * 2 + 1
    xf = {"batch_innermost": to_batch_innermost, "nchw": lambda t: t.clone(),
          "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)}[layout](x).requires_grad_()
    xr = x.clone().requires_grad_()
    for training in (True, False):
        plain.train(training), fused.train(training)
        y, yr = fused(xf), plain(xr)
        torch.testing.assert_close(y, yr)
        grad = torch.randn_like(yr)
        y.backward(grad)
        yr.backward(grad)
        torch.testing.assert_close(xf.grad, xr.grad)
    for a, b in zip(plain.state_dict().values(), fused.state_dict().values()):
        torch.testing.assert_close(a, b)
    restored = nn.Sequential(*[from_layout_module(m) for m in fused])
    assert [type(m) for m in restored] == [nn.BatchNorm2d, nn.ReLU] * 2
    assert restored[1].inplace and not hasattr(restored[0], "fuse_relu")


def test_relu_used_twice_is_not_fused():
    relu = nn.ReLU()
    model = nn.Sequential(to_layout_module(nn.BatchNorm2d(3)), relu, nn.Conv2d(3, 3, 1), relu)
    fuse_batch_norm_relu(model)
    assert model[1] is relu and not model[0].fuse_relu


@pytest.mark.parametrize("residual_layout", ["same", "nchw", None])
def test_norm_add_relu_matches_torch(residual_layout):
    torch.manual_seed(1)
    plain = nn.BatchNorm2d(4).double()
    kept = to_layout_module(copy.deepcopy(plain))
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    shortcut = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    xb = to_batch_innermost(x).requires_grad_()
    xr = x.clone().requires_grad_()
    rb = rr = None
    if residual_layout is not None:
        rb = (to_batch_innermost(shortcut) if residual_layout == "same" else shortcut.clone()).requires_grad_()
        rr = shortcut.clone().requires_grad_()
    leaves = [(xb, xr)] + ([(rb, rr)] if rb is not None else [])
    _check_outputs_and_grads(norm_add_relu(kept, xb, rb), norm_add_relu(plain, xr, rr), leaves)
    torch.testing.assert_close(kept.running_var, plain.running_var)


def test_to_batch_innermost_converts_value_and_gradient():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    y = to_batch_innermost(x)
    assert is_batch_innermost(y) and torch.equal(y, x)
    assert to_batch_innermost(y) is y
    grad = to_batch_innermost(torch.randn(3, 4, 5, 6, dtype=torch.float64))
    y.backward(grad)
    assert x.grad.is_contiguous() and torch.equal(x.grad, grad)  # back to NCHW for a dense layer before it
    assert torch.autograd.gradcheck(to_batch_innermost, (torch.randn(2, 3, 2, 2, dtype=torch.float64,
                                                                     requires_grad=True),))
    with pytest.raises(ValueError, match="4-D"):
        to_batch_innermost(torch.randn(3, 4))


def test_to_nchw_converts_value_and_hands_the_gradient_back_batch_innermost():
    x = to_batch_innermost(torch.randn(3, 4, 5, 6, dtype=torch.float64)).requires_grad_()
    y = to_nchw(x)
    assert y.is_contiguous() and not is_batch_innermost(y) and torch.equal(y, x)
    plain = torch.randn(3, 4, 5, 6)
    assert to_nchw(plain) is plain
    grad = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    y.backward(grad)
    assert is_batch_innermost(x.grad) and torch.equal(x.grad, grad)  # as the sparse layer before it wants
    leaf = to_batch_innermost(torch.randn(2, 3, 2, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(to_nchw, (leaf,))


@pytest.mark.parametrize("emit", [False, True])
def test_unmasked_conv_reads_any_layout_and_emits_batch_innermost_when_asked(emit):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    layout_conv = to_layout_module(copy.deepcopy(conv))
    layout_conv.emit_batch_innermost = emit
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    for inp in (x, to_batch_innermost(x)):
        y = layout_conv(inp)
        assert is_batch_innermost(y) == emit
        torch.testing.assert_close(y, conv(x))
    assert type(from_layout_module(layout_conv)) is nn.Conv2d
    assert "emit_batch_innermost" not in from_layout_module(layout_conv).__dict__
