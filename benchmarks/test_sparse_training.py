"""End-to-end training step (forward, backward, SGD) of VGG19 and ResNet32 on CIFAR shapes at batch 128:
the GraSP-pruned network through graspext.sparsify against its dense twin.

Run: python -m pytest benchmarks/test_sparse_training.py --benchmark-group-by=group
"""

import pytest

from sparse_workloads import MODELS, StepCase


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("sparsity", [None, 0.90, 0.95, 0.98], ids=["dense", "90%", "95%", "98%"])
def test_train_step(benchmark, model_name, sparsity):
    case = StepCase(model_name, sparsity)
    benchmark.group = f"train step {model_name}"
    benchmark.pedantic(case.step, rounds=5, warmup_rounds=1)
