"""The teacher ensemble against one plain PyTorch discriminator per teacher, and the grouped batch norm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graspext.datalens.models import Generator, TeacherEnsemble, group_batch_norm, one_hot


class PlainDiscriminator(nn.Module):
    """One official conditional DCGAN discriminator written with torch.nn layers (float64), to test against."""

    def __init__(self, ensemble: TeacherEnsemble, t: int):
        super().__init__()
        self.classes = ensemble.classes
        self.conv0 = nn.Conv2d(ensemble.c0, ensemble.c0, 5, stride=2)
        self.conv1 = nn.Conv2d(ensemble.c0 + ensemble.classes, ensemble.c1, 5, stride=2)
        self.bn1 = nn.BatchNorm2d(ensemble.c1)
        self.fc2 = nn.Linear(ensemble.fc2_w.shape[1], ensemble.fc2_w.shape[2])
        self.bn2 = nn.BatchNorm1d(ensemble.fc2_w.shape[2])
        self.fc3 = nn.Linear(ensemble.fc3_w.shape[1], 1)
        self.double().train()
        with torch.no_grad():
            self.conv0.weight.copy_(ensemble.conv0_w[t])
            self.conv0.bias.copy_(ensemble.conv0_b[t, 0])
            self.conv1.weight.copy_(ensemble.conv1_w[t])
            self.conv1.bias.copy_(ensemble.conv1_b[t, 0])
            self.bn1.weight.copy_(ensemble.bn1[0, t])
            self.bn1.bias.copy_(ensemble.bn1[1, t])
            self.fc2.weight.copy_(ensemble.fc2_w[t].T)
            self.fc2.bias.copy_(ensemble.fc2_b[t, 0])
            self.bn2.weight.copy_(ensemble.bn2[0, t])
            self.bn2.bias.copy_(ensemble.bn2[1, t])
            self.fc3.weight.copy_(ensemble.fc3_w[t].T)
            self.fc3.bias.copy_(ensemble.fc3_b[t, 0])

    def forward(self, x, y):
        def with_labels(h):
            return torch.cat([h, y[:, :, None, None].expand(-1, -1, *h.shape[-2:])], 1)

        same = (1, 2, 1, 2)  # TensorFlow's SAME padding, 5x5 stride 2
        h = F.leaky_relu(self.conv0(F.pad(with_labels(x), same)), 0.2)
        h = F.leaky_relu(self.bn1(self.conv1(F.pad(with_labels(h), same))), 0.2)
        h = F.leaky_relu(self.bn2(self.fc2(torch.cat([h.flatten(1), y], 1))), 0.2)
        return self.fc3(torch.cat([h, y], 1)).squeeze(1)


@pytest.mark.parametrize("teachers, batch, size", [(1, 3, 8), (5, 4, 8), (3, 2, 12)])
def test_each_teacher_equals_its_own_plain_discriminator(teachers, batch, size):
    torch.manual_seed(teachers * 100 + size)
    ensemble = TeacherEnsemble(teachers, height=size, width=size, df=6, dfc=16).double()
    with torch.no_grad():  # non-trivial batch-norm affine parameters and biases
        for p in ensemble.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.rand(teachers, batch, 1, size, size, dtype=torch.float64, requires_grad=True)
    y = one_hot(torch.randint(10, (teachers, batch)), 10).double()
    logits = ensemble(x, y)
    (grad,) = torch.autograd.grad(logits.square().sum(), x)
    for t in range(teachers):
        plain = PlainDiscriminator(ensemble, t)
        xt = x[t].detach().clone().requires_grad_(True)
        ref = plain(xt, y[t])
        torch.testing.assert_close(logits[t], ref, rtol=1e-10, atol=1e-12)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), xt)
        torch.testing.assert_close(grad[t], ref_grad, rtol=1e-9, atol=1e-12)


def test_one_batch_shown_to_every_teacher():
    ensemble = TeacherEnsemble(4, height=8, width=8, df=4, dfc=8)
    x, y = torch.rand(3, 1, 8, 8), one_hot(torch.randint(10, (3,)), 10)
    torch.testing.assert_close(ensemble(x, y), ensemble(x.expand(4, -1, -1, -1, -1), y.expand(4, -1, -1)))
    with pytest.raises(ValueError, match=r"x must be \[4, B, 1, 8, 8\]"):
        ensemble(torch.rand(3, 3, 1, 8, 8), y)
    with pytest.raises(ValueError, match="teachers must be an int >= 1"):
        TeacherEnsemble(0)
    with pytest.raises(ValueError, match="multiple of 4"):
        TeacherEnsemble(2, height=10, width=10)


def test_group_batch_norm_takes_statistics_per_group():
    torch.manual_seed(0)
    x = torch.randn(3 * 5, 4, 2, 2, dtype=torch.float64)
    w, b = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    out = group_batch_norm(x, w, b, 3)
    for g in range(3):
        ref = F.batch_norm(x[g * 5:(g + 1) * 5], None, None, w[g], b[g], training=True, eps=1e-5)
        torch.testing.assert_close(out[g * 5:(g + 1) * 5], ref)


def test_generator_groups_are_independent_batches():
    torch.manual_seed(1)
    gen = Generator(z_dim=6, height=8, width=8, gf=4, gfc=16)
    z, y = torch.rand(2 * 3, 6), one_hot(torch.randint(10, (6,)), 10)
    both = gen(z, y, groups=2)
    assert both.shape == (6, 1, 8, 8) and bool(((both > 0) & (both < 1)).all())
    torch.testing.assert_close(both[:3], gen(z[:3], y[:3]))
    torch.testing.assert_close(both[3:], gen(z[3:], y[3:]))
