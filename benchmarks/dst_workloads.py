"""Workloads of the dynamic-sparse-training benchmarks: a RigL run's steps, graspext's and rigl-torch's.

A RigL run with updates every ``DELTA_T`` steps costs, per step on average, ``static + (update - static) /
DELTA_T``: ``static`` is an ordinary sparse step (forward, backward, SGD with momentum) and ``update`` an update
iteration (forward, backward with the dense weight gradient, the mask update; as in TF1 RigL no optimizer step).
Both are timed here on the same model at CIFAR shapes, batch BATCH, from ERK masks with the first layer dense
(RigL's setting). rigl-torch (PyPI) computes densely with masks; its steps are timed with ``delta=2``, so its
calls alternate between ordinary and update iterations.
"""

from __future__ import annotations

import copy
import functools
import types

import torch
import torch.nn.functional as F
from sparse_workloads import BATCH, model

import graspext as gx
from graspext.dst import RigL, initial_masks

DELTA_T = 100


@functools.cache
def erk_masks(model_name: str, sparsity: float) -> gx.Masks:
    return initial_masks(model(model_name), sparsity, "erk", seed=0)


def _batch(device: str = "cpu"):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(BATCH, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (BATCH,), generator=g).to(device))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


class RigLStepCase:
    """graspext: the sparsified model and the RigL callback, driven through the trainer's events."""

    def __init__(self, model_name: str, sparsity: float, amp: bool = False):
        self.x, self.y = _batch()
        self.amp = amp
        masks = erk_masks(model_name, sparsity)
        self.model = gx.sparsify(copy.deepcopy(model(model_name)).train(), masks,
                                 dtype=torch.bfloat16 if amp else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        layers = {f"{n}.weight": m for n, m in self.model.named_modules()
                  if isinstance(m, (gx.nn.SparseConv2d, gx.nn.SparseLinear))}
        # The attributes of graspext.train.Trainer that the callback reads.
        self.trainer = types.SimpleNamespace(masks=masks, sparse_layers=layers, mask_handle=None,
                                             optimizer=self.optimizer, scaler=None, global_step=0,
                                             total_steps=10**9)
        self.callback = RigL(frequency=DELTA_T, end_step=10**9 - 1).callback()
        self.callback.on_fit_start(self.trainer)

    def _forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(self.x)
        F.cross_entropy(logits.float(), self.y).backward()

    def static_step(self) -> None:
        self._forward_backward()
        self.optimizer.step()

    def forward_backward(self) -> None:
        """An ordinary forward and backward, without the optimizer step."""
        self._forward_backward()

    def dense_grad_forward_backward(self) -> None:
        """Forward and backward with every sparse layer's dense gradient requested (and read)."""
        for layer in self.trainer.sparse_layers.values():
            layer.request_dense_grad()
        self._forward_backward()
        for layer in self.trainer.sparse_layers.values():
            layer.dense_grad()

    def update_step(self) -> None:
        """An update iteration at step 0 of the schedule (the largest drop fraction, 0.3)."""
        self.trainer.global_step = 0
        self.callback.schedule.last_update = -DELTA_T
        self.callback.on_train_batch_start(self.trainer, self.x, self.y)
        self._forward_backward()
        skipped = self.callback.on_after_backward(self.trainer)
        assert skipped
        self.callback.on_train_batch_end(self.trainer, None)


class RigLTorchCase:
    """rigl-torch on the same model and masks' densities (ERK, first layer dense, the Linear layer sparse)."""

    def __init__(self, model_name: str, sparsity: float, amp: bool = False, channels_last: bool = False):
        from rigl_torch_peer import rigl_torch_step

        x, y = _batch()
        self.model = copy.deepcopy(model(model_name)).train()
        torch.manual_seed(0)
        self._step = rigl_torch_step(self.model, 1.0 - sparsity, 2, 10**9, x, y, lr=0.01, amp_bf16=amp,
                                     channels_last=channels_last, distribution="erk", ignore_linear_layers=False)
        self.calls = 0

    def step(self) -> bool:
        """One call; True when it was an update iteration (every second call)."""
        self._step()
        self.calls += 1
        return self.calls % 2 == 0
