"""SynFlow: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020).

Data-free. On a copy with every parameter and buffer replaced by its absolute value (the official
``linearize``), R = sum of the network's output on an all-ones input; score S = |theta ⊙ dR/dtheta|; the
**smallest** scores are removed. Applied iteratively: 100 rounds by default, round k (1-based) keeping
density^(k/100) (exponential schedule), with BatchNorm in eval mode (official ``prune_loop``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from graspext import ops
from graspext.pruning import data as D
from graspext.pruning.base import (Method, ScoringContext, check_bool, masked_weights, register, working_copy,
                                   zeros_like_scores)


@dataclass
class SynflowOptions:
    input_shape: tuple[int, ...] | None = None   # one sample's shape, e.g. (3, 32, 32); else from data
    train_mode: bool = False
    double: bool = False                          # score in float64 (avoids overflow in very deep nets)

    def __post_init__(self):
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
                raise ValueError(f"input_shape must be a tuple of positive ints (one sample), got {self.input_shape!r}")
            self.input_shape = shape
        check_bool(self.train_mode, "train_mode")
        check_bool(self.double, "double")


@register
class SynFlow(Method):
    name = "synflow"
    needs_data = False
    default_rounds = 100
    Options = SynflowOptions

    def score(self, ctx: ScoringContext) -> list[Tensor]:
        o = self.options
        if o.input_shape is None and ctx.data is None:
            raise ValueError("data: SynFlow is data-free but needs the input shape: pass input_shape=(C, H, W) "
                             "or data to read it from")
        shape = o.input_shape or tuple(D.first_batch(ctx.data)[0].shape[1:])
        scores = self._score(ctx, shape, o.double)
        if not o.double and not all(bool(torch.isfinite(s).all()) for s in scores):
            # R is a sum of products of |theta| along every path: deep nets overflow float32.
            warnings.warn("SynFlow scores overflowed float32; scoring again in float64 (pass double=True to "
                          "skip the first attempt)", RuntimeWarning, stacklevel=3)
            scores = self._score(ctx, shape, True)
        return scores

    def _score(self, ctx: ScoringContext, shape: tuple[int, ...], double: bool) -> list[Tensor]:
        # A full copy: every parameter and buffer is made non-negative in place below.
        work, _ = working_copy(ctx, share_storage=False)
        if double:
            work.double()
        work.train(self.options.train_mode)
        with torch.no_grad():
            for t in list(work.parameters()) + list(work.buffers()):
                if t.is_floating_point():
                    t.abs_()
        weights = masked_weights(work, ctx)
        x = torch.ones((1, *shape), dtype=weights[0].dtype, device=weights[0].device)
        grads = torch.autograd.grad(work(x).sum(), weights)
        scores = zeros_like_scores(weights)
        ops.score_accumulate_(scores, [w.detach() for w in weights], list(grads), 1.0, "abs_product")
        return scores
