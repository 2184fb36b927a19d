"""Workloads of the data-parallel benchmarks: one DDP training step per rank, and the bytes it communicates.

A step is what :class:`graspext.Trainer` runs under DDP: forward and backward of the rank's share of the global
batch through DistributedDataParallel (no per-step buffer broadcast), then SGD with momentum. Cases:

- ``dense``: the dense model in float32;
- ``dense_bf16_channels_last``: the dense model under bfloat16 autocast in channels_last (what a user picks
  for speed on a CPU with AMX, or tensor cores on a GPU);
- ``sparse``: ``graspext.sparsify`` with GraSP masks (only kept values are parameters, so DDP's buckets carry
  the kept values alone);
- ``sparse_topk``: the same, with graspext's top-k communication hook (1 % per parameter, error feedback).

Every case counts the bytes its hook hands the collective per step (the plain cases through
:class:`graspext.distributed.CommunicationMeter`, which calls DDP's own all-reduce).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sparse_workloads import grasp_masks, model

import graspext as gx
from graspext.distributed import CommunicationMeter, Distributed, TopKCompression

CASES = ("dense", "dense_bf16_channels_last", "sparse", "sparse_topk")
TOPK_RATIO = 0.01


class DDPStepCase:
    def __init__(self, case: str, model_name: str = "vgg19_bn", sparsity: float = 0.98, global_batch: int = 128,
                 device: str = "cpu", image_size: int = 32):
        if case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {case!r}")
        d = Distributed()
        if not d.active:
            raise RuntimeError("DDPStepCase needs a torch.distributed process group of more than one process")
        self.device = torch.device(device)
        self.bf16 = case == "dense_bf16_channels_last"
        net = copy.deepcopy(model(model_name)).train()
        if case.startswith("sparse"):
            net = gx.sparsify(net, grasp_masks(model_name, sparsity))
        net = net.to(self.device)
        if self.bf16:
            net = net.to(memory_format=torch.channels_last)
        self.ddp = d.wrap(net, self.device)
        self.hook = TopKCompression(TOPK_RATIO) if case == "sparse_topk" else CommunicationMeter()
        self.hook.register(self.ddp, d.group)
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(100 + d.rank)  # each rank its own share of the batch
        local = global_batch // d.world_size
        x = torch.randn(local, 3, image_size, image_size, generator=g)
        self.x = x.to(self.device, memory_format=torch.channels_last if self.bf16 else torch.contiguous_format)
        self.y = torch.randint(0, 10, (local,), generator=g).to(self.device)
        self.steps = 0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.ddp(self.x)
        F.cross_entropy(logits.float(), self.y).backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps += 1

    @property
    def bytes_per_step(self) -> float:
        return self.hook.bytes_total / max(1, self.steps)
