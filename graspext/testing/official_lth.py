"""An independent numpy re-implementation of the pruning step of Ma et al.'s official code
(boone891214/sanity-check-LTH, ``cifar/``), for tests.

What a round of the official IMP does, as ``main_prune_train.py --imp`` runs it:

- train; reload the checkpoint of best test accuracy;
- ``prune_harden`` to the cumulative global sparsity ``s = round(1 - (1 - imp_ratio) ** (round + 1), 3)``:
  ``update_prune_ratio`` takes ``T = np.percentile(|w|, 100 s)`` over every prunable weight (the zeros of pruned
  ones included), turns it into each layer's ratio ``mean(|w_l| < T)`` (capped at 0.99 where it reaches 0.999),
  and ``weight_pruning`` keeps ``|w_l| > np.percentile(|w_l|, 100 ratio_l)`` in each layer;
- the next round's mask is the non-zero pattern of those hardened weights, and training restarts from the saved
  initialisation (the lottery ticket; ``--retrain-mask-pattern=pre_defined``).

The prunable layers come from ``profiles/resnet20_LTH/irregular/resnet_global.yaml``: every convolution but the
first, no classifier. Two quirks are reproduced as functions but not by graspext: the 0.99 cap (graspext reports a
collapsed layer instead, see ``on_collapse``), and ``generate_mask`` leaving a layer unmasked when its mask is under
10 % sparse (``official_masked_layers``), which makes layers dense again in early rounds.
"""

from __future__ import annotations

import numpy as np

# The prunable weights of graspext.models.resnet20 under the official profile's names (graspext calls the
# downsampling convolutions ``shortcut.0``, the official model ``downsample.0``).
RESNET20_PRUNABLE = [f"layer{s}.{b}.conv{c}.weight" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]
RESNET20_PRUNABLE += ["layer2.0.shortcut.0.weight", "layer3.0.shortcut.0.weight"]


def official_round_sparsity(round_index: int, imp_ratio: float) -> float:
    """The global sparsity the official IMP prunes to at the end of round ``round_index`` (0 = the dense one)."""
    return float(np.round(1 - (1 - imp_ratio) ** (round_index + 1), 3))


def official_layer_ratios(weights: dict[str, np.ndarray], global_sparsity: float) -> dict[str, float]:
    """``update_prune_ratio``: one global percentile turned into per-layer pruning ratios."""
    everything = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    threshold = np.percentile(everything, global_sparsity * 100)
    ratios = {}
    for name, w in weights.items():
        ratio = float(np.sum(np.abs(w) < threshold)) / w.size
        ratios[name] = 0.99 if ratio >= 0.999 else ratio
    return ratios


def official_layer_mask(w: np.ndarray, prune_ratio: float) -> np.ndarray:
    """``weight_pruning`` (irregular): keeps the weights above the layer's percentile, ties at it pruned."""
    if prune_ratio == 0.0:  # prune_weight returns the weight untouched: its zeros stay, the rest is kept
        return w != 0
    if prune_ratio >= 0.99999:
        return np.zeros(w.shape, dtype=bool)
    magnitude = np.abs(w)
    return magnitude > np.percentile(magnitude, prune_ratio * 100)


def official_harden(weights: dict[str, np.ndarray], global_sparsity: float) -> dict[str, np.ndarray]:
    """``prune_harden`` with ``--sp-global-weight-sparsity``: the masks (True = kept) of the hardened weights.

    ``weights`` are the prunable layers' trained weights with their pruned positions already zero.
    """
    ratios = official_layer_ratios(weights, global_sparsity)
    return {name: official_layer_mask(w, ratios[name]) & (w != 0) for name, w in weights.items()}


def official_masked_layers(masks: dict[str, np.ndarray]) -> list[str]:
    """``generate_mask``: the layers the next round masks; one under 10 % sparse trains dense instead."""
    return [name for name, m in masks.items() if 1 - m.sum() / m.size >= 0.1]
