"""graspext: pruning at initialization (GraSP, SNIP, SynFlow, magnitude, random) on fused C++/CUDA kernels.

    import graspext as gx
    masks = gx.prune(model, "grasp", sparsity=0.98, data=train_loader)
    masks.summary()
"""

from graspext import _extension

_C = _extension.load()

from graspext import models, ops  # noqa: E402
from graspext.masks import Masks  # noqa: E402
from graspext.pruning import METHODS, LayerCollapseWarning, prune, scores  # noqa: E402
from graspext.train import TrainConfig, Trainer, TrainResult, train  # noqa: E402
from graspext.version import __version__  # noqa: E402

__all__ = ["prune", "scores", "train", "Trainer", "TrainConfig", "TrainResult", "Masks", "METHODS", "LayerCollapseWarning", "ops", "models", "__version__"]
