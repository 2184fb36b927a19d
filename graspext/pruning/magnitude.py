"""Data-free baselines: magnitude (score |theta|) and random (uniform scores); the smallest are removed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from graspext.pruning.base import Method, ScoringContext, check_int, register, score_dtype, seeded_generator


@dataclass
class MagnitudeOptions:
    pass


@dataclass
class RandomOptions:
    seed: int | None = None

    def __post_init__(self):
        check_int(self.seed, "seed", 0, allow_none=True)


def _weights(ctx: ScoringContext) -> list[Tensor]:
    return [m.weight.detach() for m in ctx.modules.values()]


@register
class Magnitude(Method):
    name = "magnitude"
    needs_data = False
    Options = MagnitudeOptions

    def score(self, ctx: ScoringContext) -> list[Tensor]:
        scores = [w.abs().to(score_dtype(w)) for w in _weights(ctx)]
        if ctx.masks is not None:
            scores = [s * ctx.masks[n].to(s.device) for s, n in zip(scores, ctx.names)]
        return scores


@register
class Random(Method):
    name = "random"
    needs_data = False
    Options = RandomOptions

    def score(self, ctx: ScoringContext) -> list[Tensor]:
        weights = _weights(ctx)
        gen = seeded_generator(self.options.seed)
        if gen is None:
            return [torch.rand(w.shape, dtype=score_dtype(w), device=w.device) for w in weights]
        return [torch.rand(w.shape, generator=gen, dtype=score_dtype(w)).to(w.device) for w in weights]
