"""Batch-innermost activations through BatchNorm, pooling and dense convolutions, so a sparse network converts
layouts once.

The sparse kernels return NCHW-shaped tensors with ``[H, W, C, N]`` storage. Elementwise ops keep that layout
by themselves; these subclasses of the torch modules keep it through normalization and pooling too (the
stock CPU kernels would copy to NCHW, and the next sparse layer would copy back), and keep an in-place ReLU
from costing a full copy in the backward pass. They reach torch's fast kernels by viewing the storage as a
tensor those kernels know: ``[H*W, C, N, 1]`` NCHW-contiguous for BatchNorm, ``[1, C*N, H, W]``
channels-last for pooling. Each one computes exactly what its base class computes, with the same
parameters and state_dict, for any input layout.

In training, BatchNorm2d runs graspext's fused op instead, together with the ReLU after it (and a ResNet
block's residual add) where the model lets it: :func:`fuse_batch_norm_relu` for ``nn.Sequential`` models,
:func:`norm_add_relu` for model code that applies the ReLU itself. On CUDA the fused op is opt-in
(``GRASPEXT_CUDA_FUSED_BN=1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graspext.ops.batch_norm import batch_norm_relu

_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # bfloat16: float32 statistics and parameters


def _fused_batch_norm_on(device: torch.device) -> bool:
    """Whether the fused op normalizes in training on this device: always on the CPU; on CUDA only with
    GRASPEXT_CUDA_FUSED_BN=1 until it is measured against torch's kernels there (benchmarks/RESULTS.md)."""
    if device.type == "cpu":
        return True
    from graspext._extension import has_cuda_kernel

    return (device.type == "cuda" and os.environ.get("GRASPEXT_CUDA_FUSED_BN") == "1"
            and has_cuda_kernel("batch_norm_relu"))


def is_batch_innermost(x: Tensor) -> bool:
    """Whether a 4-D tensor is stored as ``[H, W, C, N]`` (the layout of the sparse kernels' outputs)."""
    return x.dim() == 4 and x.shape[0] > 1 and x.permute(2, 3, 1, 0).is_contiguous()


def _nchw_to_hwcn(x: Tensor) -> Tensor:
    if x.device.type == "cpu":
        return torch.ops.graspext.to_batch_innermost(x)  # one tiled transpose pass
    # Two transposes torch copies fast -- [N, C*H*W] -> [C*H*W, N], then [C, H*W] -> [H*W, C] blocks of N
    # values -- instead of one 4-D permutation, which torch's copy runs several times slower.
    n, c, h, w = x.shape
    rows = x.reshape(n, c * h * w).t().contiguous()
    return rows.view(c, h * w, n).transpose(0, 1).contiguous().view(h, w, c, n).permute(3, 2, 0, 1)


def _hwcn_to_nchw(x: Tensor) -> Tensor:
    if not is_batch_innermost(x):
        return x.contiguous()
    if x.device.type == "cpu":
        return torch.ops.graspext.from_batch_innermost(x)
    n, c, h, w = x.shape
    blocks = x.permute(2, 3, 1, 0).reshape(h * w, c, n).transpose(0, 1).contiguous()
    return blocks.view(c * h * w, n).t().contiguous().view(n, c, h, w)


class _ToBatchInnermost(torch.autograd.Function):
    """The layout conversion with the fast copies both ways (the gradient goes back to NCHW)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _nchw_to_hwcn(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _hwcn_to_nchw(grad)


class _ToNCHW(torch.autograd.Function):
    """The inverse conversion, with the gradient going back batch-innermost (as the sparse layer before wants)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _hwcn_to_nchw(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _nchw_to_hwcn(grad.contiguous())


def to_nchw(x: Tensor) -> Tensor:
    """``x`` NCHW-contiguous if it is batch-innermost (one tiled transpose), else ``x`` itself. Dense torch
    convolutions call this first: oneDNN on a batch-innermost input reorders it through a slow generic path
    (a 64->64 3x3 layer at batch 128, forward+backward: 345 ms against 196 ms on NCHW)."""
    return _ToNCHW.apply(x) if is_batch_innermost(x) else x


def to_batch_innermost(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) with ``[H, W, C, N]`` storage: a copy unless it already is (its gradient, if any,
    comes back NCHW-contiguous, as a dense layer before it wants)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    return x if x.permute(2, 3, 1, 0).is_contiguous() else _ToBatchInnermost.apply(x)


def _as_pooling_image(x: Tensor) -> Tensor:
    # [H, W, C, N] storage is a channels-last [1, C*N, H, W] image, which the pooling kernels run natively.
    # Viewed from the contiguous [1, H, W, C*N] (not reshaped) so that the batch dimension gets the stride
    # torch's memory-format detection expects.
    n, c, h, w = x.shape
    return x.permute(2, 3, 1, 0).view(1, h, w, c * n).permute(0, 3, 1, 2)


def _from_pooling_image(y: Tensor, n: int, c: int) -> Tensor:
    return y.permute(0, 2, 3, 1).reshape(y.shape[2], y.shape[3], c, n).permute(3, 2, 0, 1)


def _as_rows(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """A contiguous ``[P, C, L]`` view of a 4-D activation for the fused BatchNorm op, and the inverse view.

    Batch-innermost storage is ``[H*W, C, N]``; NCHW-contiguous is ``[N, C, H*W]``, used only where H*W is
    long enough for the op's inner loop to beat torch's kernels.
    """
    n, c, h, w = x.shape
    if is_batch_innermost(x):
        return x.permute(2, 3, 1, 0).reshape(h * w, c, n), lambda y: y.view(h, w, c, n).permute(3, 2, 0, 1)
    if x.is_contiguous() and h * w >= 16:
        return x.view(n, c, h * w), lambda y: y.view(n, c, h, w)
    return None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that keeps batch-innermost input in its layout, fused with a following ReLU.

    In training mode on CPU it runs the fused op :func:`graspext.ops.batch_norm_relu`, which makes half the
    passes over memory that torch's BatchNorm and ReLU kernels make. Otherwise (evaluation with running
    statistics, other devices) it runs torch's kernel, on batch-innermost input through the equivalent
    contiguous ``[H*W, C, N, 1]`` tensor. With ``fuse_relu`` (set by :func:`fuse_batch_norm_relu`, which
    makes the following ReLU module an identity) the output is ``relu(batch_norm(x))``.
    """

    fuse_relu = False

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.fuse_relu)

    def normalize(self, x: Tensor, relu: bool, residual: Tensor | None = None) -> Tensor:
        """``relu?(self(x) + residual)`` as one op where it can (see :func:`norm_add_relu`)."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        params = self.weight.dtype if self.weight is not None else x.dtype
        fused = (batch_stats and _fused_batch_norm_on(x.device) and x.dtype in _FUSED_DTYPES
                 and (params == x.dtype or (x.dtype == torch.bfloat16 and params == torch.float32)))
        rows = _as_rows(x) if fused else None
        res_rows = None
        if rows is not None and residual is not None:
            res_rows = _as_rows(residual) if residual.shape == x.shape and residual.dtype == x.dtype else None
            if res_rows is None or res_rows[0].shape != rows[0].shape:  # another layout: add it separately
                rows = None
        if rows is None:
            y = self._torch_batch_norm(x, factor, batch_stats)
            if residual is not None:
                y = y + residual
            return F.relu(y) if relu else y
        view, restore = rows
        y, mean, var = batch_norm_relu(view, self.weight, self.bias, self.eps, relu,
                                       None if res_rows is None else res_rows[0])
        if self.training and self.track_running_stats:
            count = view.shape[0] * view.shape[2]
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var, alpha=factor * count / max(count - 1, 1))
        return restore(y)

    def _torch_batch_norm(self, x: Tensor, factor: float, batch_stats: bool) -> Tensor:
        track = not self.training or self.track_running_stats
        rows, restore = x, None
        if is_batch_innermost(x):
            n, c, h, w = x.shape
            rows = x.permute(2, 3, 1, 0).reshape(h * w, c, n, 1)
            restore = lambda y: y.view(h, w, c, n).permute(3, 2, 0, 1)  # noqa: E731
        y = F.batch_norm(rows, self.running_mean if track else None, self.running_var if track else None,
                         self.weight, self.bias, batch_stats, factor, self.eps)
        return restore(y) if restore else y


def norm_add_relu(bn: nn.Module, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """``relu(bn(x) + residual)`` (``relu(bn(x))`` without a residual): one fused op when ``bn`` is the layout
    :class:`BatchNorm2d` that :func:`graspext.sparsify` puts in, torch's modules otherwise.

    Model code calls this where a ReLU that is not a module of its own follows a BatchNorm, as in a ResNet
    block; :func:`fuse_batch_norm_relu` covers the ``nn.Sequential`` case.
    """
    if isinstance(bn, BatchNorm2d) and not bn.fuse_relu:
        return bn.normalize(x, True, residual)
    y = bn(x)
    # In place, as the nn.ReLU(inplace=True) this replaces: y is a fresh tensor that autograd does not save.
    return F.relu(y if residual is None else y + residual, inplace=y._base is None)


class FusedReLU(nn.Identity):
    """Stands where a ReLU was fused into the BatchNorm2d before it; :func:`from_layout_module` restores it."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "fused into the BatchNorm2d before it"


def fuse_batch_norm_relu(model: nn.Module) -> None:
    """Fuses each layout BatchNorm2d that an ``nn.Sequential`` runs straight into a ReLU, in place.

    Only a ReLU used once in the whole model is fused: one that is also called elsewhere must stay one.
    """
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, relu = seq._modules[first], seq._modules[second]
            if type(bn) is BatchNorm2d and isinstance(relu, nn.ReLU) and uses[id(relu)] == 1:
                bn.fuse_relu = True
                seq._modules[second] = FusedReLU(relu.inplace)


class MaxPool2d(nn.MaxPool2d):
    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x) or self.return_indices:
            return super().forward(x)
        return _from_pooling_image(super().forward(_as_pooling_image(x)), x.shape[0], x.shape[1])


class AvgPool2d(nn.AvgPool2d):
    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x):
            return super().forward(x)
        return _from_pooling_image(super().forward(_as_pooling_image(x)), x.shape[0], x.shape[1])


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x):
            return super().forward(x)
        y = F.adaptive_avg_pool2d(_as_pooling_image(x), self.output_size)
        return _from_pooling_image(y, x.shape[0], x.shape[1])


class ReLU(nn.ReLU):
    """``nn.ReLU`` that does not work in place on a view (such as BatchNorm2d's batch-innermost output here).

    Autograd records an in-place op on a view as a copy of the whole base tensor (``CopySlices``), which in
    the backward pass costs more than the ReLU itself; out of place, the result keeps the input's layout.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x, inplace=self.inplace and x._base is None)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (a layer left dense, such as a ResNet's first convolution) that hands its output to the sparse
    layer after it in batch-innermost storage (``emit_batch_innermost``, set by ``sparsify``), so the block that
    follows -- the sparse convolution, its BatchNorm and the residual add -- runs in one layout. Otherwise the
    residual sum mixes layouts, which costs a strided add and a layout copy in each direction."""

    emit_batch_innermost = False

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(to_nchw(x) if x.dim() == 4 else x)
        return to_batch_innermost(y) if self.emit_batch_innermost and y.dim() == 4 and y.shape[0] > 1 else y


# torch module type -> its layout-keeping subclass; conversion copies the instance's attributes over.
LAYOUT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: Conv2d,
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
    """The inverse of :func:`to_layout_module` (a fused ReLU becomes ``nn.ReLU`` again)."""
    if type(module) is FusedReLU:
        return nn.ReLU(module.inplace)
    for base, cls in LAYOUT_MODULES.items():
        if type(module) is cls:
            plain = base.__new__(base)
            plain.__dict__ = module.__dict__.copy()
            for attribute in ("fuse_relu", "emit_batch_innermost"):
                plain.__dict__.pop(attribute, None)
            return plain
    return module
