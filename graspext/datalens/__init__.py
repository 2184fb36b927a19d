"""DataLens (Wang et al., CCS 2021): differentially private data generation with TopAgg.

- :mod:`.trainer`: :class:`DataLens`, the teachers and the generator trained from TopAgg votes, with resume;
- :mod:`.models`: the official conditional DCGAN generator and the batched :class:`TeacherEnsemble`;
- :mod:`.privacy`: :class:`TopAggAccountant` (Opacus RDP);
- :mod:`.data`: MNIST / Fashion-MNIST IDX files, the embedded digits, disjoint class-balanced teacher shares;
- :mod:`.evaluate`: utility, a classifier trained on generated samples and tested on real data;
- :mod:`.config` and :mod:`.cli`: shipped configs and ``graspext datalens train | generate | evaluate``.

The TopAgg operator itself is ``graspext.ops.topagg``.
"""

from graspext.datalens.config import DataLensConfig, EvaluationConfig, list_datalens_configs, load_datalens_config
from graspext.datalens.data import IDXDataset, class_balanced_partition, digits_images, load_images, read_idx
from graspext.datalens.evaluate import EvaluationCNN, utility
from graspext.datalens.models import Generator, TeacherEnsemble
from graspext.datalens.privacy import DEFAULT_DELTA, TopAggAccountant
from graspext.datalens.trainer import DataLens, DataLensCallback, DataLensResult, load_trained

__all__ = ["DEFAULT_DELTA", "DataLens", "DataLensCallback", "DataLensConfig", "DataLensResult", "EvaluationCNN",
           "EvaluationConfig", "Generator", "IDXDataset", "TeacherEnsemble", "TopAggAccountant",
           "class_balanced_partition", "digits_images", "list_datalens_configs", "load_datalens_config",
           "load_images", "load_trained", "read_idx", "utility"]
