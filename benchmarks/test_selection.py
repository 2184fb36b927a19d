"""Global selection: graspext's radix k-th value over a list vs torch.kthvalue on the concatenation.

Run: python -m pytest benchmarks/test_selection.py --benchmark-group-by=param:total
"""

import pytest

from workloads import kth_graspext, kth_torch, selection_scores

SIZES = {"20M (VGG19-CIFAR)": 20_035_200, "138M (VGG16-ImageNet)": 138_357_544}


@pytest.fixture(scope="module", params=list(SIZES), ids=list(SIZES))
def scores(request):
    total = SIZES[request.param]
    return selection_scores(total), int(total * 0.98)


@pytest.mark.parametrize("impl", ["graspext", "torch.kthvalue(cat)"])
def test_global_kth_value(benchmark, scores, impl):
    s, k = scores
    fn = kth_graspext if impl == "graspext" else kth_torch
    benchmark.group = f"global k-th value over {sum(t.numel() for t in s) / 1e6:.0f}M scores"
    benchmark.pedantic(fn, args=(s, k), rounds=5 if impl == "graspext" else 3, warmup_rounds=1)
