"""SNIP: connection sensitivity (Lee, Ajanthan & Torr, ICLR 2019).

Score S = |theta ⊙ dL/dtheta|, equivalently |dL/dc| for a multiplicative mask c at c = 1; the **smallest**
scores are removed. As the public PyTorch ports: a deep copy whose pruned weights are re-initialized
Xavier-normal (``reinit=True``), one batch of data (or a class-balanced one with ``samples_per_class``),
cross-entropy loss, BatchNorm in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from graspext import ops
from graspext.pruning import data as D
from graspext.pruning.base import (Method, ScoringContext, check_bool, check_int, masked_weights, register,
                                   reinit_xavier, seeded_generator, working_copy, zeros_like_scores)


@dataclass
class SnipOptions:
    reinit: bool = True
    samples_per_class: int | None = None
    num_classes: int | None = None
    train_mode: bool = True
    seed: int | None = None

    def __post_init__(self):
        check_bool(self.reinit, "reinit")
        check_int(self.samples_per_class, "samples_per_class", 1, allow_none=True)
        check_int(self.num_classes, "num_classes", 2, allow_none=True)
        check_bool(self.train_mode, "train_mode")
        check_int(self.seed, "seed", 0, allow_none=True)


@register
class SNIP(Method):
    name = "snip"
    Options = SnipOptions

    def score(self, ctx: ScoringContext) -> list[Tensor]:
        o = self.options
        work, weights = working_copy(ctx)
        device, dtype = weights[0].device, weights[0].dtype
        if o.reinit:
            reinit_xavier(work, list(ctx.modules), seeded_generator(o.seed))
        weights = masked_weights(work, ctx)
        work.train(o.train_mode)
        if o.samples_per_class is not None:
            if D.is_pair(ctx.data):
                raise ValueError("data: an (inputs, targets) pair is used exactly as given; samples_per_class "
                                 "applies to a DataLoader only")
            num_classes = o.num_classes or D.infer_num_classes(work, ctx.data)
            x, y = D.class_balanced_batch(ctx.data, num_classes, o.samples_per_class)
        else:
            x, y = D.first_batch(ctx.data)
        x, y = D.to_model(x, y, device, dtype)
        # Data-parallel: each rank takes a contiguous share of the batch; its summed loss over the whole batch's
        # size adds up, over the ranks, to the batch's mean loss. (With train-mode BatchNorm each share is
        # normalised by its own statistics, as under DDP: set train_mode=False for the single-process scores.)
        n, d = x.shape[0], ctx.distributed
        if d.active:
            if n < d.world_size:
                raise ValueError(f"data: {n} scoring samples cannot be shared by {d.world_size} processes")
            lo, hi = d.rank * n // d.world_size, (d.rank + 1) * n // d.world_size
            x, y = x[lo:hi], y[lo:hi]
        out = work(x)
        D.check_logits(out, y)
        loss = F.cross_entropy(out, y, reduction="sum") / n if d.active else F.cross_entropy(out, y)
        grads = list(torch.autograd.grad(loss, weights, allow_unused=True))
        D.check_used(ctx.names, grads)
        grads = ctx.sum_over_ranks_(grads, weights)
        scores = zeros_like_scores(weights)
        ops.score_accumulate_(scores, [w.detach() for w in weights], list(grads), 1.0, "abs_product")
        return scores
