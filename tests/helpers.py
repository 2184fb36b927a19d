"""Shared by the training tests (dynamic sparse training, lottery tickets): a small CNN and its data."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def tiny_data(dtype=torch.float64, n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=gen, dtype=dtype), torch.randint(0, 5, (n,), generator=gen))


def tiny_net(dtype=torch.float64):
    torch.manual_seed(0)
    return TinyNet().to(dtype)


def ordered_loader(data, batch_size=8):
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def die_in_epoch(trainer, epoch: int) -> None:
    """Makes ``trainer.fit()`` raise KeyboardInterrupt when it starts epoch ``epoch`` (0-based): a kill after the
    checkpoints of the epochs before."""
    original = trainer._run_epoch

    def run_epoch(e, *args, **kwargs):
        if e == epoch:
            raise KeyboardInterrupt("killed")
        return original(e, *args, **kwargs)

    trainer._run_epoch = run_epoch
