"""What each spawned process of the distributed tests runs (module level, so that spawn can import it).

Every worker also runs in a single process (``rank=None``: no process group), which is the reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graspext as gx
from graspext.distributed import CommunicationMeter, Distributed, RankMismatchError, TopKCompression
from tests.helpers import die_in_epoch

EPOCHS, BATCH = 2, 16


class PlainNet(nn.Module):
    """No BatchNorm: per-rank batch statistics would make DDP differ from one process on the global batch."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def plain_net() -> PlainNet:
    torch.manual_seed(0)
    return PlainNet().double()


def dataset(n=64, seed=0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64),
                         torch.randint(0, 5, (n,), generator=gen))


def masks_for(model, seed=0, distributed=None) -> gx.Masks:
    return gx.prune(model, "random", 0.8, seed=seed, distributed=distributed)


def train_run(rank, out_path, *, kernels="sparse", dst=None, out_dir=None, die_epoch=None, mask_seed=0,
              callback=None, lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=EPOCHS, sparse=True):
    """Trains PlainNet on 64 examples, global batch 16; rank 0 (or the single process) saves what it ended with."""
    model = plain_net()
    # mask_seed > 0: masks that differ between the ranks (each rank prunes alone; prune itself would refuse them)
    masks = (masks_for(model, seed=mask_seed + (rank or 0), distributed=False) if mask_seed
             else masks_for(model) if sparse else None)
    data = dataset()
    train_loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator())
    test_loader = DataLoader(data, batch_size=20)
    config = gx.TrainConfig(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, progress=False,
                            kernels=kernels, out_dir=out_dir)
    try:
        trainer = gx.Trainer(model, train_loader, test_loader, config, masks, dst=dst,
                             callbacks=[callback] if callback is not None else ())
    except RankMismatchError as exc:
        torch.save({"error": str(exc)}, f"{out_path}.{rank}")
        return
    if die_epoch is not None:
        die_in_epoch(trainer, die_epoch)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return
    # The parameters must be bitwise identical on every rank after training.
    Distributed().check_identical(dict(model.state_dict()), "parameters after training")
    if rank in (None, 0):
        torch.save({"state": model.state_dict(), "history": result.history,
                    "masks": dict(result.masks) if result.masks is not None else None,
                    "summary": result.summary}, out_path)


def topk_run(rank, out_path, ratio, sign, epochs=1, **kwargs):
    train_run(rank, out_path, kernels="dense", callback=TopKCompression(ratio, sign=sign), lr=0.1, momentum=0.0,
              weight_decay=0.0, epochs=epochs, sparse=False, **kwargs)


def meter_run(rank, out_path):
    train_run(rank, out_path, kernels="sparse", callback=CommunicationMeter(), epochs=1)


def score_run(rank, out_path, method, options, shard_data_differs=False):
    """Masks and scores of ``method`` on the conftest's SmallVGG in float64, from every rank."""
    from tests.conftest import SmallVGG, class_sorted_batch

    torch.manual_seed(0)
    model = SmallVGG().double()
    x, y = class_sorted_batch(per_class=4, dtype=torch.float64, seed=1 + (rank or 0) * shard_data_differs)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=False)
    data = (x, y) if method == "snip" else loader
    masks = gx.prune(model, method, 0.9, data, **options)
    scores = gx.scores(model, method, data, **options)
    torch.save({"masks": dict(masks), "scores": scores}, f"{out_path}.{rank}")


def collective_error_run(rank, out_path):
    """prune(distributed=True) outside a group, check_identical on differing tensors: the errors they raise."""
    errors = {}
    try:
        Distributed().check_identical({"t": torch.full((3,), float(rank))}, "a test tensor")
    except RankMismatchError as exc:
        errors["mismatch"] = str(exc)
    dist.barrier()
    torch.save(errors, f"{out_path}.{rank}")
