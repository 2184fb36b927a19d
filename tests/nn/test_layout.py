"""The layout-keeping BatchNorm and pooling modules compute exactly what their torch classes do."""

import pytest
import torch
from torch import nn

from graspext.nn.layout import from_layout_module, is_batch_innermost, to_layout_module


def _batch_innermost(x):
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm2d(5),
    lambda: nn.BatchNorm2d(5, affine=False, momentum=None),
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
    xb = _batch_innermost(x).requires_grad_()
    xr = x.clone().requires_grad_()
    y, yr = kept(xb), base(xr)
    torch.testing.assert_close(y, yr)
    assert is_batch_innermost(y)
    grad = torch.randn_like(yr)
    y.backward(grad)
    yr.backward(grad)
    torch.testing.assert_close(xb.grad, xr.grad)
    for a, b in zip(base.buffers(), kept.buffers()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kept(x), base(x))  # NCHW input takes the torch path
    assert type(from_layout_module(kept)) is type(base)


def test_detection():
    x = torch.randn(4, 3, 5, 5)
    assert not is_batch_innermost(x)
    assert is_batch_innermost(_batch_innermost(x))
    assert not is_batch_innermost(torch.randn(4, 3))


def test_relu_after_batchnorm_needs_no_copy_in_backward():
    bn, relu = to_layout_module(nn.BatchNorm2d(5).double()), to_layout_module(nn.ReLU(inplace=True))
    x = _batch_innermost(torch.randn(6, 5, 4, 4, dtype=torch.float64)).requires_grad_()
    y = relu(bn(x))
    assert "CopySlices" not in type(y.grad_fn).__name__
    ref = torch.relu(nn.BatchNorm2d(5).double()(x.detach()))
    torch.testing.assert_close(y, ref)
