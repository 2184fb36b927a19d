"""Workloads of the GPU benchmarks at ImageNet shapes, where compute dominates (not launches, as at CIFAR's).

- ResNet-50 at 224x224, batch 256, and VGG16 (torchvision's, with BatchNorm) at 224x224, batch 64; 1000 classes.
- GraSP masks at 90 / 95 / 98 %, scored once per model on a synthetic class-balanced batch (``samples_per_class``
  Gaussian images of each class) with ``gx.pruning.scores`` and selected with ``gx.pruning.masks_from_scores``,
  which makes exactly the masks ``gx.prune`` makes from that batch (tests/benchmarks check it): global masks for
  the train steps (GraSP's uneven layer densities), per-layer ones (every layer exactly at the sparsity) for the
  layer benchmarks. Scoring runs on the GPU in ``scoring_chunks`` chunks (the gradient sums are exact; with
  train-mode BatchNorm the batch statistics are the chunk's, as in GraSP's official split into halves).
- The masks are cached under ``GRASPEXT_BENCH_CACHE`` (default: the system's temp folder), so the stages of one
  GPU session score each model once.

A :class:`Workload` at a small ``image`` and ``classes`` is the same construction at CPU-test scale.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import graspext as gx
from graspext.pruning import masks_from_scores

from sparse_workloads import ConvCase, distinct_convs, graphed_step

SPARSITIES = (0.90, 0.95, 0.98)
SCOPES = ("global", "layerwise")


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str
    batch: int
    image: int = 224
    classes: int = 1000
    samples_per_class: int = 1
    scoring_chunks: int = 8
    # Output channels of the 3x3 convolutions in the two largest stages: ResNet-50's layer3 and layer4; VGG16's
    # fourth and fifth blocks, both 512 wide.
    largest_stage_widths: tuple[int, ...] = ()

    @property
    def masks_key(self) -> str:
        """What the masks depend on (not the batch of the benchmarks)."""
        return (f"{self.model}-{self.image}px-{self.classes}cls-{self.samples_per_class}spc-"
                f"{self.scoring_chunks}chunks")


WORKLOADS = {"resnet50": Workload("resnet50", 256, largest_stage_widths=(256, 512)),
             "vgg16_bn": Workload("vgg16_bn", 64, largest_stage_widths=(512,))}


def cache_dir() -> Path:
    path = Path(os.environ.get("GRASPEXT_BENCH_CACHE") or Path(tempfile.gettempdir()) / "graspext-bench-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def model(w: Workload) -> torch.nn.Module:
    """torchvision's ImageNet model at initialization (seed 0), on the CPU; benchmarks copy it. (Not
    ``gx.models.create``, whose ``vgg16_bn`` is the CIFAR VGG of the GraSP paper.)"""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(w.model, weights=None, num_classes=w.classes)


def scoring_batch(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples_per_class`` images of every class, in class order (GraSP's class-balanced sample)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(w.classes).repeat_interleave(w.samples_per_class)
    return torch.randn(len(y), 3, w.image, w.image, generator=g), y


def grasp_scores(w: Workload, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """GraSP's scores of the model on :func:`scoring_batch`, computed on ``device`` (CPU tensors returned)."""
    net = model(w)
    if torch.device(device).type != "cpu":
        import copy

        net = copy.deepcopy(net).to(device)
    x, y = scoring_batch(w)
    scores = gx.scores(net, "grasp", (x.to(device), y.to(device)), num_chunks=w.scoring_chunks, seed=0,
                       distributed=False)
    return {name: s.cpu() for name, s in scores.items()}


def grasp_masks(w: Workload, sparsity: float, scope: str = "global", device: str | torch.device = "cpu") -> gx.Masks:
    """The GraSP masks at ``sparsity``; every sparsity and scope of the workload is made (and cached) at once."""
    if sparsity not in SPARSITIES or scope not in SCOPES:
        raise ValueError(f"sparsity must be one of {SPARSITIES} and scope one of {SCOPES}, got {sparsity}, {scope!r}")
    path = cache_dir() / f"{w.masks_key}-grasp-{scope}-{sparsity:g}.pt"
    if not path.exists():
        scores = grasp_scores(w, device)
        for s in SPARSITIES:
            for sc in SCOPES:
                masks = masks_from_scores(scores, "grasp", s, scope=sc, on_collapse="ignore")
                tmp = path.with_name(f"{w.masks_key}-grasp-{sc}-{s:g}.pt.tmp")
                masks.save(tmp)
                tmp.replace(tmp.with_suffix(""))  # whole files only: a killed run leaves none half-written
    return gx.Masks.load(path)


@functools.cache
def conv_layers(w: Workload) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Distinct Conv2d configurations of the model at batch ``w.batch``: key -> (first layer of it, input shape)."""
    return distinct_convs(model(w), w.image, w.batch)


def parse_key(key: str) -> tuple[int, int, int, int, int]:
    """``"256->256 k3 s1 14x14"`` -> (in channels, out channels, kernel, stride, input height)."""
    channels, kernel, stride, size = key.split()
    cin, cout = channels.split("->")
    return int(cin), int(cout), int(kernel[1:]), int(stride[1:]), int(size.split("x")[0])


def largest_stage_3x3(w: Workload) -> list[str]:
    """Keys of the 3x3 convolutions of the two largest stages (the targets of issue 19's per-layer speedup)."""
    return [k for k in conv_layers(w) if parse_key(k)[2] == 3 and parse_key(k)[1] in w.largest_stage_widths]


def conv_case(w: Workload, key: str, sparsity: float, device: str | torch.device) -> ConvCase:
    """A layer at its exact per-layer sparsity (layerwise masks) on ``device``."""
    layer_name, input_shape = conv_layers(w)[key]
    conv = model(w).get_submodule(layer_name)
    mask = grasp_masks(w, sparsity, "layerwise", device)[layer_name + ".weight"]
    return ConvCase.from_layer(conv, mask, input_shape, device)


class ImageNetStep:
    """One training step (forward, backward, SGD with momentum and weight decay) at the workload's shapes.

    ``sparsity=None`` is dense. ``amp``: the forward under ``torch.autocast(device, bfloat16)`` with float32
    master weights; ``channels_last``: weights and input stored channels-last (cuDNN's fastest bf16 layout).
    A sparse model is ``gx.sparsify(..., policy=policy)`` of the global GraSP masks; ``policy="measure"`` times
    each layer's modes (sparse kernels, cuDNN, cuDNN on the live channels) on its input and keeps the fastest.
    """

    def __init__(self, w: Workload, sparsity: float | None, device: str = "cpu", *, policy: str = "measure",
                 amp: bool = False, channels_last: bool = False):
        import copy

        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(w.batch, 3, w.image, w.image, generator=g).to(device)
        self.y = torch.randint(0, w.classes, (w.batch,), generator=g).to(device)
        self.device, self.amp = torch.device(device), amp
        net = copy.deepcopy(model(w)).train().to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        if sparsity is not None:
            net = gx.sparsify(net, grasp_masks(w, sparsity, "global", device), policy=policy,
                              example_input=self.x if policy == "measure" else None,
                              dtype=torch.bfloat16 if amp else None)
        self.model = net
        self.opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def _loss(self) -> torch.Tensor:
        # No cast cache: it would free graph-owned casts when a captured step leaves autocast (PyTorch's advice for
        # autocast under CUDA graphs); each weight is used once per step, so eager steps lose nothing.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            logits = self.model(self.x)
        return F.cross_entropy(logits.float(), self.y)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._loss().backward()
        self.opt.step()

    def graphed_step(self):
        """The step captured once as a CUDA graph; returns the replay (raises where capture fails)."""
        return graphed_step(self.step, lambda: self._loss().backward(), self.opt)


def main() -> None:
    """Scores every workload once on ``--device`` and caches its masks (run_gpu.sh's imagenet-masks stage)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    for name in args.models:
        w = WORKLOADS[name]
        start = time.perf_counter()
        masks = grasp_masks(w, SPARSITIES[-1], "global", args.device)
        seconds = time.perf_counter() - start
        print(f"{w.masks_key}: GraSP masks ({len(SPARSITIES)} sparsities x {len(SCOPES)} scopes) in {seconds:.1f} s "
              f"(cached under {cache_dir()}); at {SPARSITIES[-1]:.0%} global:")
        for layer, density in masks.layer_densities().items():
            print(f"  {layer}: density {density:.4f}")
        if masks.collapsed_layers():
            print(f"  collapsed layers: {masks.collapsed_layers()}")


if __name__ == "__main__":
    main()
