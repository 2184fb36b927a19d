"""Sparse convolution and linear products with autograd: wrappers over ``torch.ops.graspext.sparse_conv2d*``.

The ops read only the kept weights (see :class:`graspext.nn.pattern.SparsePattern`) and return NCHW-shaped
tensors with batch-innermost ``[H, W, C, N]`` storage. Elementwise ops keep that layout, and the next sparse op
reads it (or any other input whose batch has stride 1) without a copy; ``graspext.nn`` makes BatchNorm and
pooling keep it too. A linear layer is the same product on a 1x1 image: its input ``[N, in]`` is
``[N, in, 1, 1]``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from graspext import _extension

_extension.load()

_ops = torch.ops.graspext

__all__ = ["sparse_conv2d", "sparse_linear", "cpu_isa"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


_warned_float16 = False


def _warn_float16_autocast() -> None:
    global _warned_float16
    if not _warned_float16:
        _warned_float16 = True
        warnings.warn("graspext's CPU sparse kernels have no float16 path; under float16 autocast the sparse "
                      "layers compute in float32 (use bfloat16 autocast on the CPU)", stacklevel=4)


def _check_values(input: Tensor, values: Tensor, pattern) -> None:
    if values.shape != (pattern.nnz,):
        raise ValueError(f"values must have shape ({pattern.nnz},) (one per kept weight), got {tuple(values.shape)}")
    # bfloat16 images on the CPU multiply in float32 and read float32 values as they are. Under CUDA autocast
    # the op casts float32 values to the input's dtype (its AutocastCUDA kernel).
    cpu_bfloat16 = input.device.type == "cpu" and input.dtype == torch.bfloat16
    half_autocast = input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type)
    if (input.device.type == "cpu" and input.dtype in (torch.float16, torch.float32)
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16):
        _warn_float16_autocast()
    if values.dtype != input.dtype and not (values.dtype == torch.float32 and (cpu_bfloat16 or half_autocast)):
        raise TypeError(f"values has dtype {values.dtype} but input has {input.dtype}"
                        + ("; they must match (or values be float32)" if cpu_bfloat16 else "; they must match"))


def sparse_conv2d(input: Tensor, values: Tensor, pattern, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """``F.conv2d(input, W, bias, stride, padding)`` for the sparse weight W = ``pattern.scatter(values)``.

    Differentiable in ``input``, ``values`` and ``bias``. The result has shape NCHW and batch-innermost strides.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"input must be a 4-D tensor (N, C, H, W), got {getattr(input, 'shape', input)!r}")
    if input.shape[1] != pattern.weight_shape[1]:
        raise ValueError(f"input has {input.shape[1]} channels but the weight expects {pattern.weight_shape[1]}")
    _check_values(input, values, pattern)
    return _ops.sparse_conv2d(
        input, values, *pattern.tensors(), bias, list(pattern.weight_shape),
        list(_pair(stride, "stride")), list(_pair(padding, "padding")),
    )


def sparse_linear(input: Tensor, values: Tensor, pattern, bias: Tensor | None = None) -> Tensor:
    """``F.linear(input, W, bias)`` for the sparse weight W [out, in]; ``input`` is ``[N, in]``.

    The result is ``[N, out]`` with batch-innermost strides (the transpose of contiguous ``[out, N]``).
    """
    if not isinstance(input, Tensor) or input.dim() != 2:
        raise ValueError(f"input must be 2-D (N, in_features), got {getattr(input, 'shape', input)!r}")
    out_features, in_features, kh, kw = pattern.weight_shape
    if (kh, kw) != (1, 1):
        raise ValueError(f"pattern must be of a linear weight ([out, in, 1, 1]), got {pattern.weight_shape}")
    if input.shape[1] != in_features:
        raise ValueError(f"input has {input.shape[1]} features but the weight expects {in_features}")
    _check_values(input, values, pattern)
    return _ops.sparse_linear(input, values, *pattern.tensors(), bias)


def cpu_isa(isa: str = "") -> str:
    """The CPU instruction set of the sparse kernels ("avx512_bf16", "avx512", "avx2" or "baseline"); selects one
    if given."""
    return _ops.sparse_cpu_isa(isa)


# ---- autograd ------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    input, values, row_ptr, row_taps, col_ptr, col_taps, col_order, bias, weight_shape, stride, padding = inputs
    saved_input = input if ctx.needs_input_grad[1] else None
    saved_values = values if ctx.needs_input_grad[0] else None
    ctx.save_for_backward(saved_input, saved_values, row_ptr, row_taps, col_ptr, col_taps, col_order)
    ctx.input_shape = list(input.shape)
    ctx.weight_shape, ctx.stride, ctx.padding = weight_shape, stride, padding
    ctx.has_bias = bias is not None
    # The CPU weight gradient of bfloat16 images is float32 (the kernels' accumulation); each parameter's
    # gradient takes the parameter's dtype.
    ctx.values_dtype = values.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_output):
    input, values, row_ptr, row_taps, col_ptr, col_taps, col_order = ctx.saved_tensors
    grad_input = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.sparse_conv2d_backward_input(
            grad_output, values, col_ptr, col_taps, col_order, ctx.weight_shape, ctx.input_shape, ctx.stride,
            ctx.padding,
        )
    if ctx.needs_input_grad[1]:
        grad_values = _ops.sparse_conv2d_backward_weight(
            grad_output, input, row_ptr, row_taps, ctx.weight_shape, ctx.stride, ctx.padding
        ).to(ctx.values_dtype)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        half = grad_output.dtype in (torch.float16, torch.bfloat16)  # summed in float32
        grad_bias = grad_output.sum((0, 2, 3), dtype=torch.float32 if half else None).to(ctx.bias_dtype)
    return grad_input, grad_values, None, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("graspext::sparse_conv2d", _backward, setup_context=_setup_context)


def _setup_linear_context(ctx, inputs, output):
    input, values, row_ptr, row_taps, col_ptr, col_taps, col_order, bias = inputs
    image = input[:, :, None, None]
    weight_shape = [row_ptr.shape[0] - 1, input.shape[1], 1, 1]
    _setup_context(ctx, (image, values, row_ptr, row_taps, col_ptr, col_taps, col_order, bias, weight_shape,
                         [1, 1], [0, 0]), output)


def _linear_backward(ctx, grad_output):
    grads = _backward(ctx, grad_output[:, :, None, None])
    grad_input = grads[0][:, :, 0, 0] if grads[0] is not None else None
    return (grad_input, *grads[1:8])


torch.library.register_autograd("graspext::sparse_linear", _linear_backward, setup_context=_setup_linear_context)

# Autocast: the AutocastCPU and AutocastCUDA kernels (C++) run the products in autocast's dtype. On the CPU
# that is bfloat16 images with the float32 values read as they are; float16 autocast has no CPU kernels and
# computes in float32, with a one-time warning.


# ---- fake kernels (shapes and strides only) -------------------------------------------------------------


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _batch_innermost_empty(like: Tensor, n: int, c: int, h: int, w: int) -> Tensor:
    return like.new_empty_strided((n, c, h, w), (1, n, w * c * n, c * n))


@torch.library.register_fake("graspext::to_batch_innermost")
def _(x):
    torch._check(x.dim() == 4, lambda: "x must be 4-D")
    return _batch_innermost_empty(x, *x.shape)


@torch.library.register_fake("graspext::from_batch_innermost")
def _(x):
    torch._check(x.dim() == 4, lambda: "x must be 4-D")
    return x.new_empty(x.shape)


@torch.library.register_fake("graspext::sparse_conv2d")
def _(input, values, row_ptr, row_taps, col_ptr, col_taps, col_order, bias, weight_shape, stride, padding):
    torch._check(input.dim() == 4, lambda: "input must be 4-D")
    torch._check(input.shape[1] == weight_shape[1], lambda: "input channels must match weight_shape[1]")
    n, _, h, w = input.shape
    oh = _out_size(h, weight_shape[2], stride[0], padding[0])
    ow = _out_size(w, weight_shape[3], stride[1], padding[1])
    return _batch_innermost_empty(input, n, weight_shape[0], oh, ow)


@torch.library.register_fake("graspext::sparse_linear")
def _(input, values, row_ptr, row_taps, col_ptr, col_taps, col_order, bias):
    torch._check(input.dim() == 2, lambda: "input must be 2-D")
    n = input.shape[0]
    return input.new_empty_strided((n, row_ptr.shape[0] - 1), (1, n))


@torch.library.register_fake("graspext::sparse_conv2d_backward_input")
def _(grad_output, values, col_ptr, col_taps, col_order, weight_shape, input_shape, stride, padding):
    n, c, h, w = input_shape
    return _batch_innermost_empty(grad_output, n, c, h, w)


@torch.library.register_fake("graspext::sparse_conv2d_backward_weight")
def _(grad_output, input, row_ptr, row_taps, weight_shape, stride, padding):
    cpu_bfloat16 = input.device.type == "cpu" and input.dtype == torch.bfloat16
    return input.new_empty((row_taps.shape[0],), dtype=torch.float32 if cpu_bfloat16 else input.dtype)
