"""The trainer callback that runs RigL/SET: it moves the masks of the model's sparse layers (or masked weights).

On an update step t it asks every layer for a dense gradient before the forward pass (RigL only), then, after
the backward pass (RigL, replacing the optimizer step) or after the step (SET), updates each layer by
:func:`graspext.dst.rule.drop_and_grow` and moves it with the layer's ``set_mask_``: the surviving weights keep
their values and optimizer state, the new ones start at ``grow_init`` with zero state.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from graspext.callbacks import Callback
from graspext.dst.config import DynamicSparsity, grow_init_parts
from graspext.dst.rule import drop_and_grow, stateless_generator
from graspext.dst.schedule import UpdateSchedule, drop_fraction, num_to_drop


class _SparseLayerTarget:
    """A SparseConv2d/SparseLinear, through its public pattern API."""

    def __init__(self, layer):
        self.layer = layer

    def mask(self) -> Tensor:
        return self.layer.mask()

    def weight(self) -> Tensor:
        return self.layer.dense_weight().detach()

    def request_dense_grad(self) -> None:
        self.layer.request_dense_grad()

    def dense_grad(self) -> Tensor:
        return self.layer.dense_grad()

    def set_mask_(self, mask, optimizer, reinit, grown_values) -> None:
        self.layer.set_mask_(mask, optimizer, reinit=reinit, grown_values=grown_values)

    def restore(self, mask: Tensor) -> None:
        # The model's state dict already carried the pattern; this only matters if it lost its metadata.
        if not torch.equal(mask.to(self.layer.values.device), self.layer.mask()):
            self.layer.set_mask_(mask.to(self.layer.values.device))


class _MaskedWeightTarget:
    """A masked dense weight, through :class:`graspext.masks.MaskHandle`."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name

    def mask(self) -> Tensor:
        return self.handle.mask(self.name)

    def weight(self) -> Tensor:
        return self.handle.params[self.name].detach()

    def request_dense_grad(self) -> None:
        self.handle.request_dense_grad(self.name)

    def dense_grad(self) -> Tensor:
        return self.handle.dense_grad(self.name)

    def set_mask_(self, mask, optimizer, reinit, grown_values) -> None:
        self.handle.set_mask_(self.name, mask, optimizer, reinit=reinit, grown_values=grown_values)

    def restore(self, mask: Tensor) -> None:
        # The weights and optimizer state were loaded as saved: only the enforced mask is set back.
        self.handle.grads[self.name].mask.copy_(mask.to(self.handle.grads[self.name].mask.device))


def _grow_values(config: DynamicSparsity, weight: Tensor, new_mask: Tensor, grad: Tensor | None,
                 gen: torch.Generator) -> Tensor | None:
    """The values new connections start at (None: zeros)."""
    kind, divisor = grow_init_parts(config.grow_init)
    if kind == "zeros":
        return None
    if kind == "grad_scale":
        return grad / divisor
    if kind == "grad_sign":
        return torch.sign(grad) / divisor
    active = weight[new_mask]  # the official reads the whole TF variable, stale pruned values included
    if kind == "random_normal":
        std = active.float().std() if active.numel() > 1 else torch.tensor(0.0)
        noise = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
        return (noise * std.double() / divisor).to(device=weight.device, dtype=weight.dtype)
    mean = active.abs().float().mean() if active.numel() else torch.tensor(0.0)
    uniform = torch.rand(weight.shape, generator=gen, dtype=torch.float64) * 2 - 1
    return (uniform * mean.double() / divisor).to(device=weight.device, dtype=weight.dtype)


class DynamicSparsityCallback(Callback):
    """Runs :class:`graspext.dst.RigL` / :class:`graspext.dst.SET` inside :class:`graspext.train.Trainer`."""

    def __init__(self, config: DynamicSparsity):
        self.config = config
        self.targets: dict[str, Any] = {}
        self.schedule: UpdateSchedule | None = None
        self.updates = 0
        self.changed_fractions: list[float] = []
        self.update_seconds = 0.0
        self._updating_now = False

    # ------------------------------------------------------------------ events
    def on_fit_start(self, trainer) -> None:
        c = self.config
        end_step = c.resolved_end_step(trainer.total_steps)
        self.schedule = UpdateSchedule(c.begin_step, end_step, c.frequency)
        # A fully dense (or empty) mask has no free position to grow into, so it never moves.
        names = [n for n, m in trainer.masks.items() if 0 < int(m.sum()) < m.numel()]
        if trainer.sparse_layers:
            self.targets = {n: _SparseLayerTarget(trainer.sparse_layers[n]) for n in names}
        elif trainer.mask_handle is not None:
            self.targets = {n: _MaskedWeightTarget(trainer.mask_handle, n) for n in names}
        else:
            raise ValueError("dst: the trainer has neither sparse layers nor masked weights to move")
        if not self.targets:
            raise ValueError("dst: the masks are empty; there is no sparse layer to move")

    def on_train_batch_start(self, trainer, inputs, targets) -> None:
        self._updating_now = self.schedule.is_update(trainer.global_step)
        if self._updating_now and self.config.uses_gradient:
            for target in self.targets.values():
                target.request_dense_grad()

    def on_after_backward(self, trainer) -> bool:
        if self._updating_now and self.config.update_replaces_step:
            self._update(trainer)
            return True
        return False

    def on_train_batch_end(self, trainer, loss) -> None:
        if self._updating_now and not self.config.update_replaces_step:
            self._update(trainer)
        self._updating_now = False

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        record["mask_updates"] = self.updates

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        summary["dst"] = self.config.to_dict()
        summary["mask_updates"] = self.updates
        summary["mean_changed_fraction"] = (sum(self.changed_fractions) / len(self.changed_fractions)
                                            if self.changed_fractions else 0.0)
        summary["mask_update_seconds"] = self.update_seconds

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def _update(self, trainer) -> None:
        start = time.perf_counter()
        c, step = self.config, trainer.global_step
        fraction = drop_fraction(step, c.drop_fraction, c.drop_fraction_anneal, self.schedule.begin_step,
                                 self.schedule.end_step)
        changed = active_total = 0
        for name, target in self.targets.items():
            mask, weight = target.mask(), target.weight()
            grad = target.dense_grad() if c.uses_gradient else None
            if grad is not None and trainer.scaler is not None:  # float16 loss scaling: the true gradient
                grad = grad / trainer.scaler.get_scale()
            if grad is not None:
                # Under DDP each rank holds its shard's gradient: grow by the global batch's, as one process would.
                grad = trainer.distributed.all_reduce_mean_(grad.contiguous())
            if c.uses_gradient:
                grow_score = grad.abs()
            else:
                grow_score = torch.rand(mask.shape, generator=stateless_generator(c.seed, name, step, "grow"),
                                        dtype=torch.float64).to(mask.device)
            n_active = int(mask.sum())
            noise = None
            if c.noise_std > 0:  # one draw per active weight, in flat-index order
                noise = torch.randn(n_active, generator=stateless_generator(c.seed, name, step, "drop"),
                                    dtype=torch.float64).mul_(c.noise_std)
            new_mask, grown = drop_and_grow(mask, weight, grow_score, num_to_drop(n_active, fraction), noise)
            reinit = grown & mask if c.reinit_when_same else None
            values = _grow_values(c, weight, new_mask, grad, stateless_generator(c.seed, name, step, "init"))
            target.set_mask_(new_mask, trainer.optimizer, reinit, values)
            changed += int((new_mask & ~mask).sum())
            active_total += n_active
        # Same scores and seeded draws give the same masks everywhere; verified, since a divergence would be silent.
        trainer.distributed.check_identical({n: t.mask() for n, t in self.targets.items()},
                                            f"masks after the {c.method} update at step {step}")
        self.schedule.done(step)
        self.updates += 1
        self.changed_fractions.append(changed / max(1, active_total))
        self.update_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "last_update": self.schedule.last_update,
                "updates": self.updates, "changed_fractions": list(self.changed_fractions),
                "update_seconds": self.update_seconds,
                "masks": {n: t.mask().cpu() for n, t in self.targets.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, current = state["config"], self.config.to_dict()
        changed = [k for k in current if saved.get(k) != current[k]]
        if changed:
            raise ValueError("the checkpoint's dynamic sparse training ran with "
                             + ", ".join(f"{k}={saved.get(k)!r}" for k in changed) + "; this run has "
                             + ", ".join(f"{k}={current[k]!r}" for k in changed)
                             + "; use the same dst settings, another out_dir, or resume=False")
        if set(state["masks"]) != set(self.targets):
            raise ValueError("the checkpoint's dynamic sparse training moved other layers than this run's masks")
        for name, mask in state["masks"].items():
            self.targets[name].restore(mask)
        self.schedule.last_update = state["last_update"]
        self.updates = state["updates"]
        self.changed_fractions = list(state["changed_fractions"])
        self.update_seconds = state["update_seconds"]
