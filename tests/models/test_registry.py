import copy

import pytest
import torch

import graspext as gx
from graspext.models import REGISTRY, create
from graspext.nn import SparseConv2d, SparseLinear

METHOD_OPTIONS = {"grasp": {"seed": 0}, "snip": {"seed": 0}, "synflow": {"rounds": 2}, "magnitude": {},
                  "random": {"seed": 0}}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_forward_backward_and_every_method(name):
    torch.manual_seed(0)
    model = create(name, num_classes=10)
    x = torch.randn(20, 3, 32, 32)
    y = torch.arange(20) % 10
    out = model(x)
    assert out.shape == (20, 10)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    for method, options in METHOD_OPTIONS.items():
        masks = gx.prune(model, method, 0.9, (x, y), on_collapse="ignore", **options)
        assert masks.num_total() - masks.num_kept() == int(masks.num_total() * 0.9), method


def test_paper_architectures():
    vgg = create("vgg19_bn")
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is None for c in convs)
    assert isinstance(vgg.pool, torch.nn.AvgPool2d) and vgg.classifier.in_features == 512
    wide = create("resnet32_grasp")
    assert [wide.layer1[0].conv1.out_channels, wide.layer2[0].conv1.out_channels,
            wide.layer3[0].conv1.out_channels] == [32, 64, 128]
    assert len(wide.layer1) == 5 and isinstance(wide.layer2[0].shortcut[0], torch.nn.Conv2d)
    assert create("resnet110").layer3[0].conv1.out_channels == 64 and len(create("resnet110").layer1) == 18


def test_torchvision_models_by_name():
    pytest.importorskip("torchvision")
    model = create("resnet18", num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    masks = gx.prune(model, "magnitude", 0.5, keep_first_dense=True)
    assert "conv1.weight" not in masks and "fc.weight" in masks


def test_unknown_model():
    with pytest.raises(ValueError, match="model must be one of"):
        create("vgg42")
    with pytest.raises(ValueError, match=r"depth must be 6n\+2"):
        gx.models.CifarResNet(depth=33)
    with pytest.raises(ValueError, match="model must be one of"):
        create("wrn22_3")


def _wrn_parameter_count(depth, k, num_classes):
    """WRN-d-k's parameters from the paper's architecture: bias-free convs, BN (weight + bias), Linear."""
    n = (depth - 4) // 6
    count, c = 3 * 16 * 9, 16  # stem conv
    for i, w in enumerate([16 * k, 32 * k, 64 * k]):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            count += 2 * c + 9 * c * w + 2 * w + 9 * w * w  # BN, conv3x3, BN, conv3x3
            if stride != 1 or c != w:
                count += c * w  # 1x1 conv shortcut
            c = w
    return count + 2 * c + c * num_classes + num_classes  # final BN, Linear


def test_wide_resnet_architecture():
    model = create("wrn22_2")
    count = sum(p.numel() for p in model.parameters())
    assert count == _wrn_parameter_count(22, 2, 10) == 1_079_642
    assert 1.05e6 < count < 1.15e6  # "about 1.1 M" (RigL)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [32, 64, 128]
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 3
    assert [model.layer1[0].conv1.stride, model.layer2[0].conv1.stride, model.layer3[0].conv1.stride] == \
        [(1, 1), (2, 2), (2, 2)]
    assert all(isinstance(g[0].shortcut, torch.nn.Conv2d) and g[1].shortcut is None
               for g in (model.layer1, model.layer2, model.layer3))
    assert all(c.bias is None for c in model.modules() if isinstance(c, torch.nn.Conv2d))
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert create("wrn22_2", num_classes=100).fc.out_features == 100
    wide = gx.models.WideResNet(28, 10)
    assert sum(p.numel() for p in wide.parameters()) == _wrn_parameter_count(28, 10, 10)  # 36.5 M
    dropout = gx.models.WideResNet(16, 1, dropout=0.3)
    assert isinstance(dropout.layer1[0].dropout, torch.nn.Dropout) and dropout.layer1[0].dropout.p == 0.3


@pytest.mark.parametrize("depth", [20, 23, 4, -2])
def test_wide_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match=rf"depth must be 6n\+4 .*got {depth}"):
        gx.models.WideResNet(depth, 2)


def test_sparsified_wide_resnet_matches_masked_dense():
    torch.manual_seed(0)
    model = create("wrn22_2")
    x = torch.randn(4, 3, 32, 32)
    y = torch.arange(4)
    masks = gx.prune(model, "random", 0.9, (x, y), seed=0)
    dense = copy.deepcopy(model)
    masks.apply_(dense)
    sparse = gx.sparsify(model, masks, policy="sparse")  # the sparse kernels, with batch-innermost outputs
    assert sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in sparse.modules()) == len(masks) == 23
    seen = []
    for m in sparse.modules():
        if isinstance(m, SparseConv2d):
            m.register_forward_hook(lambda _m, _i, out: seen.append(gx.nn.is_batch_innermost(out)))
    # The logits are small at init (Linear N(0, 0.01)), so the pooled features, of order 1, are compared too.
    features = {}
    for tag, net in (("dense", dense), ("sparse", sparse)):
        net.pool.register_forward_hook(lambda _m, _i, out, tag=tag: features.__setitem__(tag, out))

    out, out_sparse = dense(x), sparse(x)
    assert any(seen), "no sparse layer returned batch-innermost output: the strides case went untested"
    torch.testing.assert_close(out_sparse, out, rtol=0, atol=1e-4)
    torch.testing.assert_close(features["sparse"], features["dense"], rtol=0, atol=1e-4)
    torch.nn.functional.cross_entropy(out, y).backward()
    torch.nn.functional.cross_entropy(out_sparse, y).backward()
    for name, module in sparse.named_modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            grad = dense.get_submodule(name).weight.grad[masks[name + ".weight"]]
            # Relative to the layer's largest gradient: a ReLU input within float32 rounding of 0 can switch
            # sides between the two models and move a few early-layer gradients by ~1e-3 of that.
            torch.testing.assert_close(module.values.grad, grad, rtol=0, atol=1e-2 * grad.abs().max().item())
    for name, bn in dense.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            torch.testing.assert_close(sparse.get_submodule(name).running_var, bn.running_var)

    dense.eval(), sparse.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(features["sparse"], features["dense"], rtol=0, atol=1e-4)
