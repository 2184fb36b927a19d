"""sparsify / densify on whole models: same function, per-layer choices, layouts, training."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graspext as gx
from graspext.nn import SparseConv2d, SparseLinear, format_sparsity_report, sparsity_report
from graspext.nn.layout import BatchNorm2d, MaxPool2d
from tests.conftest import DEVICES, SmallResNet, SmallVGG


def _pruned(model_cls, sparsity=0.8, seed=0):
    torch.manual_seed(seed)
    model = model_cls().double()
    masks = gx.prune(model, "random", sparsity)
    masks.apply_(model).remove()  # zero the pruned weights of the dense reference
    return model, masks


@pytest.mark.parametrize("model_cls", [SmallVGG, SmallResNet])
@pytest.mark.parametrize("policy", ["sparse", "auto"])
def test_sparsified_model_computes_the_same(model_cls, policy):
    model, masks = _pruned(model_cls)
    sparse = gx.sparsify(model, masks, policy=policy)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules()), "model was modified"
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    for m in (model, sparse):
        m.train()
    y, ys = model(x), sparse(x)
    torch.testing.assert_close(ys, y)
    y.sum().backward()
    ys.sum().backward()
    for name, module in sparse.named_modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            dense = model.get_submodule(name)
            torch.testing.assert_close(module.values.grad, dense.weight.grad[masks[name + ".weight"]])
    # BatchNorm running statistics follow the same updates.
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            torch.testing.assert_close(sparse.get_submodule(name).running_mean, bn.running_mean)
            torch.testing.assert_close(sparse.get_submodule(name).running_var, bn.running_var)


def test_layout_converted_once_between_sparse_layers():
    model, masks = _pruned(SmallVGG)
    sparse = gx.sparsify(model, masks, policy="sparse")
    assert any(type(m) is BatchNorm2d for m in sparse.modules())
    assert any(type(m) is MaxPool2d for m in sparse.modules())
    seen = []
    for m in sparse.modules():
        if isinstance(m, (SparseConv2d, nn.BatchNorm2d, nn.MaxPool2d)):
            m.register_forward_hook(lambda _m, _i, out: seen.append(gx.nn.is_batch_innermost(out)))
    sparse(torch.randn(4, 3, 8, 8, dtype=torch.float64))
    assert all(seen) and len(seen) > 5


def test_parameters_scale_with_kept_weights():
    model, masks = _pruned(SmallVGG, sparsity=0.9)
    sparse = gx.sparsify(model, masks, policy="sparse")
    n_dense = sum(p.numel() for p in model.parameters())
    n_sparse = sum(p.numel() for p in sparse.parameters())
    assert n_dense - n_sparse == masks.num_total() - masks.num_kept()


def test_state_dict_round_trips_through_dense_and_sparse():
    model, masks = _pruned(SmallResNet)
    sparse = gx.sparsify(model, masks)
    state = sparse.state_dict()
    assert set(state) == set(model.state_dict())
    dense = SmallResNet().double()
    dense.load_state_dict(state)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    dense.eval(), sparse.eval()
    torch.testing.assert_close(dense(x), sparse(x))
    again = gx.sparsify(SmallResNet().double(), masks)
    again.load_state_dict(state)
    again.eval()
    torch.testing.assert_close(again(x), sparse(x))


def test_densify_restores_plain_modules():
    model, masks = _pruned(SmallVGG)
    sparse = gx.sparsify(model, masks)
    back = gx.densify(sparse)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in back.modules())
    assert all(type(m) in (nn.BatchNorm2d,) for m in back.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.eval(), back.eval()
    torch.testing.assert_close(back(x), model(x))
    assert any(isinstance(m, SparseConv2d) for m in sparse.modules()), "densify copied by default"
    gx.densify(sparse, inplace=True)
    assert not any(isinstance(m, SparseConv2d) for m in sparse.modules())


def test_inplace_and_filter_fn():
    model, masks = _pruned(SmallVGG)
    out = gx.sparsify(model, masks, inplace=True, filter_fn=lambda m, name: isinstance(m, nn.Conv2d))
    assert out is model
    assert isinstance(model.classifier, nn.Linear) and not isinstance(model.classifier, SparseLinear)
    assert isinstance(model.features[0], SparseConv2d)


def test_policies_and_report():
    model, masks = _pruned(SmallVGG, sparsity=0.5)
    auto = gx.sparsify(model, masks, policy="auto")
    rows = sparsity_report(auto)
    assert len(rows) == len(masks)
    assert all("cost model" in r.decision for r in rows)
    layers = {name: m for name, m in auto.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    assert all((r.mode == "sparse") == (r.density < gx.nn.break_even_density(layers[r.name], None)[0]) for r in rows)
    for layer in auto.modules():
        if isinstance(layer, (SparseConv2d, SparseLinear)) and layer.mode != "sparse":
            worth = layer.nnz > 0 and 1 - layer.compact_mac_fraction >= gx.nn.COMPACT_MIN_SAVING
            assert layer.mode == ("compact" if worth else "dense")
    measured = gx.sparsify(model.float(), masks, policy="measure", example_input=torch.randn(4, 3, 8, 8))
    assert all("measured" in r.decision for r in sparsity_report(measured))
    assert "layers use the sparse kernels" in format_sparsity_report(measured)
    dense = gx.sparsify(model, masks, policy="dense")
    assert all(r.mode == "dense" for r in sparsity_report(dense))


@pytest.mark.parametrize("sparsity", [0.3, 0.8, 0.97])
@pytest.mark.parametrize("policy", ["auto", "dense", "sparse", "compact"])
def test_planned_modes_are_the_modes_sparsify_picks(sparsity, policy):
    model, masks = _pruned(SmallResNet, sparsity=sparsity)
    converted = {f"{r.name}.weight": r.mode for r in sparsity_report(gx.sparsify(model, masks, policy=policy))}
    planned = gx.nn.planned_modes(model, masks, policy=policy)
    assert planned == converted
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())  # model left alone
    with pytest.raises(ValueError, match="policy must be one of .* got 'measure'"):
        gx.nn.planned_modes(model, masks, policy="measure")


def test_predicted_saving_follows_the_planned_modes():
    model, masks = _pruned(SmallResNet, sparsity=0.97)
    assert gx.nn.predicted_saving(model, masks, policy="dense") == 0.0
    sparse = gx.sparsify(model, masks, policy="sparse")
    layers = [m for m in sparse.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    limits = [gx.nn.break_even_density(m, None)[0] for m in layers]
    assert gx.nn.predicted_saving(model, masks, policy="sparse") == pytest.approx(
        sum(1 - m.density / b for m, b in zip(layers, limits)) / len(masks))
    assert 0 < gx.nn.predicted_saving(model, masks) <= 1


def test_a_dense_side_conv_between_sparse_layers_runs_sparse_under_twice_its_break_even():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                          nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    limit = gx.nn.convert.conv_break_even(64)
    g = torch.Generator().manual_seed(0)
    densities = [0.05, 1.5 * limit, 0.05, 2.5 * limit]
    masks = {f"{i}.weight": torch.rand(64, 64, 3, 3, generator=g) < d for i, d in enumerate(densities)}
    modes = gx.nn.planned_modes(model, masks)
    assert list(modes.values()) == ["sparse", "sparse", "sparse", "dense"]  # the last has no sparse layer after it
    rows = sparsity_report(gx.sparsify(model, masks))
    assert [r.mode for r in rows] == list(modes.values()) and "between sparse layers" in rows[1].decision


def test_conv_break_even_follows_the_layer_width():
    from graspext.nn.convert import conv_break_even

    points = dict(gx.nn.CONV_BREAK_EVEN_BY_WIDTH)
    assert all(conv_break_even(w) == pytest.approx(d) for w, d in points.items())
    assert conv_break_even(4) == points[16] and conv_break_even(4096) == points[512]
    assert points[32] > conv_break_even(45) > points[64]  # between the points, between their values
    narrow = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3), torch.rand(16, 16, 3, 3) < 0.6)
    wide = SparseConv2d.from_dense(nn.Conv2d(256, 256, 3), torch.rand(256, 256, 3, 3) < 0.6)
    assert gx.nn.break_even_density(narrow, None)[0] > gx.nn.break_even_density(wide, None)[0]
    assert "width 16" in gx.nn.break_even_density(narrow, None)[1]


@pytest.mark.cuda
def test_policies_on_cuda(monkeypatch):
    """On CUDA "auto" keeps cuDNN (the sparse kernels win by shape, not density); "measure" times both modes on
    the GPU, and the model computes what the dense one computes either way."""
    monkeypatch.setenv("GRASPEXT_CUDA_SPARSE", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    model, masks = _pruned(SmallVGG, sparsity=0.9)
    model = model.float().cuda()
    x = torch.randn(8, 3, 8, 8, device="cuda")
    auto = gx.sparsify(model, masks, policy="auto")
    assert all(r.mode in ("dense", "compact") and "on CUDA" in r.decision for r in sparsity_report(auto))
    measured = gx.sparsify(model, masks, policy="measure", example_input=x)
    assert all("measured" in r.decision for r in sparsity_report(measured))
    model.eval(), measured.eval()
    torch.testing.assert_close(measured(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_model_trains_like_the_masked_dense_one(arch):
    """Any torchvision classifier: ResNet18, and MobileNetV3 whose depthwise (grouped) convs fall back to dense.
    Train-mode forward, backward and gradients match the masked dense model."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).double()
    masks = gx.prune(model, "magnitude", 0.9, scope="layerwise")  # global would collapse MobileNet's layers
    masks.apply_(model).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the grouped convs' one-time fallback warning
        sparse = gx.sparsify(model, masks, policy="sparse")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.eval(), sparse.eval()
    torch.testing.assert_close(sparse(x), model(x))
    model.train(), sparse.train()
    for m in (*model.modules(), *sparse.modules()):
        if isinstance(m, nn.Dropout):  # its mask follows memory order, which the sparse layout changes
            m.eval()
    y, ys = model(x), sparse(x)
    torch.testing.assert_close(ys, y)
    ys.square().sum().backward()
    y.square().sum().backward()
    for name, layer in sparse.named_modules():
        if isinstance(layer, (SparseConv2d, SparseLinear)):
            dense = model.get_submodule(name)
            torch.testing.assert_close(layer.values.grad, dense.weight.grad[layer.mask()])


def test_bad_input():
    model, masks = _pruned(SmallVGG)
    with pytest.raises(ValueError, match="policy must be one of"):
        gx.sparsify(model, masks, policy="fastest")
    with pytest.raises(ValueError, match="needs example_input"):
        gx.sparsify(model, masks, policy="measure")
    with pytest.raises(KeyError, match="has no module"):
        gx.sparsify(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(KeyError, match="does not name a layer weight"):
        gx.sparsify(model, {"features.0.bias": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(TypeError, match="only Conv2d and Linear"):
        gx.sparsify(model, {"features.1.weight": torch.ones(8, dtype=torch.bool)})
    bad = dict(masks)
    bad["features.0.weight"] = bad["features.0.weight"][:, :2]
    with pytest.raises(ValueError, match="has shape"):
        gx.sparsify(model, bad)
    with pytest.raises(TypeError, match=r"masks\['features.0.weight'\] must be a bool tensor"):
        gx.sparsify(model, {**masks, "features.0.weight": masks["features.0.weight"].float()})


def test_dense_layer_hands_the_batch_innermost_layout_to_a_sparse_one():
    """A dense-mode conv followed by a sparse one converts its output once, where it is produced."""
    model, _ = _pruned(SmallVGG)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    g = torch.Generator().manual_seed(0)
    masks = {}
    for i, name in enumerate(convs):  # the first conv dense by the cost model, the others sparse
        weight = model.get_submodule(name).weight
        masks[name + ".weight"] = torch.rand(weight.shape, generator=g) < (0.9 if i == 0 else 0.1)
        with torch.no_grad():
            weight.mul_(masks[name + ".weight"])
    sparse = gx.sparsify(model, masks, policy="auto")
    first, second = (sparse.get_submodule(n) for n in convs[:2])
    assert (first.mode, second.mode) == ("dense", "sparse")
    assert first.emit_batch_innermost and not second.emit_batch_innermost
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert gx.nn.is_batch_innermost(first(x))
    model.eval(), sparse.eval()
    torch.testing.assert_close(sparse(x), model(x))


def test_short_training_matches_dense_masked_run():
    """Loss curves of sparse kernels and of the masked dense model agree to float tolerance."""
    model, masks = _pruned(SmallVGG, sparsity=0.9, seed=3)
    sparse = gx.sparsify(model, masks, policy="sparse")
    handle = masks.apply_(model)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
    data = [batch] * 8  # one batch again and again: the loss must fall
    curves = []
    for m in (model, sparse):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        losses = []
        for x, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    handle.remove()
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-9, atol=1e-9)
    assert curves[0][-1] < curves[0][0]


def test_sparsified_model_compiles_with_fused_batch_norm():
    # Fake kernels and autograd of the sparse and fused BatchNorm ops, traced through the whole model.
    model, masks = _pruned(SmallVGG)
    sparse = gx.sparsify(model, masks, policy="sparse").train()
    reference = copy.deepcopy(sparse)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = torch.compile(sparse, backend="aot_eager", fullgraph=True)(x)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), q in zip(sparse.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(sparse.named_buffers(), reference.buffers()):  # running statistics, too
        torch.testing.assert_close(b, c, msg=name)


def _with_dead_channels(masks, fraction=0.5):
    """The masks with the first `fraction` of each conv's output channels pruned entirely."""
    masks = {k: v.clone() for k, v in masks.items()}
    for mask in masks.values():
        if mask.dim() == 4:
            mask[: int(mask.shape[0] * fraction)] = False
    return masks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_cls", [SmallVGG, SmallResNet])
def test_compact_policy_computes_the_same_and_reports_dead_channels(model_cls, device, monkeypatch):
    # Narrow layers run sparse up to high densities; a flat break-even puts these on the dense side.
    monkeypatch.setattr(gx.nn.convert, "CONV_BREAK_EVEN_BY_WIDTH", ((16, 0.25),))
    model, masks = _pruned(model_cls, sparsity=0.5)
    masks = _with_dead_channels(masks)
    model = model.to(device)
    for name, mask in masks.items():
        with torch.no_grad():
            model.get_submodule(name.rsplit(".", 1)[0]).weight.mul_(mask)
    compact = gx.sparsify(model, masks, policy="compact")
    auto = gx.sparsify(model, masks, policy="auto")
    rows = {r.name: r for r in sparsity_report(auto)}
    for name, layer in compact.named_modules():
        if isinstance(layer, SparseConv2d):
            assert layer.mode == "compact"
            assert layer.dead_channels[0] >= layer.out_channels // 2
            if rows[name].mode != "sparse":  # dense by density: half the work is dead, so compact
                assert rows[name].mode == "compact" and "dead output" in rows[name].decision
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, device=device)
    for m in (model, compact, auto):
        m.train()
    torch.testing.assert_close(compact(x), model(x))
    torch.testing.assert_close(auto(x), model(x))
    compact(x).square().sum().backward()
    model(x).square().sum().backward()
    for name, layer in compact.named_modules():
        if isinstance(layer, SparseConv2d):
            dense = model.get_submodule(name)
            torch.testing.assert_close(layer.values.grad, dense.weight.grad[layer.mask()])
            if layer.bias is not None:
                torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    assert "dense kernels on the live channels only" in format_sparsity_report(auto)


def test_measure_times_the_compact_mode_where_channels_are_dead():
    model, masks = _pruned(SmallVGG, sparsity=0.5)
    masks = _with_dead_channels(masks)
    measured = gx.sparsify(model.float(), masks, policy="measure", example_input=torch.randn(4, 3, 8, 8))
    for r in sparsity_report(measured):
        if r.kind == "conv":
            assert "compact" in r.decision and "sparse" in r.decision and "dense" in r.decision


# ---- bfloat16 autocast on the CPU ---------------------------------------------------------------------


@pytest.mark.parametrize("model_cls", [SmallVGG, SmallResNet])
@pytest.mark.parametrize("policy", ["sparse", "compact", "dense"])
def test_bf16_autocast_matches_the_masked_dense_model(model_cls, policy):
    """Every mode under CPU bfloat16 autocast computes in bfloat16 (the report says so) and stays close to
    the masked dense model under the same autocast; float32 parameters get float32 gradients."""
    model, masks = _pruned(model_cls)
    model = model.float()
    sparse = gx.sparsify(model, masks, policy=policy, dtype=torch.bfloat16)
    dense = copy.deepcopy(model).train()
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name.rpartition(".")[0]).weight.mul_(mask)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys, yd = sparse(x), dense(x)
    # bfloat16 keeps 8 significant bits: both sides round differently at every layer.
    torch.testing.assert_close(ys.float(), yd.float(), rtol=0.1, atol=0.1 * yd.float().abs().max().item())
    ys.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in sparse.parameters() if p.grad is not None)
    assert {r.dtype for r in sparsity_report(sparse)} == {"bfloat16"}
    assert "bfloat16" in format_sparsity_report(sparse)


def test_filter_fn_that_matches_nothing_warns():
    model, masks = _pruned(SmallVGG)
    with pytest.warns(UserWarning, match="filter_fn rejected all"):
        out = gx.sparsify(model, masks, filter_fn=lambda m, n: False)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in out.modules())


def test_bf16_cost_model_and_measure():
    model, masks = _pruned(SmallVGG, sparsity=0.8)
    model = model.float()
    auto = gx.sparsify(model, masks, dtype=torch.bfloat16)
    for row in sparsity_report(auto):
        assert "bfloat16" in row.decision, row
        limit = gx.nn.convert.BREAK_EVEN_DENSITY_BF16[row.kind]
        assert (row.mode == "sparse") == (row.density < limit), row
    measured = gx.sparsify(model, masks, policy="measure", example_input=torch.randn(8, 3, 8, 8),
                           dtype=torch.bfloat16)
    assert all("measured fwd+bwd, bfloat16 autocast" in r.decision for r in sparsity_report(measured))
    assert all(r.dtype is None for r in sparsity_report(measured))  # not run yet
    with pytest.raises(ValueError, match="dtype must be None .* or torch.bfloat16"):
        gx.sparsify(model, masks, dtype=torch.float16)


@pytest.mark.parametrize("layer", [nn.Linear(10, 4), nn.Conv2d(3, 5, 3, padding=1)], ids=["linear", "conv"])
def test_a_model_that_is_the_layer_is_sparsified(layer):
    """A bare layer's mask key is "weight": sparsify returns the sparse layer itself (it used to return the
    unpruned layer), densify returns the dense one, and in-place conversion says why it cannot."""
    torch.manual_seed(0)
    masks = gx.prune(layer, "magnitude", 0.5)
    assert list(masks) == ["weight"]
    sparse = gx.sparsify(layer, masks, policy="sparse")
    assert isinstance(sparse, (SparseConv2d, SparseLinear)) and sparse.nnz == int(masks["weight"].sum())
    x = torch.randn(6, 10) if isinstance(layer, nn.Linear) else torch.randn(6, 3, 7, 7)
    with torch.no_grad():
        expected = (F.linear(x, layer.weight * masks["weight"], layer.bias) if isinstance(layer, nn.Linear)
                    else F.conv2d(x, layer.weight * masks["weight"], layer.bias, padding=1))
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
    dense = gx.densify(sparse)
    assert type(dense) is type(layer)
    torch.testing.assert_close(dense.weight, layer.weight * masks["weight"])
    with pytest.raises(ValueError, match=r"sparsify\(inplace=True\) cannot convert a model that is itself"):
        gx.sparsify(layer, masks, inplace=True)
    with pytest.raises(ValueError, match=r"densify\(inplace=True\) cannot convert a model that is itself"):
        gx.densify(sparse, inplace=True)


def test_tied_weights_are_not_untied_silently():
    from tests.conftest import TiedLinears

    torch.manual_seed(0)
    model = TiedLinears()
    masks = gx.prune(model, "magnitude", 0.5)
    with pytest.raises(ValueError, match="a.weight is shared with b .*tied weights"):
        gx.sparsify(model, masks)
    only_c = gx.sparsify(model, masks, filter_fn=lambda m, n: n == "c")
    assert isinstance(only_c.c, SparseLinear) and only_c.b.weight is only_c.a.weight
