"""Thin Python wrappers over ``torch.ops.graspext``: validation, fake (meta) kernels for ``torch.compile``.

The operators and their schemas are declared once in ``csrc/ops/*.cpp``; the CPU and CUDA kernels live in
``csrc/ops/cpu`` and ``csrc/ops/cuda``.
"""

from graspext.ops.batch_norm import batch_norm_relu
from graspext.ops.scores import global_kth_value, masks_from_threshold, score_accumulate_
from graspext.ops.sparse import cpu_isa, sparse_conv2d, sparse_linear
from graspext.ops.topagg import topagg, topagg_votes

__all__ = ["score_accumulate_", "global_kth_value", "masks_from_threshold", "sparse_conv2d", "sparse_linear",
           "cpu_isa", "batch_norm_relu", "topagg", "topagg_votes"]
