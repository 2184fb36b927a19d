"""Why sparse networks train or fail: curvature (Hessian products, Lanczos, SLQ spectra), gradient flow and the
pruning limit."""

from graspext.analysis.curvature import Curvature, SpectralDensity, lanczos
from graspext.analysis.gradflow import (
    GradientFlow,
    default_alphas,
    distance_to_init,
    interpolate,
    masked_gradient_norms,
)
from graspext.analysis.limit import (
    L1Regularization,
    PruningLimit,
    actual_limit,
    gaussian_width,
    one_shot_sweep,
    predicted_limit,
    pruning_limit,
)

__all__ = ["Curvature", "GradientFlow", "L1Regularization", "PruningLimit", "SpectralDensity", "actual_limit",
           "default_alphas", "distance_to_init", "gaussian_width", "interpolate", "lanczos", "masked_gradient_norms",
           "one_shot_sweep", "predicted_limit", "pruning_limit"]
