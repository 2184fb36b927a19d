import pytest
import torch

import graspext as gx
from graspext.models import REGISTRY, create

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
