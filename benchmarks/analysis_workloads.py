"""Workloads of the curvature benchmarks: VGG19-CIFAR (20 M parameters) in eval mode on a fixed batch of CIFAR-shaped
random images, dense and with GraSP-style 98 % masks (the products restricted to the kept weights)."""

from __future__ import annotations

import resource

import torch
from sparse_workloads import model

from graspext.analysis import Curvature

BATCH = 64


def vgg19_curvature(engine: str, masked: bool = False, batch: int = BATCH) -> Curvature:
    net = model("vgg19_bn").eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    masks = None
    if masked:
        from sparse_workloads import grasp_masks

        masks = grasp_masks("vgg19_bn", 0.98)
        with torch.no_grad():
            for name, mask in masks.items():
                net.get_parameter(name).mul_(mask)
    return Curvature(net, [(x, y)], masks=masks, engine=engine)


class HVPCase:
    """One Hessian-vector product along a fixed Rademacher direction."""

    def __init__(self, engine: str, masked: bool = False):
        self.curvature = vgg19_curvature(engine, masked)
        self.v = self.curvature.rademacher(torch.Generator().manual_seed(0))
        self.curvature.hvp(self.v)  # the finite difference computes and keeps the gradient at θ once

    def step(self) -> None:
        self.curvature.hvp(self.v)


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
