"""SparseConv2d / SparseLinear: same results as the masked dense layers, O(nnz) parameters, state_dict."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graspext.nn import SparseConv2d, SparseLinear
from tests.conftest import DEVICES


def _masked_conv(seed=0, density=0.3, **kwargs):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 8, 3, **{"padding": 1, **kwargs}).double()
    mask = torch.rand_like(conv.weight) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask


def _check_against_masked_dense(layer, dense, mask, x):
    """Output, input gradient and the kept weights' (and bias) gradients of `layer` equal the masked dense layer's."""
    x = x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = layer(x), dense(xr)
    torch.testing.assert_close(y, yr)
    grad = torch.randn_like(yr)
    y.backward(grad)
    yr.backward(grad)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.values.grad, dense.weight.grad[mask])
    if dense.bias is not None:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "bias": False}, {"padding": "same"}, {"padding": "valid"}])
def test_conv_matches_masked_dense(mode, kwargs):
    conv, mask = _masked_conv(**kwargs)
    layer = SparseConv2d.from_dense(conv, mask, mode=mode)
    _check_against_masked_dense(layer, conv, mask, torch.randn(5, 6, 9, 9, dtype=torch.float64))
    assert layer.values.numel() == int(mask.sum())
    assert [n for n, _ in layer.named_parameters()] == ["values"] + (["bias"] if conv.bias is not None else [])


@pytest.mark.parametrize("config", [{"groups": 2}, {"dilation": 2}, {"padding_mode": "reflect"}])
def test_unsupported_conv_falls_back_to_dense_with_a_warning(config):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=2 if "dilation" in config else 1, **config).double()
    mask = torch.rand_like(conv.weight) < 0.5
    with torch.no_grad():
        conv.weight.mul_(mask)
    from graspext.nn import modules

    modules._warned.clear()
    with pytest.warns(UserWarning, match="do not support"):
        layer = SparseConv2d.from_dense(conv, mask)
    assert layer.mode == "dense" and "do not support" in layer.decision
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per configuration, not once per layer
        SparseConv2d.from_dense(conv, mask)
    _check_against_masked_dense(layer, conv, mask, torch.randn(2, 4, 7, 7, dtype=torch.float64))


def test_linear_matches_masked_dense_with_leading_dims():
    torch.manual_seed(1)
    linear = nn.Linear(10, 7).double()
    mask = torch.rand_like(linear.weight) < 0.4
    with torch.no_grad():
        linear.weight.mul_(mask)
    layer = SparseLinear.from_dense(linear, mask)
    for shape in [(4, 10), (2, 3, 10), (1, 10)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(layer(x), linear(x))
    with pytest.raises(ValueError, match="features in its last dimension"):
        layer(torch.randn(4, 9, dtype=torch.float64))


def test_mask_shape_mismatch_is_an_error():
    conv, mask = _masked_conv()
    with pytest.raises(ValueError, match="mask has shape"):
        SparseConv2d.from_dense(conv, mask[:, :3])
    with pytest.raises(TypeError, match="must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 4))


def test_state_dict_is_that_of_the_dense_layer():
    conv, mask = _masked_conv()
    layer = SparseConv2d.from_dense(conv, mask)
    state = layer.state_dict()
    assert set(state) == set(conv.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(state["weight"], conv.weight.detach())
    dense = nn.Conv2d(6, 8, 3, padding=1).double()
    dense.load_state_dict(state)  # a sparse checkpoint loads into the dense model as it is
    torch.testing.assert_close(dense.weight, conv.weight)

    other = SparseConv2d.from_dense(conv, mask)
    with torch.no_grad():
        other.values.zero_()
    other.load_state_dict(state)
    torch.testing.assert_close(other.values, layer.values)


def test_loading_weights_outside_the_pattern_is_an_error():
    conv, mask = _masked_conv()
    layer = SparseConv2d.from_dense(conv, mask)
    state = {"weight": torch.ones_like(conv.weight), "bias": conv.bias.detach()}
    with pytest.raises(RuntimeError, match="outside this layer's sparsity pattern"):
        layer.load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"bias": conv.bias.detach()})


def test_to_dense_round_trip():
    conv, mask = _masked_conv(stride=2)
    back = SparseConv2d.from_dense(conv, mask).to_dense()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(back(x), conv(x))
    assert (back.stride, back.padding) == (conv.stride, conv.padding)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_the_kernels_in_bfloat16(input_dtype):
    conv, mask = _masked_conv()
    layer = SparseConv2d.from_dense(conv.float(), mask)
    x = torch.randn(2, 6, 5, 5).to(input_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the kernels run
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == layer.computed_dtype == torch.bfloat16
    ref = F.conv2d(x.bfloat16().double(), conv.weight.double() * mask, conv.bias.double(), 1, 1)
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=1e-2)


def test_non_kernel_dtypes_compute_densely(monkeypatch):
    monkeypatch.setattr("graspext.nn.modules._warned", set())  # the warning is given once per process
    conv, mask = _masked_conv()
    layer = SparseConv2d.from_dense(conv.half(), mask)  # float16: the CPU kernels have no such path
    x = torch.randn(2, 6, 5, 5)
    with pytest.warns(UserWarning, match="computing densely"):
        y = layer(x.half())
    assert y.dtype == layer.computed_dtype == torch.float16
    ref = F.conv2d(x, conv.weight.float() * mask, conv.bias.float(), 1, 1)
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_pruned_weights_stay_zero_under_sgd_and_adamw():
    conv, mask = _masked_conv()
    layer = SparseConv2d.from_dense(conv, mask)
    for opt in (torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                torch.optim.AdamW(layer.parameters(), lr=0.01)):
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(2, 6, 5, 5, dtype=torch.float64)).sum().backward()
            opt.step()
        assert not layer.state_dict()["weight"][~mask].any()


def _dead_channel_mask(shape, dead_out, dead_in, density=0.5, seed=0):
    torch.manual_seed(seed)
    mask = torch.rand(shape) < density
    mask[list(dead_out)] = False
    mask[:, list(dead_in)] = False
    return mask


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "bias": False}, {"padding_mode": "reflect"}, {"padding": 0}])
@pytest.mark.parametrize("layout", ["nchw", "batch_innermost"])
def test_compact_conv_matches_masked_dense(kwargs, layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, **{"padding": 1, **kwargs}).double()
    mask = _dead_channel_mask(conv.weight.shape, dead_out=(0, 3, 7), dead_in=(1, 2))
    with torch.no_grad():
        conv.weight.mul_(mask)
    layer = SparseConv2d.from_dense(conv, mask, mode="compact")
    assert layer.mode == "compact"  # also with a padding mode the sparse kernels lack: compact is dense torch
    assert layer.dead_channels == (3, 2)
    assert layer.compact_mac_fraction == pytest.approx(5 * 4 / (8 * 6))
    assert layer.compact_weight().shape == (5, 4, 3, 3)
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    if layout == "batch_innermost":
        x = x.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    _check_against_masked_dense(layer, conv, mask, x)  # dead outputs are their bias, and get its gradient


def test_compact_linear_matches_masked_dense_and_gradcheck():
    torch.manual_seed(2)
    linear = nn.Linear(10, 7).double()
    mask = _dead_channel_mask(linear.weight.shape, dead_out=(2, 5), dead_in=(0, 9), density=0.6)
    with torch.no_grad():
        linear.weight.mul_(mask)
    layer = SparseLinear.from_dense(linear, mask, mode="compact")
    assert layer.dead_channels == (int((~mask.any(1)).sum()), int((~mask.any(0)).sum()))
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), linear(x))

    def run(inp, values, bias):
        return torch.func.functional_call(layer, {"values": values, "bias": bias}, (inp,))

    params = (layer.values.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(run, (x, *params))


def test_compact_layer_with_no_kept_weight_outputs_its_bias():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    mask = torch.zeros_like(conv.weight, dtype=torch.bool)
    layer = SparseConv2d.from_dense(conv, mask, mode="compact")
    assert layer.dead_channels == (4, 3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv.bias.detach().view(1, 4, 1, 1).expand(2, 4, 5, 5))


def test_compact_survives_device_and_state_dict_round_trips():
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 6, 1).double()
    mask = _dead_channel_mask(conv.weight.shape, dead_out=(1,), dead_in=(4,))
    with torch.no_grad():
        conv.weight.mul_(mask)
    layer = SparseConv2d.from_dense(conv, mask, mode="compact")
    clone = SparseConv2d.from_dense(nn.Conv2d(5, 6, 1).double(), mask, mode="compact")
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(clone(x), conv(x))
    assert {n for n, _ in layer.named_buffers()} >= {"live_out", "live_in", "compact_index"}
    assert set(layer.state_dict()) == {"weight", "bias"}
    moved = layer.to("meta")
    assert all(b.device.type == "meta" for b in moved.buffers())
    with pytest.raises(ValueError, match="input has 4 channels in dimension 1, expected 5"):
        clone(torch.randn(2, 4, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_compact_under_autocast_has_the_dtype_of_dense_mode(device):
    """Dead outputs (their bias) take the product's dtype, so compact and dense mode agree under autocast."""
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 8, 3, padding=1).to(device)
    mask = _dead_channel_mask(conv.weight.shape, dead_out=(0, 5), dead_in=(3,)).to(device)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(4, 6, 7, 7, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    outputs = {}
    for mode in ("dense", "compact"):
        layer = SparseConv2d.from_dense(conv, mask, mode=mode)
        with torch.autocast(device, dtype=dtype):
            outputs[mode] = layer(x)
        outputs[mode].float().sum().backward()
        assert layer.values.grad.dtype == torch.float32
    assert outputs["compact"].dtype == outputs["dense"].dtype == dtype
    torch.testing.assert_close(outputs["compact"].float(), outputs["dense"].float(), rtol=2e-2, atol=2e-2)


def test_float64_layer_under_autocast_computes_densely_in_float64():
    """Autocast never casts float64; the kernels then see mismatched dtypes, so the layer runs dense torch."""
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = SparseConv2d.from_dense(conv, torch.rand_like(conv.weight) < 0.5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time "computing densely" warning
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
