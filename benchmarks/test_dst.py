"""RigL on the sparse kernels: the ordinary step, the update iteration (dense gradient + mask update), and
rigl-torch (PyPI, dense compute with masks) on the same model, VGG19 and ResNet32 at CIFAR shapes, batch 128,
ERK masks with the first layer dense. A RigL run's mean step is ``static + (update - static) / 100``;
``ratios.py --dst`` prints it with the dense baselines.

Run: python -m pytest benchmarks/test_dst.py --benchmark-group-by=group
"""

import pytest
from dst_workloads import RigLStepCase, RigLTorchCase
from rigl_torch_peer import rigl_torch_available
from sparse_workloads import MODELS

SPARSITIES = pytest.mark.parametrize("sparsity", [0.90, 0.95, 0.98], ids=["90%", "95%", "98%"])


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["static_step", "update_step", "dense_grad_forward_backward", "forward_backward"])
@pytest.mark.parametrize("model_name", MODELS)
@SPARSITIES
def test_graspext_rigl(benchmark, model_name, sparsity, kind, amp):
    case = RigLStepCase(model_name, sparsity, amp=amp)
    benchmark.group = f"RigL {model_name} {sparsity:.0%}"
    benchmark.pedantic(getattr(case, kind), rounds=5, warmup_rounds=2)


@pytest.mark.parametrize("config", [{}, {"amp": True, "channels_last": True}], ids=["fp32", "bf16_channels_last"])
@pytest.mark.parametrize("model_name", MODELS)
@SPARSITIES
def test_rigl_torch_step_pair(benchmark, model_name, sparsity, config):
    """One ordinary and one update iteration of rigl-torch (delta=2): compare with static_step + update_step."""
    if not rigl_torch_available():
        pytest.skip("rigl-torch is not installed (pip install --no-deps rigl-torch)")
    case = RigLTorchCase(model_name, sparsity, **config)
    benchmark.group = f"RigL {model_name} {sparsity:.0%}"

    def pair():
        case.step()
        case.step()
    benchmark.pedantic(pair, rounds=5, warmup_rounds=1)
