"""Workloads of the lottery benchmarks: the train step at the density of each IMP round.

Round r trains at density 0.8^r (20 % of the remaining weights pruned per round) with the first convolution and
the classifier dense, as Ma et al.'s configs. The masks here are global magnitude masks of the initial weights,
standing in for IMP's masks of trained weights: the step time depends on the layer densities, which IMP's masks
distribute similarly (both are global magnitude rankings). Round 0 is the dense model, trained as the trainer
trains it without masks; later rounds train as the trainer's ``kernels="auto"`` does: through
``graspext.sparsify`` once the cost model predicts the sparse layers to pay, as masked dense weights before.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sparse_workloads import model

import graspext as gx
from graspext.lottery import dense_masks, prune_to


class IMPRoundCase:
    def __init__(self, model_name: str, round_index: int, batch: int = 64, rate: float = 0.2):
        net = copy.deepcopy(model(model_name)).train()
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(batch, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.density = (1 - rate) ** round_index
        self.runs_as = "dense"
        if round_index > 0:
            full = dense_masks(net, keep_first_dense=True, keep_last_dense=True)
            masks = prune_to(net, full, max(1, int(full.num_kept() * self.density)))
            self.density = masks.density()
            # As the trainer's kernels="auto": sparse layers only where the cost model predicts them to pay,
            # masked dense weights (a gradient hook per layer) otherwise.
            if gx.nn.predicted_saving(net, masks) >= gx.nn.convert.AUTO_MIN_SAVING:
                net = gx.sparsify(net, masks)
                layers = gx.sparsity_report(net)
                self.runs_as = f"sparsify, {sum(r.mode == 'sparse' for r in layers)}/{len(layers)} layers sparse"
            else:
                self.runs_as = "masked dense"
                self.mask_handle = masks.apply_(net)
        self.model = net
        self.opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
