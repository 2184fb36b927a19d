"""``Masks``: keep-masks keyed by parameter name, with reporting, persistence and enforcement."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from graspext._io import atomic_write

_FORMAT = "graspext.masks"
_FORMAT_VERSION = 1


def _split_param_name(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


class _MaskedGrad:
    """The gradient hook of one masked weight: zeroes the pruned positions, and keeps the unmasked gradient
    when a dense gradient was requested."""

    def __init__(self, mask: Tensor):
        self.mask = mask
        self.capture = False
        self.dense_grad: Tensor | None = None

    def __call__(self, grad: Tensor) -> Tensor:
        if self.capture:
            g = grad.detach().clone()
            self.dense_grad = g if self.dense_grad is None else self.dense_grad + g
        return grad * self.mask


@dataclass
class MaskHandle:
    """Returned by :meth:`Masks.apply_`: the masked dense weights it enforces.

    ``remove()`` detaches the gradient hooks (weights stay pruned). :meth:`set_mask_` moves a weight to a new mask
    (dynamic sparse training) and :meth:`request_dense_grad` / :meth:`dense_grad` give the gradient at every
    position, pruned ones included.
    """

    hooks: list[Any] = field(default_factory=list)
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    grads: dict[str, _MaskedGrad] = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def mask(self, name: str) -> Tensor:
        """The mask the hooks enforce now for parameter ``name`` (a copy)."""
        return self._grad(name).mask.clone()

    def _grad(self, name: str) -> _MaskedGrad:
        if name not in self.grads:
            raise KeyError(f"name: {name!r} is not a masked parameter of this handle (it has "
                           f"{', '.join(self.grads) or 'none'})")
        return self.grads[name]

    @torch.no_grad()
    def set_mask_(self, name: str, mask: Tensor, optimizer: torch.optim.Optimizer | None = None, *,
                  reinit: Tensor | None = None, grown_values: Tensor | None = None) -> int:
        """Moves the masked weight ``name`` to ``mask`` (same shape, same kept count), as
        :meth:`graspext.nn.SparseConv2d.set_mask_` does for a sparse layer.

        Weights kept by both masks keep their value and optimizer state; newly kept ones (and ``reinit``
        positions) start at zero (or ``grown_values``) with zero state; dropped ones become zero with zero state,
        so that momentum cannot move them. Returns the number of weights that started fresh.
        """
        hook, param = self._grad(name), self.params[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != param.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {name}'s {tuple(param.shape)}")
        kept, old = int(mask.sum()), int(hook.mask.sum())
        if kept != old:
            raise ValueError(f"mask keeps {kept} weights but {name} keeps {old}: set_mask_ moves connections, it "
                             "never changes their number")
        mask = mask.to(param.device)
        fresh = mask & ~hook.mask
        if reinit is not None:
            if not isinstance(reinit, Tensor) or reinit.dtype != torch.bool or reinit.shape != param.shape:
                raise ValueError(f"reinit must be a bool tensor of shape {tuple(param.shape)}")
            fresh |= mask & reinit.to(param.device)
        cleared = fresh | ~mask  # positions whose value and state restart from zero
        tensors = [param] + ([param.grad] if param.grad is not None else [])
        if optimizer is not None:
            tensors += [v for v in optimizer.state.get(param, {}).values()
                        if isinstance(v, Tensor) and v.shape == param.shape]
        for t in tensors:
            t.masked_fill_(cleared, 0)
        if grown_values is not None:
            param[fresh] = grown_values.to(device=param.device, dtype=param.dtype)[fresh]
        hook.mask.copy_(mask)
        return int(fresh.sum())

    def request_dense_grad(self, name: str) -> None:
        """Makes the next backward keep ``name``'s gradient at every position (before the mask zeroes it)."""
        hook = self._grad(name)
        if not self.params[name].requires_grad:
            raise RuntimeError(f"{name} does not require grad, so there is no gradient to yield")
        hook.capture, hook.dense_grad = True, None

    def dense_grad(self, name: str) -> Tensor:
        """dL/dW of ``name`` at every position, from the backward after :meth:`request_dense_grad`."""
        hook = self._grad(name)
        if hook.dense_grad is None:
            raise RuntimeError(f"{name}: no dense gradient was captured; call request_dense_grad({name!r}) and run "
                               "a forward and backward first")
        grad, hook.dense_grad, hook.capture = hook.dense_grad, None, False
        return grad


class Masks(Mapping[str, Tensor]):
    """A mapping from parameter name (``"features.0.weight"``) to a bool tensor, True where the weight is kept.

    ``meta`` holds how the masks were made (method, sparsity, options) and is saved with them.
    """

    def __init__(self, masks: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None):
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping from parameter name to bool tensor, got {type(masks).__name__}")
        self._masks: dict[str, Tensor] = {}
        for name, m in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"masks keys must be parameter names (str), got {name!r}")
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                got = m.dtype if isinstance(m, Tensor) else type(m).__name__
                raise TypeError(f"masks[{name!r}] must be a bool tensor, got {got}")
            self._masks[name] = m
        self.meta: dict[str, Any] = dict(meta or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    # Counts
    def num_kept(self) -> int:
        return sum(int(m.sum()) for m in self._masks.values())

    def num_total(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def density(self) -> float:
        """Fraction of the masked weights that are kept."""
        total = self.num_total()
        return self.num_kept() / total if total else 1.0

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def layer_densities(self) -> dict[str, float]:
        return {n: (float(m.float().mean()) if m.numel() else 1.0) for n, m in self._masks.items()}

    def collapsed_layers(self) -> list[str]:
        """Layers with no weight left: the network is disconnected there (layer collapse)."""
        return [n for n, m in self._masks.items() if m.numel() and not bool(m.any())]

    def summary(self) -> str:
        """A table of per-layer kept/total and density, with the total, as text."""
        rows = [("layer", "shape", "kept", "total", "density")]
        for n, m in self._masks.items():
            kept = int(m.sum())
            flag = "  <- collapsed" if m.numel() and kept == 0 else ""
            rows.append((n, "x".join(map(str, m.shape)), str(kept), str(m.numel()),
                         f"{kept / max(m.numel(), 1):.4f}{flag}"))
        rows.append(("total", "", str(self.num_kept()), str(self.num_total()), f"{self.density():.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                         + "  " + r[4])
            if i == 0 or i == len(rows) - 2:
                lines.append("-" * (sum(widths) + 8 + 14))
        method = self.meta.get("method")
        head = f"graspext masks ({method}, sparsity {self.sparsity():.4f})" if method else "graspext masks"
        return head + "\n" + "\n".join(lines)

    def __repr__(self) -> str:
        return f"Masks({len(self)} layers, density={self.density():.4f}, meta={self.meta})"

    def to(self, device: torch.device | str) -> Masks:
        return Masks({n: m.to(device) for n, m in self._masks.items()}, self.meta)

    # Persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes atomically: a crash mid-write never leaves a file that looks complete."""
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "meta": self.meta,
                   "masks": {n: m.cpu() for n, m in self._masks.items()}}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Masks:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no masks file at {path!r}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise ValueError(f"path: {path!r} is not a readable graspext masks file ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"path: {path!r} is not a graspext masks file (missing format tag)")
        if payload.get("version") != _FORMAT_VERSION:
            raise ValueError(f"path: {path!r} has masks format version {payload.get('version')}, "
                             f"this graspext reads version {_FORMAT_VERSION}")
        return cls(payload["masks"], payload.get("meta"))

    # Model interaction
    def check_fits(self, model: nn.Module) -> None:
        """Raises ValueError naming the first mask that has no parameter, or the wrong shape, in ``model``."""
        params = dict(model.named_parameters())
        for name, m in self._masks.items():
            if name not in params:
                raise ValueError(f"masks: {name!r} is not a parameter of the model")
            if tuple(params[name].shape) != tuple(m.shape):
                raise ValueError(f"masks: {name!r} has shape {tuple(m.shape)} but the model's parameter has "
                                 f"{tuple(params[name].shape)}")

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> MaskHandle:
        """Zeroes the pruned weights of ``model`` in place and keeps them exactly zero during training.

        A gradient hook zeroes their gradients, so SGD (with momentum and weight decay), Adam and AdamW leave
        them at zero when the optimizer state starts fresh. Returns a handle whose ``remove()`` drops the hooks.
        """
        self.check_fits(model)
        params = dict(model.named_parameters())
        handle = MaskHandle()
        for name, m in self._masks.items():
            p = params[name]
            mask = m.to(device=p.device, copy=True)  # the handle's own: set_mask_ changes it, not these masks
            p.mul_(mask)
            hook = _MaskedGrad(mask)
            handle.params[name], handle.grads[name] = p, hook
            if p.requires_grad:
                handle.hooks.append(p.register_hook(hook))
        return handle

    def to_torch_prune(self, model: nn.Module) -> nn.Module:
        """Applies the masks with ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` + ``weight_mask``)."""
        self.check_fits(model)
        for name, m in self._masks.items():
            module_name, attr = _split_param_name(name)
            module = model.get_submodule(module_name)
            torch_prune.custom_from_mask(module, attr, m.to(getattr(module, attr).device))
        return model

    @classmethod
    def from_torch_prune(cls, model: nn.Module) -> Masks:
        """Reads the masks of every ``torch.nn.utils.prune`` reparametrization in ``model``."""
        masks = {}
        for module_name, module in model.named_modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    attr = hook._tensor_name
                    mask = getattr(module, attr + "_mask")
                    masks[f"{module_name}.{attr}" if module_name else attr] = mask.detach().bool().clone()
        if not masks:
            raise ValueError("model: it has no torch.nn.utils.prune masks")
        return cls(masks, {"source": "torch.nn.utils.prune"})
