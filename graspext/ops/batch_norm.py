"""Training-mode BatchNorm with an optional fused residual add and ReLU: a wrapper over
``torch.ops.graspext.batch_norm_relu``.

The op normalizes a contiguous ``[P, C, L]`` tensor per channel over P and L, which is how
:class:`graspext.nn.layout.BatchNorm2d` sees batch-innermost activations (``[H*W, C, N]``) and NCHW ones
(``[N, C, H*W]``). It reads its input twice and writes once, forward and backward alike; separate BatchNorm,
add and ReLU kernels make about twice as many passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graspext import _extension

_extension.load()

_ops = torch.ops.graspext

__all__ = ["batch_norm_relu"]


def batch_norm_relu(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5,
                    relu: bool = False, residual: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``relu?(F.batch_norm(input, None, None, weight, bias, training=True, eps=eps) + residual)`` over
    ``[P, C, L]``; ``residual`` (optional, shaped like ``input``) is a ResNet block's shortcut.

    Returns ``(out, mean, var)``: the per-channel batch mean and biased variance, from which the caller
    updates running statistics. Differentiable in ``input``, ``weight``, ``bias`` and ``residual``.
    """
    if not isinstance(input, Tensor) or input.dim() != 3:
        raise ValueError(f"input must be a 3-D tensor [P, C, L], got {getattr(input, 'shape', input)!r}")
    if input.shape[0] * input.shape[2] < 2:
        raise ValueError(f"input must have more than one value per channel, got shape {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (input.shape[1],):
            raise ValueError(f"{name} must have shape ({input.shape[1]},) (one per channel), got {tuple(t.shape)}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    return _ops.batch_norm_relu(input.contiguous(), weight, bias,
                                None if residual is None else residual.contiguous(), float(eps), bool(relu))


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, eps, relu = inputs
    out, mean, var = output
    # The backward reads `out` for the ReLU mask only. Without the ReLU it is not saved, so the caller may
    # modify it in place (as a ResNet block does with `out += identity`), as after torch's batch_norm.
    ctx.save_for_backward(input, out if relu else None, weight, mean, var)
    ctx.eps, ctx.relu = eps, relu
    # bfloat16 input gives float32 parameter gradients (the kernel's accumulation): cast to each parameter's dtype.
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, var)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    input, out, weight, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias, grad_residual = _ops.batch_norm_relu_backward(
        grad_out, input, input if out is None else out, weight, mean, var, ctx.eps, ctx.relu, needs[3]
    )
    return (
        grad_input if needs[0] else None,
        grad_weight.to(ctx.weight_dtype) if needs[1] else None,
        grad_bias.to(ctx.bias_dtype) if needs[2] else None,
        grad_residual if needs[3] else None,
        None,
        None,
    )


torch.library.register_autograd("graspext::batch_norm_relu", _backward, setup_context=_setup_context)
# Under autocast the op runs on its input as it comes, as torch's own batch_norm: bfloat16 activations (from
# autocast's convolutions or the bfloat16 sparse kernels) with float32 statistics and parameters.


def _stats_dtype(input: Tensor) -> torch.dtype:
    return torch.float32 if input.dtype == torch.bfloat16 else input.dtype


@torch.library.register_fake("graspext::batch_norm_relu")
def _(input, weight, bias, residual, eps, relu):
    torch._check(input.dim() == 3, lambda: "input must be 3-D [P, C, L]")
    channels = input.shape[1]
    stats = _stats_dtype(input)
    return torch.empty_like(input), input.new_empty((channels,), dtype=stats), input.new_empty((channels,), dtype=stats)


@torch.library.register_fake("graspext::batch_norm_relu_backward")
def _(grad_out, input, out, weight, mean, var, eps, relu, residual_grad):
    channels = input.shape[1]
    grad_residual = torch.empty_like(input) if residual_grad else input.new_empty((0,))
    stats = _stats_dtype(input)
    return (torch.empty_like(input), input.new_empty((channels,), dtype=stats),
            input.new_empty((channels,), dtype=stats), grad_residual)
