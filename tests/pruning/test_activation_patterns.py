import pytest
import torch
from torch import nn

from graspext.pruning.activation_patterns import ActivationPatterns


def _net(inplace):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
                         nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(inplace=inplace), nn.Flatten()).double()


@pytest.mark.parametrize("inplace", [False, True])
def test_replay_at_same_point_is_identity(inplace):
    net = _net(inplace)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    with ActivationPatterns() as rec:
        out = net(x)
    assert len(rec.patterns) == 3  # relu, max-pool, relu
    with rec.replaying():
        again = net(x)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
def test_replay_is_the_frozen_linearization(inplace):
    # With the pattern frozen, the network is linear in its input here: f(x + d) - f(x) = J d exactly,
    # and the gradient through the replay uses the recorded masks and argmax.
    net = _net(inplace)
    for m in net:
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.bias)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    d = torch.randn_like(x)
    with ActivationPatterns() as rec:
        base = net(x)
    with rec.replaying():
        moved = net(x + 10 * d)  # far enough that an unfrozen net changes pattern
    with rec.replaying():
        shifted = net(d)
    torch.testing.assert_close(moved, base + 10 * shifted)
    assert not torch.allclose(net(x + 10 * d), moved)  # the real net did cross kinks
    xr = (x + 10 * d).requires_grad_()
    with rec.replaying():
        (grad,) = torch.autograd.grad(net(xr).sum(), xr)
    xd = d.clone().requires_grad_()
    with rec.replaying():
        (grad_d,) = torch.autograd.grad(net(xd).sum(), xd)
    torch.testing.assert_close(grad, grad_d)  # a frozen-pattern net has the same gradient everywhere


def test_replay_longer_than_record_raises():
    net = _net(False)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    rec = ActivationPatterns()
    with rec:
        net[:2](x)
    with pytest.raises(RuntimeError, match="more ReLU/max-pool calls than the recorded one"):
        with rec.replaying():
            net(x)
