"""Sparse layers that compute only their kept weights, and the conversion of whole models."""

from graspext.nn.convert import (
    BREAK_EVEN_DENSITY,
    COMPACT_MIN_SAVING,
    CONV_BREAK_EVEN_BY_WIDTH,
    LayerChoice,
    break_even_density,
    densify,
    format_sparsity_report,
    planned_modes,
    predicted_saving,
    sparsify,
    sparsity_report,
)
from graspext.nn.layout import is_batch_innermost, to_batch_innermost
from graspext.nn.modules import SparseConv2d, SparseLinear
from graspext.nn.pattern import SparsePattern

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "SparsePattern",
    "sparsify",
    "densify",
    "sparsity_report",
    "format_sparsity_report",
    "planned_modes",
    "predicted_saving",
    "LayerChoice",
    "BREAK_EVEN_DENSITY",
    "CONV_BREAK_EVEN_BY_WIDTH",
    "break_even_density",
    "COMPACT_MIN_SAVING",
    "is_batch_innermost",
    "to_batch_innermost",
]
