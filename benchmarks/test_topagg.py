"""TopAgg at DataLens's scale: T = 4000 teachers, d = 784 (MNIST), 30 samples per generator step, k = 200,
the fused operator against the plain-torch reference (materialized votes). ``ratios.py --topagg`` prints the
ratio from interleaved medians.

Run: python -m pytest benchmarks/test_topagg.py --benchmark-group-by=group
"""

import pytest
import torch

from graspext.ops.topagg import topagg, topagg_reference

SAMPLES, TEACHERS, D, K, SIGMA, BETA = 30, 4000, 784, 200, 5000.0, 0.7


@pytest.fixture(scope="module")
def grads():
    return torch.randn(SAMPLES, TEACHERS, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("impl", [topagg, topagg_reference], ids=["fused", "reference"])
def test_topagg(benchmark, grads, impl):
    benchmark.group = f"TopAgg T={TEACHERS} d={D} S={SAMPLES} k={K}"
    benchmark.pedantic(lambda: impl(grads, K, 1.0, SIGMA, BETA, 0), rounds=3, warmup_rounds=1)
