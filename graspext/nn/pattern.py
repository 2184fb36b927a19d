"""The index structures of a sparse weight, built once per mask.

A weight of shape ``[out, in, kh, kw]`` (a Linear weight is ``[out, in, 1, 1]``) keeps ``nnz`` entries. Its
values are stored in row-major order of the mask (by output channel, then input channel, kernel row,
kernel column), and two indexes address them (see ``csrc/ops/sparse_conv2d.h``):

- by output channel, for the forward product and the weight gradient: ``row_ptr`` [out + 1] and
  ``row_taps`` [nnz], tap = ``(c * kh + r) * kw + s``;
- by input channel, for the input gradient: ``col_ptr`` [in + 1], ``col_taps`` [nnz], tap =
  ``(o * kh + r) * kw + s``, and ``col_order`` [nnz], where each entry's value sits in ``values``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SparsePattern:
    """Where the kept weights are, as index tensors the sparse kernels read; see the module docstring."""

    weight_shape: tuple[int, int, int, int]
    row_ptr: Tensor
    row_taps: Tensor
    col_ptr: Tensor
    col_taps: Tensor
    col_order: Tensor

    @property
    def nnz(self) -> int:
        return self.row_taps.numel()

    @property
    def density(self) -> float:
        out, inp, kh, kw = self.weight_shape
        return self.nnz / max(1, out * inp * kh * kw)

    @classmethod
    def from_mask(cls, mask: Tensor) -> SparsePattern:
        """Builds the indexes of a boolean mask of shape ``[out, in]`` or ``[out, in, kh, kw]``."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.dim() == 2:
            mask = mask[:, :, None, None]
        if mask.dim() != 4:
            raise ValueError(f"mask must have shape [out, in] or [out, in, kh, kw], got {tuple(mask.shape)}")
        out, inp, kh, kw = mask.shape
        if inp * kh * kw > _INT32_MAX or out * kh * kw > _INT32_MAX or mask.numel() > _INT32_MAX:
            raise ValueError(f"mask of shape {tuple(mask.shape)} is too large for 32-bit indices")
        mask = mask.detach().to("cpu")
        flat = mask.reshape(out, -1)
        idx = flat.nonzero()  # row-major: sorted by (o, tap)
        o, tap = idx[:, 0], idx[:, 1]
        row_ptr = torch.zeros(out + 1, dtype=torch.int64)
        row_ptr[1:] = flat.sum(1).cumsum(0)
        c = tap // (kh * kw)
        rs = tap % (kh * kw)
        # The same entries sorted by (input channel, output channel, r, s).
        order = torch.argsort(c * (out * kh * kw) + o * (kh * kw) + rs, stable=True)
        col_ptr = torch.zeros(inp + 1, dtype=torch.int64)
        col_ptr[1:] = torch.bincount(c, minlength=inp).cumsum(0)
        col_taps = (o * (kh * kw) + rs)[order]
        return cls(
            weight_shape=(out, inp, kh, kw),
            row_ptr=row_ptr,
            row_taps=tap.to(torch.int32),
            col_ptr=col_ptr,
            col_taps=col_taps.to(torch.int32),
            col_order=order.to(torch.int32),
        )

    def mask(self) -> Tensor:
        """The boolean mask, shape ``weight_shape``."""
        out, inp, kh, kw = self.weight_shape
        flat = torch.zeros(out, inp * kh * kw, dtype=torch.bool, device=self.row_ptr.device)
        rows = torch.repeat_interleave(torch.arange(out, device=self.row_ptr.device), self.row_ptr.diff())
        flat[rows, self.row_taps.long()] = True
        return flat.view(self.weight_shape)

    def flat_indices(self) -> Tensor:
        """Position of each value in the flattened dense weight (int64, ``[nnz]``)."""
        out, inp, kh, kw = self.weight_shape
        rows = torch.repeat_interleave(torch.arange(out, device=self.row_ptr.device), self.row_ptr.diff())
        return rows * (inp * kh * kw) + self.row_taps.long()

    def gather(self, weight: Tensor) -> Tensor:
        """The kept entries of a dense weight, in the order of ``values``."""
        return weight.reshape(-1)[self.flat_indices().to(weight.device)]

    def scatter(self, values: Tensor) -> Tensor:
        """The dense weight holding ``values`` at the kept positions and zeros elsewhere (differentiable)."""
        out, inp, kh, kw = self.weight_shape
        dense = values.new_zeros(out * inp * kh * kw)
        dense = dense.index_put((self.flat_indices().to(values.device),), values)
        return dense.view(self.weight_shape)

    def to(self, device) -> SparsePattern:
        return SparsePattern(
            self.weight_shape,
            *(t.to(device) for t in (self.row_ptr, self.row_taps, self.col_ptr, self.col_taps, self.col_order)),
        )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.row_ptr, self.row_taps, self.col_ptr, self.col_taps, self.col_order
