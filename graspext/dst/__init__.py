"""Dynamic sparse training: RigL and SET on graspext's sparse layers, with masks that move during training.

``graspext.train(model, train, test, masks=graspext.dst.initial_masks(model, 0.9), dst=graspext.dst.RigL())``
trains a network that stays at the masks' sparsity for the whole run while its connections move every
``frequency`` steps. The layers compute only their kept weights; the dense gradient RigL grows by is computed on
update steps only. See :mod:`graspext.dst.schedule` and :mod:`graspext.dst.rule` for the official rules.
"""

from __future__ import annotations

from torch import nn

from graspext.dst.config import METHODS, SET, DynamicSparsity, RigL, from_dict
from graspext.masks import Masks

__all__ = ["INITS", "METHODS", "SET", "DynamicSparsity", "RigL", "from_dict", "initial_masks"]

INITS = ("erk", "uniform")


def initial_masks(model: nn.Module, sparsity: float, distribution: str = "erk", *, keep_first_dense: bool = True,
                  seed: int = 0, **prune_options) -> Masks:
    """Random masks to start dynamic sparse training from, as the official code draws them.

    ``distribution`` is ``"erk"`` (Erdős–Rényi-Kernel layer densities) or ``"uniform"``; each layer keeps exactly
    its count, at random positions. The first layer stays dense by default, as in the official configs. Any other
    graspext pruning method's masks (``graspext.prune("grasp", ...)``) can start a run as well.
    """
    from graspext.pruning import prune

    if distribution not in INITS:
        raise ValueError(f"distribution must be one of {INITS}, got {distribution!r}")
    masks = prune(model, "random", sparsity, scope="layerwise", distribution=distribution,
                  keep_first_dense=keep_first_dense, seed=seed, **prune_options)
    masks.meta["dst_init"] = distribution
    return masks
