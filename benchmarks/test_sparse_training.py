"""End-to-end training step (forward, backward, SGD) of VGG19 and ResNet32 on CIFAR shapes at batch 128:
the GraSP-pruned network through graspext.sparsify against its dense twin, in float32 and under CPU bfloat16
autocast (dense: channels_last, oneDNN's bfloat16 path), and SparseProp on the same masked network.

Run: python -m pytest benchmarks/test_sparse_training.py --benchmark-group-by=group
"""

import importlib.util

import pytest

from sparse_workloads import MODELS, StepCase

CONFIGS = {  # name: (StepCase options, applies to the dense model, applies to the pruned model)
    "fp32": ({}, True, True),
    "bf16": ({"amp": True}, False, True),
    "bf16_channels_last": ({"amp": True, "channels_last": True}, True, False),
    "sparseprop": ({"library": "sparseprop"}, False, True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("sparsity", [None, 0.90, 0.95, 0.98], ids=["dense", "90%", "95%", "98%"])
def test_train_step(benchmark, model_name, sparsity, config):
    options, dense_ok, pruned_ok = CONFIGS[config]
    if not (dense_ok if sparsity is None else pruned_ok):
        pytest.skip(f"{config} is not a configuration of the {'dense' if sparsity is None else 'pruned'} model")
    if config == "sparseprop" and importlib.util.find_spec("sparseprop") is None:
        pytest.skip("sparseprop is not installed (pip install sparseprop)")
    case = StepCase(model_name, sparsity, **options)
    benchmark.group = f"train step {model_name}"
    benchmark.pedantic(case.step, rounds=5, warmup_rounds=3)
