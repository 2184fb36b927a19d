"""Score operators: fused multi-tensor accumulation, exact global selection, exact-count masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from graspext import _extension

_extension.load()

SCORE_MODES = ("neg_product", "abs_product", "product")
SCORE_DTYPES = (torch.float32, torch.float64)


def _as_tensor_list(value, name: str) -> list[Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    out = list(value)
    if not out:
        raise ValueError(f"{name} must be a non-empty list of tensors")
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def _check_scores(scores: list[Tensor], name: str = "scores") -> None:
    dtype, device = scores[0].dtype, scores[0].device
    for i, s in enumerate(scores):
        if s.dtype not in SCORE_DTYPES:
            raise TypeError(f"{name}[{i}] must be float32 or float64, got {s.dtype}")
        if s.dtype != dtype:
            raise TypeError(f"{name}[{i}] has dtype {s.dtype} but {name}[0] has {dtype}; all must share one")
        if s.device != device:
            raise ValueError(f"{name}[{i}] is on {s.device} but {name}[0] is on {device}; all must share one")


def score_accumulate_(
    scores: Sequence[Tensor],
    weights: Sequence[Tensor],
    values: Sequence[Tensor],
    alpha: float = 1.0,
    mode: str = "neg_product",
) -> None:
    """In place, for every i: ``scores[i] += alpha * f(weights[i], values[i])``, in one call.

    ``mode`` picks f: ``"neg_product"`` is ``-w * v`` (GraSP's ``-theta * Hg``), ``"abs_product"`` is
    ``|w * v|`` (SNIP, SynFlow), ``"product"`` is ``w * v``. Scores are float32 or float64 and contiguous;
    weights and values may have any floating dtype and are computed in the score dtype.
    """
    scores = _as_tensor_list(scores, "scores")
    weights = _as_tensor_list(weights, "weights")
    values = _as_tensor_list(values, "values")
    _check_scores(scores)
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if len(weights) != len(scores) or len(values) != len(scores):
        raise ValueError(
            f"weights and values must have one tensor per score tensor: got {len(scores)} scores, "
            f"{len(weights)} weights, {len(values)} values"
        )
    for i, s in enumerate(scores):
        for name, t in (("weights", weights[i]), ("values", values[i])):
            if t.shape != s.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but scores[{i}] has {tuple(s.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be floating point, got {t.dtype}")
            if t.device != s.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but scores[{i}] is on {s.device}")
        if not s.is_contiguous():
            raise ValueError(f"scores[{i}] must be contiguous: it is updated in place")
    torch.ops.graspext.score_accumulate_(scores, weights, values, float(alpha), mode)


def global_kth_value(scores: Sequence[Tensor], k: int) -> Tensor:
    """The k-th smallest value (1-based) of all scores taken together, as a 0-dim tensor.

    Equals ``torch.kthvalue(torch.cat([s.flatten() for s in scores]), k).values`` without building the
    concatenation (radix selection over the list). Raises if any score is NaN or infinite.
    """
    scores = _as_tensor_list(scores, "scores")
    _check_scores(scores)
    total = sum(s.numel() for s in scores)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the total number of scores), got {k}")
    return torch.ops.graspext.global_kth_value(scores, k)


def masks_from_threshold(
    scores: Sequence[Tensor], threshold: Tensor, num_remove: int, remove_largest: bool = False
) -> tuple[list[Tensor], Tensor]:
    """Bool keep-masks removing exactly ``num_remove`` scores, and the kept count per tensor.

    Every score strictly beyond ``threshold`` (above it if ``remove_largest``, else below) is removed, then
    ties equal to ``threshold`` in global order (tensor index, then flat index) until ``num_remove`` are
    gone. ``threshold`` must be the matching order statistic (see :func:`global_kth_value`).
    """
    scores = _as_tensor_list(scores, "scores")
    _check_scores(scores)
    if not isinstance(threshold, Tensor):
        threshold = torch.tensor(threshold, dtype=scores[0].dtype, device=scores[0].device)
    if threshold.numel() != 1:
        raise ValueError(f"threshold must hold one value, got shape {tuple(threshold.shape)}")
    total = sum(s.numel() for s in scores)
    if isinstance(num_remove, bool) or not isinstance(num_remove, int):
        raise TypeError(f"num_remove must be an int, got {type(num_remove).__name__}")
    if not 0 <= num_remove <= total:
        raise ValueError(f"num_remove must be in [0, {total}], got {num_remove}")
    masks, kept = torch.ops.graspext.masks_from_threshold(scores, threshold, num_remove, bool(remove_largest))
    return list(masks), kept


# Fake kernels: shapes and dtypes only, so torch.compile / FakeTensor can trace the ops.
@torch.library.register_fake("graspext::score_accumulate_")
def _(scores, weights, values, alpha, score_mode):
    return None


@torch.library.register_fake("graspext::global_kth_value")
def _(scores, k):
    return scores[0].new_empty(())


@torch.library.register_fake("graspext::masks_from_threshold")
def _(scores, threshold, num_remove, remove_largest):
    masks = [torch.empty_like(s, dtype=torch.bool, memory_format=torch.contiguous_format) for s in scores]
    return masks, scores[0].new_empty((len(scores),), dtype=torch.long)
