"""DataLens (Wang et al., CCS 2021): differentially private data generation with TopAgg.

Built so far: the TopAgg operator (``graspext.ops.topagg``), its privacy accounting (:mod:`.privacy`) and the data
side (:mod:`.data`: MNIST/Fashion-MNIST IDX files, the embedded digits, disjoint class-balanced teacher shares).
"""

from graspext.datalens.data import IDXDataset, class_balanced_partition, digits_images, read_idx
from graspext.datalens.privacy import DEFAULT_DELTA, TopAggAccountant

__all__ = ["DEFAULT_DELTA", "IDXDataset", "TopAggAccountant", "class_balanced_partition", "digits_images",
           "read_idx"]
