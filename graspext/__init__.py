"""graspext: pruning at initialization (GraSP, SNIP, SynFlow, magnitude, random) on fused C++/CUDA kernels.

    import graspext as gx
    masks = gx.prune(model, "grasp", sparsity=0.98, data=train_loader)
    masks.summary()
    sparse = gx.sparsify(model, masks)      # Conv2d/Linear -> layers that compute only kept weights
    gx.train(sparse, train_loader, test_loader, epochs=160)

Dynamic sparse training: ``gx.train(model, train_loader, test_loader, masks=gx.dst.initial_masks(model, 0.9),
dst=gx.dst.RigL())``.
"""

from graspext import _extension

_C = _extension.load()

from graspext import callbacks, dst, models, nn, ops  # noqa: E402
from graspext.masks import Masks  # noqa: E402
from graspext.nn import densify, sparsify, sparsity_report  # noqa: E402
from graspext.pruning import METHODS, LayerCollapseWarning, prune, scores  # noqa: E402
from graspext.train import TrainConfig, Trainer, TrainResult, train  # noqa: E402
from graspext.version import __version__  # noqa: E402

__all__ = ["prune", "scores", "sparsify", "densify", "sparsity_report", "train", "Trainer", "TrainConfig",
           "TrainResult", "Masks", "METHODS", "LayerCollapseWarning", "ops", "models", "nn", "dst", "callbacks",
           "__version__"]
