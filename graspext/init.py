"""Sparse-aware initialisation: scale each kept weight by the connections its unit really has.

A dense initialisation (He, Glorot) sets the weight variance from the layer's dense fan-in. After pruning, a
unit keeps only some of those inputs, so the variance of its pre-activation shrinks by the density, layer
after layer: at 90 % sparsity an 8-layer ReLU network's signal falls by about 10^8, and the gradients with it.
Evci et al., "Gradient flow in sparse neural networks and how lottery tickets win" (AAAI 2022; official code
google-research/rigl, ``rigl_tf2/init_utils.py``) count the fan from the mask instead, per unit: each kept
weight is drawn with variance ``gain / fan``, where the fan is the number of kept connections into the
weight's output unit (fan-in), out of its input unit (fan-out), or their mean. Their baseline,
``layer_scaled``, keeps the dense initialisation and divides each layer by the square root of its density,
which is right on average over a layer but not for units whose kept count differs from the mean.

    import graspext as gx
    masks = gx.prune(model, "random", 0.9)
    gx.init.unit_scaled_init_(model, masks)                    # He-style on the kept fan-in
    gx.train(model, train_loader, test_loader, masks=masks, init="unit_scaled")   # the same, in the trainer
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from graspext.masks import Masks

INITS = ("unit_scaled", "unit_scaled_fan_out", "unit_scaled_fan_avg", "layer_scaled")
FANS = ("in", "out", "avg")
DISTRIBUTIONS = ("normal", "uniform")

__all__ = ["DISTRIBUTIONS", "FANS", "INITS", "apply_init_", "layer_scaled_init_", "masked_layers", "unit_scaled_init_"]


def masked_layers(model: nn.Module, masks: Mapping[str, Tensor]) -> list[tuple[str, nn.Parameter, Tensor]]:
    """(name, weight, mask) of every masked weight, in the model's parameter order (so the draw does not
    depend on the order of the masks' keys). Raises naming ``masks`` where they do not fit ``model`` or a key
    is not the weight of a Conv2d/Linear (the fans of any other parameter mean nothing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    masks = Masks(masks)
    masks.check_fits(model)
    for name in masks:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr != "weight" or not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"masks: {name!r} is not the weight of a Conv2d or Linear layer "
                             f"(it belongs to a {type(module).__name__}); only those can be initialised by fan")
    return [(name, p, masks[name]) for name, p in model.named_parameters() if name in masks]


def _fan(mask: Tensor, fan: str) -> Tensor:
    """The fan of every weight position, counted from the kept connections of ``mask`` ([out, in, *kernel]),
    as float64 broadcastable to the mask's shape."""
    m = mask.to(torch.float64)
    taps = tuple(range(2, m.dim()))
    fan_in = m.sum(dim=(1, *taps), keepdim=True)    # per output unit: its inputs, all channels and taps
    fan_out = m.sum(dim=(0, *taps), keepdim=True)   # per input unit: its outputs, all channels and taps
    if fan == "in":
        return fan_in
    if fan == "out":
        return fan_out
    return (fan_in + fan_out) / 2


@torch.no_grad()
def unit_scaled_init_(model: nn.Module, masks: Mapping[str, Tensor], *, fan: str = "in",
                      distribution: str = "normal", gain: float = 2.0,
                      generator: torch.Generator | None = None) -> nn.Module:
    """Draws every kept weight of each masked Conv2d/Linear with variance ``gain / max(1, fan)``, the fan counted
    from the mask (Evci et al. 2022, "unit scaled" init); pruned weights become exactly 0, biases stay.

    ``fan``: ``"in"`` (kept weights into the weight's output unit), ``"out"`` (kept weights out of its input
    unit) or ``"avg"`` (their mean, per weight). ``distribution``: ``"normal"`` N(0, var) or ``"uniform"``
    U(-sqrt(3 var), sqrt(3 var)). The default, gain 2 on fan-in, is He's ReLU init on the sparse network.
    The values are drawn on the CPU from ``generator`` (a CPU ``torch.Generator``; None: the global RNG), so
    they do not depend on the model's device. In place; returns ``model``.
    """
    if fan not in FANS:
        raise ValueError(f"fan must be one of {FANS}, got {fan!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if (not isinstance(gain, numbers.Real) or isinstance(gain, bool) or not math.isfinite(gain)
            or not gain > 0):
        raise ValueError(f"gain must be a positive finite number, got {gain!r}")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        got = f"a {generator.device} generator" if isinstance(generator, torch.Generator) else type(generator).__name__
        raise TypeError(f"generator must be a CPU torch.Generator (the draw is made on the CPU), got {got}")
    for _, weight, mask in masked_layers(model, masks):
        mask = mask.cpu()
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        std = (float(gain) / _fan(mask, fan).clamp(min=1)).sqrt()
        if distribution == "normal":
            noise = torch.randn(weight.shape, generator=generator, dtype=dtype)
        else:  # same variance: U(-a, a) has variance a^2 / 3
            noise = torch.empty(weight.shape, dtype=dtype).uniform_(-1, 1, generator=generator)
            std = std * math.sqrt(3)
        value = (noise * std.to(dtype)).masked_fill_(~mask, 0)
        weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
    return model


@torch.no_grad()
def layer_scaled_init_(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """The baseline of Evci et al. 2022: each masked Conv2d/Linear keeps its current (dense) initialisation,
    divided by sqrt(density) of its layer (kept / total), which restores the layer's mean fan; pruned weights
    become exactly 0, biases stay. A layer with no kept weight becomes all zero. In place; returns ``model``.
    """
    for _, weight, mask in masked_layers(model, masks):
        mask = mask.to(weight.device)
        kept = int(mask.sum())
        if kept == 0:
            weight.zero_()
            continue
        weight.copy_(weight * mask / math.sqrt(kept / mask.numel()))
    return model


def apply_init_(name: str, model: nn.Module, masks: Mapping[str, Tensor],
                generator: torch.Generator | None = None) -> nn.Module:
    """Applies the init ``name`` (one of :data:`INITS`): ``"unit_scaled"`` / ``"unit_scaled_fan_out"`` /
    ``"unit_scaled_fan_avg"`` are :func:`unit_scaled_init_` (normal, gain 2) on fan in / out / avg;
    ``"layer_scaled"`` is :func:`layer_scaled_init_` (``generator`` unused: it rescales the current weights)."""
    if name not in INITS:
        raise ValueError(f"init name must be one of {INITS}, got {name!r}")
    if name == "layer_scaled":
        return layer_scaled_init_(model, masks)
    fan = {"unit_scaled": "in", "unit_scaled_fan_out": "out", "unit_scaled_fan_avg": "avg"}[name]
    return unit_scaled_init_(model, masks, fan=fan, distribution="normal", gain=2.0, generator=generator)
