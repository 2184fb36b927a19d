"""Freeze the piecewise-linear choices of a network between two passes (for finite-difference Hg).

Autograd's Hessian-vector product differentiates inside the current activation region: ReLU'' = 0 and a
max-pool's argmax does not move. A finite difference along g that crosses a kink (a ReLU input changing
sign, a pooling window changing its maximum) is dominated by that jump, and in float32 the step cannot be
made small enough to avoid kinks without drowning in round-off. Recording the pattern at theta (pass 1) and
replaying it at theta + eps*g makes the network piecewise *fixed*, so the difference quotient converges to
autograd's Hg with a step large enough for float32.

Handled: ``aten.relu`` / ``aten.relu_`` (with their backward ``threshold_backward``) and
``aten.max_pool2d_with_indices``. Other kinked ops (hardtanh, leaky_relu, clamp, adaptive max-pool) are
left alone, so their kinks still count.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class ActivationPatterns(TorchDispatchMode):
    """``with ActivationPatterns() as p:`` records; ``with p.replaying():`` replays, in the same call order."""

    def __init__(self):
        super().__init__()
        self.patterns: list[Tensor] = []
        self._replay = False
        self._cursor = 0
        self._relu_mask_by_ptr: dict[int, Tensor] = {}

    def replaying(self) -> ActivationPatterns:
        self._replay = True
        self._cursor = 0
        self._relu_mask_by_ptr.clear()
        return self

    def _next(self) -> Tensor:
        if self._cursor >= len(self.patterns):
            raise RuntimeError("the replayed forward pass has more ReLU/max-pool calls than the recorded one; "
                               "the model's forward must be deterministic")
        p = self.patterns[self._cursor]
        self._cursor += 1
        return p

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.relu.default, aten.relu_.default):
            x = args[0]
            if not self._replay:
                # relu(x) > 0 <=> x > 0. Taken from the output: testing the input before an in-place relu_
                # kept an activation-sized copy alive for the rest of the pass (measured).
                out = func(*args, **kwargs)
                self.patterns.append(out > 0)
                return out
            mask = self._next()
            out = x.mul_(mask) if func is aten.relu_.default else x * mask
            self._relu_mask_by_ptr[out.data_ptr()] = mask
            return out
        if func is aten.threshold_backward.default and self._replay:
            grad, result, threshold = args[0], args[1], args[2]
            mask = self._relu_mask_by_ptr.get(result.data_ptr())
            if mask is not None and threshold == 0:
                return grad * mask
        if func is aten.max_pool2d_with_indices.default:
            if not self._replay:
                out, indices = func(*args, **kwargs)
                self.patterns.append(indices.to(torch.int32))  # half the memory; window offsets fit
                return out, indices
            x, indices = args[0], self._next().long()
            flat = x.flatten(-2).gather(-1, indices.flatten(-2))
            return flat.view(indices.shape), indices
        return func(*args, **kwargs)
