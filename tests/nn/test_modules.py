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


# ---- patterns that change: set_mask_, dense gradients, the mask in the state dict ---------------------------------


def _moved_mask(mask, n_move, seed=0):
    """``mask`` with ``n_move`` kept positions moved to pruned ones (same count)."""
    gen = torch.Generator().manual_seed(seed)
    flat = mask.clone().reshape(-1)
    kept, free = flat.nonzero().flatten(), (~flat).nonzero().flatten()
    flat[kept[torch.randperm(kept.numel(), generator=gen)[:n_move]]] = False
    flat[free[torch.randperm(free.numel(), generator=gen)[:n_move]]] = True
    return flat.view(mask.shape)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("make", ["conv", "linear"])
def test_set_mask_keeps_survivors_with_their_optimizer_state_and_starts_new_weights_at_zero(optimizer_cls, make):
    if make == "conv":
        dense, mask = _masked_conv()
        layer = SparseConv2d.from_dense(dense, mask)
        x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    else:
        torch.manual_seed(0)
        dense = nn.Linear(12, 7).double()
        mask = torch.rand_like(dense.weight) < 0.4
        layer = SparseLinear.from_dense(dense, mask)
        x = torch.randn(4, 12, dtype=torch.float64)
    kwargs = {"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {}
    opt = optimizer_cls(layer.parameters(), lr=0.1, **kwargs)
    layer(x).square().sum().backward()
    opt.step()
    values = layer.values
    before_w = layer.dense_weight().detach().clone()
    before_state = {k: layer.pattern.scatter(v).detach().clone() for k, v in opt.state[values].items()
                    if isinstance(v, torch.Tensor) and v.shape == values.shape}
    assert before_state
    new_mask = _moved_mask(mask, 5)
    assert layer.set_mask_(new_mask, opt) == 5
    assert layer.values is values  # the optimizer's parameter object stays
    assert torch.equal(layer.mask(), new_mask)
    survived, grown = new_mask & mask, new_mask & ~mask
    w = layer.dense_weight().detach()
    assert torch.equal(w[survived], before_w[survived])
    assert torch.equal(w[grown], torch.zeros_like(w[grown])) and torch.equal(w[~new_mask], torch.zeros_like(w[~new_mask]))
    for k, v in opt.state[values].items():
        if k in before_state:
            moved = layer.pattern.scatter(v)
            assert torch.equal(moved[survived], before_state[k][survived]), k
            assert torch.equal(moved[grown], torch.zeros_like(moved[grown])), k
    # The layer still computes its (new) masked dense weight, forward and backward, and keeps training.
    reference = type(dense)(*((6, 8, 3) if make == "conv" else (12, 7)), **({"padding": 1} if make == "conv" else {}))
    reference = reference.double()
    with torch.no_grad():
        reference.weight.copy_(layer.dense_weight())
        reference.bias.copy_(layer.bias)
    opt.zero_grad()
    _check_against_masked_dense(layer, reference, new_mask, x.clone())
    opt.step()


def test_set_mask_rebuilds_the_compaction_and_chooses_the_mode_again(monkeypatch):
    import graspext.nn.convert
    from graspext import sparsify

    # An 8-channel layer runs sparse up to high densities; a flat break-even puts density 0.25 on the dense side.
    monkeypatch.setattr(graspext.nn.convert, "CONV_BREAK_EVEN_BY_WIDTH", ((16, 0.25),))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    mask = torch.zeros(8, 8, 3, 3, dtype=torch.bool)
    mask[:2] = True  # 6 dead output channels: compact under the cost model (density 0.25: dense side)
    model = sparsify(model, {"0.weight": mask})
    layer = model[0]
    assert layer.mode == "compact" and layer.dead_channels == (6, 0)
    inputs_dead = torch.zeros(8, 8, 3, 3, dtype=torch.bool)
    inputs_dead.view(8, -1)[:, :18] = True  # same count: every output live, inputs 2..7 dead
    layer.set_mask_(inputs_dead)
    assert layer.dead_channels == (0, 6) and layer.mode == "compact"
    spread = torch.zeros(8 * 8 * 9, dtype=torch.bool)
    spread[torch.randperm(spread.numel(), generator=torch.Generator().manual_seed(0))[:144]] = True
    layer.set_mask_(spread.view(8, 8, 3, 3))
    assert layer.dead_channels == (0, 0) and layer.mode == "dense" and "cost model" in layer.decision
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, padding=1))


def test_set_mask_refuses_another_count_shape_or_dtype():
    dense, mask = _masked_conv()
    layer = SparseConv2d.from_dense(dense, mask)
    more = mask.clone()
    more.view(-1)[(~mask).view(-1).nonzero()[0]] = True
    with pytest.raises(ValueError, match=r"mask keeps \d+ weights but the layer keeps \d+"):
        layer.set_mask_(more)
    with pytest.raises(ValueError, match="mask has shape"):
        layer.set_mask_(mask[:4])
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer.set_mask_(mask.double())
    with pytest.raises(ValueError, match="reinit must be a tensor of the weight's shape"):
        layer.set_mask_(mask, reinit=mask[:2])
    assert torch.equal(layer.mask(), mask)  # unchanged after the refusals


@pytest.mark.parametrize("mode", ["sparse", "dense", "compact"])
@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "bias": False}, {"padding": 0}])
def test_dense_grad_is_the_gradient_at_every_position(mode, kwargs):
    dense, mask = _masked_conv(**kwargs)
    layer = SparseConv2d.from_dense(dense, mask, mode=mode)
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    grad_out = torch.randn_like(dense(x))
    layer.request_dense_grad()
    layer(x).backward(grad_out)
    weight = dense.weight.detach().clone().requires_grad_()
    F.conv2d(x, weight, dense.bias, dense.stride, dense.padding).backward(grad_out)
    torch.testing.assert_close(layer.dense_grad(), weight.grad)
    assert bool((weight.grad[~mask] != 0).any())  # pruned positions have gradients too
    torch.testing.assert_close(layer.values.grad, weight.grad[mask])  # the sparse gradient is unchanged
    # Steps without a request capture nothing.
    layer(x).backward(grad_out)
    with pytest.raises(RuntimeError, match="no dense gradient was requested"):
        layer.dense_grad()


@pytest.mark.parametrize("mode", ["sparse", "dense", "compact"])
def test_linear_dense_grad(mode):
    torch.manual_seed(1)
    dense = nn.Linear(10, 6).double()
    mask = torch.rand_like(dense.weight) < 0.3
    mask[3] = False  # a dead output row
    layer = SparseLinear.from_dense(dense, mask, mode=mode)
    x = torch.randn(5, 10, dtype=torch.float64)
    layer.request_dense_grad()
    layer(x).sum().backward()
    weight = dense.weight.detach().clone().requires_grad_()
    F.linear(x, weight, dense.bias).sum().backward()
    torch.testing.assert_close(layer.dense_grad(), weight.grad)


def test_dense_grad_errors_say_what_is_missing():
    dense, mask = _masked_conv()
    layer = SparseConv2d.from_dense(dense, mask)
    layer.request_dense_grad()
    with pytest.raises(RuntimeError, match="no dense gradient was captured"):
        layer.dense_grad()
    layer(torch.randn(1, 6, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="no backward reached this layer"):
        layer.dense_grad()
    layer.values.requires_grad_(False)
    with pytest.raises(RuntimeError, match="do not require grad"):
        layer.request_dense_grad()


def test_the_current_mask_travels_in_the_state_dict_and_dense_models_still_load_it(tmp_path):
    dense, mask = _masked_conv()
    layer = SparseConv2d.from_dense(dense, mask)
    new_mask = _moved_mask(mask, 7)
    layer.set_mask_(new_mask)  # the 7 grown weights are exactly zero: the weight alone cannot tell them apart
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    state = torch.load(tmp_path / "layer.pt", weights_only=True)
    fresh = SparseConv2d.from_dense(dense, mask)  # built with the initial pattern
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mask(), new_mask)
    assert torch.equal(fresh.values, layer.values)
    plain = nn.Conv2d(6, 8, 3, padding=1).double()
    plain.load_state_dict(state)  # strict: the mask is metadata, not a key
    torch.testing.assert_close(plain.weight, layer.dense_weight().detach())
    other = SparseConv2d.from_dense(dense, _moved_mask(mask, 3) & mask)  # fewer kept weights
    with pytest.raises(RuntimeError, match="this sparse layer keeps"):
        other.load_state_dict(state)
