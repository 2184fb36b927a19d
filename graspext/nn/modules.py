"""``SparseConv2d`` and ``SparseLinear``: layers that store and compute only their kept weights.

The trainable parameter is ``values`` (one entry per kept weight), so the optimizer, its momentum and
weight decay cost O(kept weights). The sparsity pattern lives in index buffers built once
(:class:`~graspext.nn.pattern.SparsePattern`). Each layer runs in one of three modes:

- ``"sparse"``: the graspext kernels (CPU: float32, float64 and bfloat16, also under bfloat16 autocast; CUDA
  only with ``GRASPEXT_CUDA_SPARSE=1``, also float16/bfloat16 and autocast: the CUDA kernels are correct but
  still slower than cuDNN for whole networks, see benchmarks/RESULTS.md);
- ``"dense"``: the dense torch kernel on the weight scattered from ``values`` -- for layers where dense is
  faster (``graspext.sparsify`` measures or estimates this per layer), and for inputs the kernels do not
  handle (CUDA unless enabled, other dtypes);
- ``"compact"``: the dense torch kernel on the live channels only -- input channels that some kept weight
  reads and output channels that some kept weight writes (a dead output channel is its bias). This is dense
  work on smaller shapes, for layers with dead channels where dense wins over the sparse kernels.

The result is the same in every mode.

``state_dict`` holds a dense ``weight`` (zeros at pruned positions) and ``bias``, exactly the keys of
``nn.Conv2d`` / ``nn.Linear``: a checkpoint loads into the dense model as it is. The current mask travels in the
state dict's per-module metadata (``state_dict._metadata[prefix]["graspext_mask"]``, saved by ``torch.save``),
which dense modules ignore: a kept weight can be exactly zero (RigL grows connections at zero), so the pattern
cannot be read back from the weight.

The pattern can change (dynamic sparse training, :mod:`graspext.dst`): :meth:`set_mask_` moves the kept weights
to a new mask of the same count in place, keeping the ``values`` Parameter and its optimizer state, and
:meth:`request_dense_grad` makes the next forward/backward also yield the gradient at every position.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graspext.nn.layout import to_batch_innermost, to_nchw
from graspext.nn.pattern import SparsePattern
from graspext.ops.sparse import sparse_conv2d, sparse_linear

MODES = ("sparse", "dense", "compact")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)  # float32 accumulation; the CPU kernels take bfloat16 only
_INDEX_NAMES = ("row_ptr", "row_taps", "col_ptr", "col_taps", "col_order")
MASK_METADATA_KEY = "graspext_mask"
_warned: set[str] = set()


def _cuda_kernels_enabled() -> bool:
    """Opt-in: the CUDA sparse kernels pass their tests on an H100 but train VGG19/ResNet32 slower than cuDNN."""
    from graspext._extension import has_cuda_kernel

    return os.environ.get("GRASPEXT_CUDA_SPARSE") == "1" and has_cuda_kernel("sparse_conv2d")


def _kernel_dtypes(x: Tensor, values: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of the image and the values that the sparse ops compute with, after autocast's casts.

    Mirrors the ops' Autocast kernels (C++): on the CPU, bfloat16 autocast casts a float32 image to bfloat16 and
    reads float32 values as they are; float16 autocast (no CPU kernels) computes in float32. On CUDA, autocast
    casts float32 images and values to its dtype. float64 is never cast.
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x.dtype, values
    low = torch.get_autocast_dtype(device)
    if device == "cpu" and low == torch.bfloat16:
        return (low if x.dtype == torch.float32 else x.dtype), values
    if device == "cpu":
        return tuple(torch.float32 if d in _HALF_DTYPES else d for d in (x.dtype, values))
    return tuple(low if d == torch.float32 else d for d in (x.dtype, values))


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _dense_layer_mask(layer: nn.Module, cls: type, name: str, mask: Tensor | None) -> Tensor:
    """Checks the layer to convert and its mask; the mask defaults to the layer's non-zero weights."""
    if not isinstance(layer, cls):
        raise TypeError(f"{name} must be an nn.{cls.__name__}, got {type(layer).__name__}")
    if mask is None:
        return layer.weight.detach() != 0
    if tuple(mask.shape) != tuple(layer.weight.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight has {tuple(layer.weight.shape)}")
    return mask


def _compaction(pattern: SparsePattern) -> tuple[Tensor, Tensor, Tensor]:
    """The live output and input channels of a pattern, and each value's position in the compact weight."""
    out, _, kh, kw = pattern.weight_shape
    device = pattern.row_ptr.device
    row_counts, col_counts = pattern.row_ptr.diff(), pattern.col_ptr.diff()
    live_out = row_counts.nonzero().flatten()
    live_in = col_counts.nonzero().flatten()
    # Rank of each live channel among the live ones (dead channels are never looked up).
    rank_out = torch.cumsum(row_counts > 0, 0) - 1
    rank_in = torch.cumsum(col_counts > 0, 0) - 1
    rows = torch.repeat_interleave(torch.arange(out, device=device), row_counts)
    taps = pattern.row_taps.long()
    channel, rs = taps // (kh * kw), taps % (kh * kw)
    index = (rank_out[rows] * live_in.numel() + rank_in[channel]) * (kh * kw) + rs
    return live_out, live_in, index


class _SparseLayer(nn.Module):
    """What SparseConv2d and SparseLinear share: values, index buffers, mode, state_dict as a dense weight."""

    def _init_sparse(self, pattern: SparsePattern, weight: Tensor, bias: Tensor | None, mode: str) -> None:
        if weight.shape != torch.Size(self._dense_shape()):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {self._dense_shape()}")
        self.values = nn.Parameter(pattern.gather(weight.detach().reshape(pattern.weight_shape)).clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._set_pattern(pattern.to(weight.device))
        # How sparsify chose the mode, so that set_mask_ can choose again: (policy, kind, dtype) or None.
        self.mode_rule: tuple | None = None
        self._dense_grad_request = False
        self._dense_grad_box: list | None = None  # [dL/dW], filled by the backward after a request
        self.mode = mode
        self.decision = f"{mode} (chosen by the caller)"
        self.computed_dtype: torch.dtype | None = None  # set by each forward pass
        # Set by sparsify on dense-mode layers followed by sparse ones: hand them the batch-innermost layout
        # (one conversion here instead of mixed layouts downstream, e.g. in a residual sum).
        self.emit_batch_innermost = False
        # Set by sparsify(dtype=torch.bfloat16) on CPU conv layers that stay dense: oneDNN's bfloat16
        # convolutions run 10-30 % faster on channels-last input (benchmarks/RESULTS.md).
        self.dense_channels_last = False

    def _set_pattern(self, pattern: SparsePattern) -> None:
        """Installs the index buffers of ``pattern`` and its dead-channel compaction (non-persistent buffers: the
        mask is saved in the state dict's metadata)."""
        live_out, live_in, compact_index = _compaction(pattern)
        for name, t in (*zip(_INDEX_NAMES, pattern.tensors()), ("live_out", live_out), ("live_in", live_in),
                        ("compact_index", compact_index)):
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t, persistent=False)

    @torch.no_grad()
    def set_mask_(self, mask: Tensor, optimizer: torch.optim.Optimizer | None = None, *, reinit: Tensor | None = None,
                  grown_values: Tensor | None = None) -> int:
        """Moves the layer to ``mask`` (same shape as the dense weight, same kept count) in place.

        The ``values`` Parameter stays the same object. A weight kept by both masks keeps its value, its gradient
        and its optimizer state (every state tensor of ``optimizer`` shaped like ``values``: SGD's momentum, Adam's
        moments); a newly kept weight starts at zero (or at ``grown_values`` at its position) with zero state.
        ``reinit`` (bool, dense shape) marks kept-by-both positions to treat as new as well. The index buffers and
        the dead-channel compaction are rebuilt and the mode is chosen again as ``sparsify`` chose it. Returns the
        number of weights that started fresh.
        """
        shape = self._dense_shape()
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's {shape}")
        kept = int(mask.sum())
        if kept != self.nnz:
            raise ValueError(f"mask keeps {kept} weights but the layer keeps {self.nnz}: set_mask_ moves connections, "
                             "it never changes their number (the values Parameter keeps its size)")
        for name, t in (("reinit", reinit), ("grown_values", grown_values)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                raise ValueError(f"{name} must be a tensor of the weight's shape {shape}, "
                                 f"got {tuple(getattr(t, 'shape', ()))}")
        if reinit is not None and reinit.dtype != torch.bool:
            raise TypeError(f"reinit must be a bool tensor, got {reinit.dtype}")
        device = self.values.device
        old_flat = self.pattern.flat_indices().to(device)
        pattern = SparsePattern.from_mask(mask.reshape(self._pattern_shape())).to(device)
        new_flat = pattern.flat_indices()
        # For each new entry, the index of the old value at its position, or -1 for a new connection.
        lookup = torch.full((math.prod(shape),), -1, dtype=torch.int64, device=device)
        lookup[old_flat] = torch.arange(old_flat.numel(), device=device)
        source = lookup[new_flat]
        fresh = source < 0
        if reinit is not None:
            fresh |= reinit.to(device).reshape(-1)[new_flat]
        carried = ~fresh

        def moved(t: Tensor) -> Tensor:
            out = torch.zeros_like(t)
            out[carried] = t[source[carried]]
            return out

        values = moved(self.values)
        if grown_values is not None:
            values[fresh] = grown_values.to(device=device, dtype=values.dtype).reshape(-1)[new_flat[fresh]]
        self.values.copy_(values)
        if self.values.grad is not None:
            self.values.grad.copy_(moved(self.values.grad))
        if optimizer is not None:
            for value in optimizer.state.get(self.values, {}).values():
                if isinstance(value, Tensor) and value.shape == self.values.shape:
                    value.copy_(moved(value))
        self._set_pattern(pattern)
        if self.mode_rule is not None:
            from graspext.nn.convert import choose_mode_again

            choose_mode_again(self)
        return int(fresh.sum())

    def request_dense_grad(self) -> None:
        """Makes the next forward and backward also yield dL/dW at every position; read it with :meth:`dense_grad`.

        The sparse product still runs as always; the dense gradient is one dense weight-gradient product on top
        (in dense mode, the gradient of the scattered weight, at no extra cost). Steps without a request never
        compute it.
        """
        if not self.values.requires_grad:
            raise RuntimeError(f"{type(self).__name__}: its values do not require grad, so there is no gradient to "
                               "yield; request a dense gradient only from layers that train")
        self._dense_grad_request = True
        self._dense_grad_box = None

    def dense_grad(self) -> Tensor:
        """dL/dW (dense weight shape, float32 or the weights' wider dtype) from the backward after the request."""
        box = self._dense_grad_box
        if self._dense_grad_request and box is None:
            raise RuntimeError(f"{type(self).__name__}: no dense gradient was captured since request_dense_grad(); "
                               "run a forward and backward through this layer (with grad enabled) first")
        if box is None:
            raise RuntimeError(f"{type(self).__name__}: no dense gradient was requested; call request_dense_grad() "
                               "before the forward pass")
        if box[0] is None:
            raise RuntimeError(f"{type(self).__name__}: the forward after request_dense_grad() ran, but no backward "
                               "reached this layer")
        self._dense_grad_box = None
        return box[0]

    def _capture_dense_grad(self, x: Tensor | None, y: Tensor | None, weight: Tensor | None, weight_grad) -> None:
        """Arms the capture for this forward (the first after a request): from the dense weight's gradient, or
        from ``weight_grad(x, dy)``."""
        if not (self._dense_grad_request and torch.is_grad_enabled()):
            return
        self._dense_grad_request = False
        wide = torch.float64 if self.values.dtype == torch.float64 else torch.float32
        box: list = [None]
        if weight is not None and weight.requires_grad:
            def keep(g):
                box[0] = g.detach().to(wide)
            weight.register_hook(keep)
        elif y is not None and y.requires_grad:
            saved = x.detach()

            def keep(g):
                box[0] = weight_grad(saved.to(wide), g.detach().to(wide)).view(self._dense_shape())
            y.register_hook(keep)
        else:
            return
        self._dense_grad_box = box

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._mode = mode

    @property
    def pattern(self) -> SparsePattern:
        return SparsePattern(self._pattern_shape(), *(getattr(self, n) for n in _INDEX_NAMES))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.pattern.density

    @property
    def dead_channels(self) -> tuple[int, int]:
        """``(outputs, inputs)``: how many output channels no kept weight writes and input channels none reads."""
        out, inp = self._dense_shape()[:2]
        return out - self.live_out.numel(), inp - self.live_in.numel()

    @property
    def compact_mac_fraction(self) -> float:
        """The dense work of ``"compact"`` mode as a fraction of the full dense layer's."""
        out, inp = self._dense_shape()[:2]
        return self.live_out.numel() * self.live_in.numel() / max(1, out * inp)

    def compact_weight(self) -> Tensor:
        """The dense weight of the live channels only, ``[live outputs, live inputs, ...]`` (differentiable)."""
        shape = (self.live_out.numel(), self.live_in.numel(), *self._dense_shape()[2:])
        flat = self.values.new_zeros(self.live_out.numel() * self.live_in.numel() * math.prod(shape[2:]))
        return flat.index_put((self.compact_index,), self.values).view(shape)

    def _compact_call(self, x: Tensor, dim: int, dense_fn) -> Tensor:
        """``dense_fn(x, weight, bias)`` on the live channels; ``dim`` is the channel dimension of x and the result."""
        n_out, n_in = self._dense_shape()[:2]
        if x.shape[dim] != n_in:
            raise ValueError(f"input has {x.shape[dim]} channels in dimension {dim}, expected {n_in}")
        if self.live_in.numel() != n_in:
            x = x.index_select(dim, self.live_in)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = dense_fn(x, self.compact_weight().to(x.dtype), None if bias is None else bias[self.live_out])
        if self.live_out.numel() == n_out:
            return y
        shape = list(y.shape)
        shape[dim] = n_out
        if bias is None:
            full = y.new_zeros(shape)
        else:  # dead outputs are their bias, in y's dtype (under autocast the product's, not the input's)
            view = [1] * len(shape)
            view[dim] = n_out
            full = bias.to(y.dtype).view(view).expand(shape)
        return full.index_copy(dim % len(shape), self.live_out, y)

    def mask(self) -> Tensor:
        """The boolean mask in the dense weight's shape."""
        return self.pattern.mask().view(self._dense_shape())

    def dense_weight(self) -> Tensor:
        """The dense weight (zeros at pruned positions), differentiable in ``values``."""
        return self.pattern.scatter(self.values).view(self._dense_shape())

    def _use_kernels(self, x: Tensor) -> bool:
        if self._mode != "sparse":
            return False
        if x.device.type == "cuda" and _cuda_kernels_enabled():
            pass
        elif x.device.type != "cpu":
            _warn_once(f"device-{x.device.type}", f"graspext's sparse kernels are not enabled for {x.device.type} "
                       "tensors (CUDA: GRASPEXT_CUDA_SPARSE=1 enables them; they are slower than cuDNN so far); "
                       "sparse layers compute densely there (same results)")
            return False
        image, values = _kernel_dtypes(x, self.values.dtype)
        cpu_bfloat16 = x.device.type == "cpu" and image == torch.bfloat16 and values in (torch.bfloat16, torch.float32)
        image_dtypes = _KERNEL_DTYPES + ((torch.bfloat16,) if x.device.type == "cpu" else _HALF_DTYPES)
        if not cpu_bfloat16 and (image not in image_dtypes or image != values):
            _warn_once(f"dtype-{x.dtype}", f"graspext's {x.device.type.upper()} sparse kernels take "
                       f"{', '.join(map(str, image_dtypes))} input matching the weights ({self.values.dtype}), "
                       f"got {x.dtype}; computing densely")
            return False
        return True

    def _record_dtype(self, dtype: torch.dtype) -> None:
        """Remembers the dtype the layer last computed in (``sparsity_report`` lists it)."""
        if not torch.compiler.is_compiling():
            self.computed_dtype = dtype

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.dense_weight()
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:  # Module.state_dict made this module's entry just before calling us
            metadata.setdefault(prefix[:-1], {})[MASK_METADATA_KEY] = self.mask().cpu()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        saved_mask = local_metadata.get(MASK_METADATA_KEY)
        if key not in state_dict:
            missing_keys.append(key)
        else:
            weight = state_dict[key]
            if tuple(weight.shape) != self._dense_shape():
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the sparse layer's weight has shape {self._dense_shape()}")
            elif saved_mask is not None and (tuple(saved_mask.shape) != self._dense_shape()
                                             or int(saved_mask.sum()) != self.nnz):
                error_msgs.append(f"the mask saved with {key} keeps {int(saved_mask.sum())} weights of "
                                  f"{tuple(saved_mask.shape)}; this sparse layer keeps {self.nnz} of "
                                  f"{self._dense_shape()}")
            else:
                if saved_mask is not None and not torch.equal(saved_mask.to(self.values.device), self.mask()):
                    self.set_mask_(saved_mask.to(self.values.device))  # the pattern the checkpoint was taken with
                weight = weight.to(self.values.device)
                outside = (weight != 0) & ~self.mask()
                if bool(outside.any()):
                    error_msgs.append(
                        f"{key} has {int(outside.sum())} non-zero weights outside this layer's sparsity pattern; "
                        "load it into the dense model and sparsify that with its masks instead")
                else:
                    with torch.no_grad():
                        self.values.copy_(self.pattern.gather(weight.reshape(self._pattern_shape())))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)
        if strict:
            for k in state_dict:
                if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias") and "." not in k[len(prefix):]:
                    unexpected_keys.append(k)


class SparseConv2d(_SparseLayer):
    """A Conv2d computing only its kept weights. Build it with :meth:`from_dense`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 weight: Tensor, bias: Tensor | None, mask: Tensor, mode: str = "sparse",
                 padding_mode: str = "zeros"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.dilation, self.groups, self.padding_mode = tuple(dilation), groups, padding_mode
        # 'valid', and 'same' when it pads both sides equally, become numbers the kernels take.
        self._string_padding = None
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if all(t % 2 == 0 for t in total):
                padding = tuple(t // 2 for t in total)
            else:
                self._string_padding, padding = "same", (0, 0)
        self.padding = tuple(padding)
        pattern = SparsePattern.from_mask(mask.reshape(self._pattern_shape()).to(torch.bool))
        self._init_sparse(pattern, weight, bias, mode)
        if not self.kernel_supported and not (mode == "compact" and groups == 1):  # compact is dense torch
            self.mode = "dense"
            self.decision = f"dense (the kernels do not support {self._unsupported_reason()})"
            _warn_once(f"conv-{self._unsupported_reason()}",
                       f"sparse Conv2d kernels do not support {self._unsupported_reason()}; such layers compute "
                       "densely on the masked weight (same results, no speedup)")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Tensor | None = None, mode: str = "sparse") -> SparseConv2d:
        """From an ``nn.Conv2d``; ``mask`` defaults to its non-zero weights."""
        mask = _dense_layer_mask(conv, nn.Conv2d, "conv", mask)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.weight * mask.to(conv.weight.dtype), conv.bias, mask, mode, conv.padding_mode)

    def _dense_shape(self) -> tuple[int, ...]:
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, kh, kw)

    def _pattern_shape(self) -> tuple[int, int, int, int]:
        return self._dense_shape()

    def _unsupported_reason(self) -> str | None:
        if self.groups != 1:
            return f"groups={self.groups}"
        if self.dilation != (1, 1):
            return f"dilation={self.dilation}"
        if self.padding_mode != "zeros":
            return f"padding_mode={self.padding_mode!r}"
        if self._string_padding is not None:
            return f"padding={self._string_padding!r} with an even kernel"
        return None

    @property
    def kernel_supported(self) -> bool:
        return self._unsupported_reason() is None

    def forward(self, x: Tensor) -> Tensor:
        if self._use_kernels(x) and self.kernel_supported:
            y = sparse_conv2d(x, self.values, self.pattern, self.bias, self.stride, self.padding)
            self._capture_dense_grad(x, y, None, self._conv_weight_grad(self.stride, self.padding, (1, 1)))
            self._record_dtype(y.dtype)
            return y
        padding = self._string_padding or self.padding
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = 0

        def conv(inp, weight, bias):
            return F.conv2d(inp, weight, bias, self.stride, padding, self.dilation, self.groups)

        if self.dense_channels_last and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = to_nchw(x)  # from a sparse layer before: one fast transpose, not oneDNN's generic reorder

        if self._mode == "compact" and self.nnz > 0 and self.groups == 1:  # groups tie channels together
            y = self._compact_call(x, 1, conv)
            self._capture_dense_grad(x, y, None, self._conv_weight_grad(self.stride, padding, self.dilation))
        else:
            weight = self.dense_weight()
            self._capture_dense_grad(None, None, weight, None)
            y = conv(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.emit_batch_innermost and y.shape[0] > 1:
            y = to_batch_innermost(y)
        self._record_dtype(y.dtype)
        return y

    def _conv_weight_grad(self, stride, padding, dilation):
        """dL/dW at every position from the layer's input and output gradient (for :meth:`dense_grad`)."""
        if isinstance(padding, str):  # 'same' with an even kernel: the padding conv2d would use, per side
            padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))

        def weight_grad(x: Tensor, dy: Tensor) -> Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return torch.nn.grad.conv2d_weight(x, self._dense_shape(), dy, stride, padding, dilation, self.groups)
        return weight_grad

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (pruned weights are zeros)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self._string_padding or self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device=self.values.device, dtype=self.values.dtype)
        conv.load_state_dict(self.state_dict())  # the dense weight and bias, under nn.Conv2d's keys
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, density={self.density:.4f}, "
                f"mode={self.mode!r}")


class SparseLinear(_SparseLayer):
    """A Linear layer computing only its kept weights. Build it with :meth:`from_dense`."""

    def __init__(self, in_features: int, out_features: int, weight: Tensor, bias: Tensor | None, mask: Tensor,
                 mode: str = "sparse"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        pattern = SparsePattern.from_mask(mask.reshape(out_features, in_features).to(torch.bool))
        self._init_sparse(pattern, weight, bias, mode)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor | None = None, mode: str = "sparse") -> SparseLinear:
        """From an ``nn.Linear``; ``mask`` defaults to its non-zero weights."""
        mask = _dense_layer_mask(linear, nn.Linear, "linear", mask)
        return cls(linear.in_features, linear.out_features, linear.weight * mask.to(linear.weight.dtype),
                   linear.bias, mask, mode)

    def _dense_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def _pattern_shape(self) -> tuple[int, int, int, int]:
        return (self.out_features, self.in_features, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected {self.in_features}")
        if self._mode == "compact" and self.nnz > 0:
            out = self._compact_call(x, -1, F.linear)
            self._capture_dense_grad(x, out, None, self._linear_weight_grad)
        elif not self._use_kernels(x):
            weight = self.dense_weight()
            self._capture_dense_grad(None, None, weight, None)
            out = F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            lead = x.shape[:-1]
            flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            out = sparse_linear(flat, self.values, self.pattern, self.bias)
            self._capture_dense_grad(flat, out, None, self._linear_weight_grad)
            out = out if x.dim() == 2 else out.reshape(*lead, self.out_features)
        self._record_dtype(out.dtype)
        return out

    def _linear_weight_grad(self, x: Tensor, dy: Tensor) -> Tensor:
        return dy.reshape(-1, self.out_features).t() @ x.reshape(-1, self.in_features)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (pruned weights are zeros)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device,
                           dtype=self.values.dtype)
        linear.load_state_dict(self.state_dict())  # the dense weight and bias, under nn.Linear's keys
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, mode={self.mode!r}")
