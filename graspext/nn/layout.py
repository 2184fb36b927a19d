"""Batch-innermost activations through BatchNorm and pooling, so a sparse network converts layouts once.

The sparse kernels return NCHW-shaped tensors with ``[C, H, W, N]`` storage. Elementwise ops keep that layout
by themselves; these subclasses of the torch modules keep it through normalization and pooling too (the
stock CPU kernels would copy to NCHW, and the next sparse layer would copy back), and keep an in-place ReLU
from costing a full copy in the backward pass. Each one computes exactly
what its base class computes, with the same parameters and state_dict, for any input layout.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def is_batch_innermost(x: Tensor) -> bool:
    """Whether a 4-D tensor is stored as ``[C, H, W, N]`` (the layout of the sparse kernels' outputs)."""
    return x.dim() == 4 and x.shape[0] > 1 and x.permute(1, 2, 3, 0).is_contiguous()


def _as_cnhw(x: Tensor) -> Tensor:
    # [N, C, H, W] batch-innermost is [C, N, H, W] channels-last, which the pooling kernels run natively.
    return x.permute(1, 0, 2, 3)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalizes batch-innermost input in place of layout.

    Per channel, the statistics over (N, H, W) are those over one contiguous row of ``[C, H*W*N]``: the
    input is normalized as a ``[1, C, H*W*N, 1]`` tensor, which is the same computation.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x):
            return super().forward(x)
        n, c, h, w = x.shape
        rows = x.permute(1, 2, 3, 0).reshape(1, c, h * w * n, 1)
        return super().forward(rows).view(c, h, w, n).permute(3, 0, 1, 2)


class MaxPool2d(nn.MaxPool2d):
    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x) or self.return_indices:
            return super().forward(x)
        return _as_cnhw(super().forward(_as_cnhw(x)))


class AvgPool2d(nn.AvgPool2d):
    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x):
            return super().forward(x)
        return _as_cnhw(super().forward(_as_cnhw(x)))


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x):
            return super().forward(x)
        return _as_cnhw(F.adaptive_avg_pool2d(_as_cnhw(x), self.output_size))


class ReLU(nn.ReLU):
    """``nn.ReLU`` that does not work in place on a view (such as BatchNorm2d's batch-innermost output here).

    Autograd records an in-place op on a view as a copy of the whole base tensor (``CopySlices``), which in
    the backward pass costs more than the ReLU itself; out of place, the result keeps the input's layout.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x, inplace=self.inplace and x._base is None)


# torch module type -> its layout-keeping subclass; conversion copies the instance's attributes over.
LAYOUT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm2d: BatchNorm2d,
    nn.MaxPool2d: MaxPool2d,
    nn.AvgPool2d: AvgPool2d,
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2d,
    nn.ReLU: ReLU,
}


def to_layout_module(module: nn.Module) -> nn.Module:
    """The same module as its layout-keeping subclass (sharing parameters and buffers), or itself."""
    cls = LAYOUT_MODULES.get(type(module))
    if cls is None:
        return module
    converted = cls.__new__(cls)
    converted.__dict__ = module.__dict__.copy()
    return converted


def from_layout_module(module: nn.Module) -> nn.Module:
    """The inverse of :func:`to_layout_module`."""
    for base, cls in LAYOUT_MODULES.items():
        if type(module) is cls:
            plain = base.__new__(base)
            plain.__dict__ = module.__dict__.copy()
            return plain
    return module
