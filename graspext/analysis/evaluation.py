"""The one evaluation loop the analyses share: mean loss and accuracy of a model over a loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable = F.cross_entropy,
             device: torch.device | None = None) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in its current mode) over ``loader``, on ``device`` (default: the
    model's). Half-precision outputs are scored in float32."""
    if device is None:
        device = next(model.parameters()).device
    total, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        total += float(loss_fn(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)) * len(y)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    if seen == 0:
        raise ValueError("loader: it yielded no samples")
    return total / seen, correct / seen
