"""GraSP scoring of VGG19-CIFAR at the CIFAR-10 config (100 images, 98 % sparsity): the official loop
(re-implemented in graspext.testing.official, with its own selection) vs graspext's engines.

Run: python -m pytest benchmarks/test_grasp_scoring.py
"""

import pytest

from workloads import differences_from_official, grasp_graspext, grasp_official, vgg19_cifar_setup


@pytest.fixture(scope="module")
def setup():
    return vgg19_cifar_setup()


@pytest.mark.parametrize("impl", ["official", "exact", "forward_over_reverse", "finite_difference"])
def test_grasp_vgg19_cifar(benchmark, setup, impl):
    model, x, y = setup
    benchmark.group = "GraSP scoring, VGG19-CIFAR, 100 images"
    if impl == "official":
        benchmark.pedantic(grasp_official, args=(model, x, y), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(grasp_graspext, args=(model, x, y), kwargs={"engine": impl}, rounds=3, warmup_rounds=1)


def test_exact_masks_identical_to_official(setup):
    model, x, y = setup
    ours = grasp_graspext(model, x, y)
    ref = grasp_official(model, x, y)
    assert differences_from_official(ours, ref) == (1, 0)  # only the official `<=` threshold weight
