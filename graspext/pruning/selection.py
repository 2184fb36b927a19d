"""From scores to masks: global or per-layer selection that removes an exact number of weights."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from graspext import _extension, ops


class LayerCollapseWarning(UserWarning):
    """A layer lost every weight: the network is disconnected there."""


def num_to_remove(total: int, sparsity: float) -> int:
    # The epsilon absorbs float error in products such as N * 0.98 without changing exact cases.
    return min(total, math.floor(total * sparsity + 1e-6))


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):  # numpy scalars are numbers too
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity}")
    return float(sparsity)


def _on_selection_device(scores: list[Tensor]) -> list[Tensor]:
    """Selection runs where a kernel exists: scores on a device without one are ranked on the CPU."""
    dev = scores[0].device
    if dev.type == "cpu" or (dev.type == "cuda" and _extension.has_cuda_kernel("global_kth_value")):
        return scores
    return [s.cpu() for s in scores]


def select_masks(scores: Sequence[Tensor], num_remove: int, remove_largest: bool) -> tuple[list[Tensor], list[int]]:
    """Masks removing exactly ``num_remove`` of all scores taken together, and the kept count per tensor."""
    device = scores[0].device
    flat = _on_selection_device([s.detach().contiguous() for s in scores])
    if flat[0].dtype not in ops.scores.SCORE_DTYPES:
        flat = [s.float() for s in flat]
    total = sum(s.numel() for s in flat)
    if num_remove == 0:
        # Still reject non-finite scores: a NaN must never pass silently.
        ops.global_kth_value(flat, 1)
        return [torch.ones_like(s, dtype=torch.bool, device=device) for s in scores], [s.numel() for s in scores]
    k = total - num_remove + 1 if remove_largest else num_remove
    threshold = ops.global_kth_value(flat, k)
    masks, kept = ops.masks_from_threshold(flat, threshold, num_remove, remove_largest)
    # The masks' own counts must match the kernel's and the request (one copy to the host for both): a
    # kernel fault raises here instead of handing out a wrong mask.
    counted, kept = torch.stack([torch.stack([m.sum() for m in masks]), kept.to(masks[0].device)]).cpu()
    if not torch.equal(counted, kept) or int(kept.sum()) != total - num_remove:
        raise RuntimeError(f"mask selection kept {counted.tolist()} (kernel reported {kept.tolist()}) where "
                           f"{total - num_remove} of {total} scores should stay; this is a bug in graspext")
    return [m.to(device) for m in masks], [int(c) for c in kept.tolist()]


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel layer densities (Evci et al. 2020, RigL's sparsity_distribution "erk").

    density_l ∝ sum(shape_l) / prod(shape_l), scaled so that the kept total matches ``density``; layers
    whose density would exceed 1 are made dense and the rest rescaled.
    """
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        rhs = sum(n * density for i, n in enumerate(sizes) if i not in dense)
        rhs -= sum(n * (1 - density) for i, n in enumerate(sizes) if i in dense)
        divisor = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        if divisor == 0:
            break
        eps = rhs / divisor
        free = [i for i in range(len(sizes)) if i not in dense]
        max_raw = max(raw[i] for i in free)
        if max_raw * eps > 1:
            dense.update(i for i in free if raw[i] == max_raw)
            if len(dense) == len(sizes):
                break
        else:
            break
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(sizes))]


def layer_removals(sizes: Sequence[int], densities: Sequence[float], total_remove: int,
                   minimum: Sequence[int] | None = None) -> list[int]:
    """Per-layer removal counts near n_l * (1 - d_l) that add up to exactly ``total_remove``.

    Largest-remainder rounding; dense layers (d_l = 1) stay untouched and no layer goes below zero kept.
    ``minimum`` (iterative pruning: what each layer has already lost) is a floor per layer.
    """
    minimum = list(minimum) if minimum is not None else [0] * len(sizes)
    ideal = [n * (1.0 - d) for n, d in zip(sizes, densities)]
    scale = total_remove / sum(ideal) if sum(ideal) > 0 else 0.0
    ideal = [min(float(n), x * scale) for n, x in zip(sizes, ideal)]
    counts = [max(math.floor(x), lo) for x, lo in zip(ideal, minimum)]
    short = total_remove - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order:
        if short <= 0:
            break
        if densities[i] < 1.0 and counts[i] < sizes[i]:
            counts[i] += 1
            short -= 1
    # Layers capped at empty can leave more to remove: take it from the others' spare weights, largest first.
    for i in sorted(range(len(sizes)), key=lambda i: (-(sizes[i] - counts[i]), i)):
        if short <= 0:
            break
        if densities[i] < 1.0:
            extra = min(short, sizes[i] - counts[i])
            counts[i] += extra
            short -= extra
    # Floors can overshoot: give back where a layer is above both its floor and its ideal share.
    for i in sorted(range(len(sizes)), key=lambda i: (ideal[i] - counts[i], i)):
        if short >= 0:
            break
        give = min(-short, counts[i] - minimum[i])
        counts[i] -= give
        short += give
    if short != 0:  # only when every non-dense layer is already empty, or floors exceed the total
        raise ValueError(f"sparsity: cannot remove {total_remove} weights with this distribution")
    return counts


def report_collapse(names: Sequence[str], kept: Sequence[int], on_collapse: str) -> list[str]:
    collapsed = [n for n, k in zip(names, kept) if k == 0]
    if collapsed and on_collapse != "ignore":
        msg = (f"layer collapse: {len(collapsed)} layer(s) lost every weight and disconnect the network: "
               f"{', '.join(collapsed)}")
        if on_collapse == "raise":
            raise RuntimeError(msg)
        warnings.warn(msg, LayerCollapseWarning, stacklevel=3)
    return collapsed
