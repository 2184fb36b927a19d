"""The curvature engine on VGG19-CIFAR (batch 64, eval mode): one Hessian-vector product by double backward
against the frozen-activation finite difference, dense and over the kept weights of 98 % masks, and an SLQ probe
of 10 Lanczos steps. ``ratios.py --analysis`` prints the same figures with SLQ's peak memory.

Run: python -m pytest benchmarks/test_analysis.py --benchmark-group-by=group
"""

import pytest
from analysis_workloads import HVPCase, vgg19_curvature


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked98"])
@pytest.mark.parametrize("engine", ["exact", "finite_difference"])
def test_hvp(benchmark, engine, masked):
    case = HVPCase(engine, masked)
    benchmark.group = f"HVP VGG19-CIFAR {'98 % masks' if masked else 'dense'}"
    benchmark.pedantic(case.step, rounds=5, warmup_rounds=1)


def test_slq_probe(benchmark):
    curvature = vgg19_curvature("exact")
    benchmark.group = "SLQ VGG19-CIFAR"
    benchmark.pedantic(lambda: curvature.spectral_density(probes=1, steps=10), rounds=2, warmup_rounds=0)
