"""GPU benchmarks of the scoring ops (skipped without CUDA): global selection over 20 M / 138 M / 1 B scores
against torch.kthvalue and torch.topk on the concatenation, and GraSP scoring of VGG19-CIFAR (100 images)
and ResNet50 at ImageNet resolution (128 synthetic images) against the official loop, each engine of graspext
(the exact one also with its double backward replayed as a CUDA graph).

Every timed call ends with torch.cuda.synchronize(); peak memory is torch.cuda.max_memory_allocated() above
what was allocated before the call, stored in each benchmark's extra_info.

Run: python -m pytest benchmarks/test_gpu_scoring.py --benchmark-group-by=group
"""

import copy

import pytest
import torch

from workloads import differences_from_official, grasp_graspext, grasp_official, vgg19_cifar_setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIZES = {"20M": 20_035_200, "138M": 138_357_544, "1B": 1_000_000_000}


def _timed_with_peak(benchmark, fn, *args, rounds=5, **kwargs):
    """Benchmarks fn (synchronized) and records the peak GPU memory one call adds."""
    def call():
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    benchmark.extra_info["peak_added_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    return out


@pytest.fixture(scope="module", params=list(SIZES))
def scores(request):
    total = SIZES[request.param]
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.linspace(1, 4, 16)
    sizes = (weights / weights.sum() * total).long()
    sizes[-1] += total - int(sizes.sum())
    tensors = [torch.randn(int(n), generator=g, device="cuda") for n in sizes]
    yield tensors, int(total * 0.98)
    del tensors
    torch.cuda.empty_cache()


def _kth_graspext(s, k):
    from graspext import ops
    return ops.global_kth_value(s, k)


def _kth_torch(s, k):
    return torch.kthvalue(torch.cat([t.flatten() for t in s]), k).values


def _topk_torch(s, k):
    flat = torch.cat([t.flatten() for t in s])
    return torch.topk(flat, flat.numel() - k + 1).values.min()  # the k-th smallest as the smallest kept


@pytest.mark.parametrize("impl", ["graspext", "torch.kthvalue(cat)", "torch.topk(cat)"])
def test_global_kth_value_cuda(benchmark, scores, impl):
    s, k = scores
    benchmark.group = f"CUDA global k-th value over {sum(t.numel() for t in s) / 1e6:.0f}M scores"
    fn = {"graspext": _kth_graspext, "torch.kthvalue(cat)": _kth_torch, "torch.topk(cat)": _topk_torch}[impl]
    try:
        got = _timed_with_peak(benchmark, fn, s, k)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} does not fit in GPU memory at this size")
    if impl != "graspext":
        assert got.item() == _kth_graspext(s, k).item()


@pytest.fixture(scope="module")
def vgg19_cuda():
    model, x, y = vgg19_cifar_setup()
    return model.cuda(), x.cuda(), y.cuda()


@pytest.fixture(scope="module")
def resnet50_cuda():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.arange(128, device="cuda") % 1000
    x = torch.randn(128, 3, 224, 224, generator=g, device="cuda")
    return model, x, y


IMPLS = ["official", "exact", "exact_cuda_graphs", "forward_over_reverse", "finite_difference"]


def _grasp(impl, model, x, y):
    if impl == "official":
        return grasp_official(model, x, y)
    if impl == "exact_cuda_graphs":  # the double backward captured once and replayed per chunk
        return grasp_graspext(model, x, y, engine="exact", cuda_graphs=True)
    return grasp_graspext(model, x, y, engine=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_grasp_vgg19_cifar_cuda(benchmark, vgg19_cuda, impl):
    benchmark.group = "CUDA GraSP scoring, VGG19-CIFAR, 100 images"
    _timed_with_peak(benchmark, _grasp, impl, *vgg19_cuda, rounds=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_grasp_resnet50_imagenet_cuda(benchmark, resnet50_cuda, impl):
    benchmark.group = "CUDA GraSP scoring, ResNet50, 128 images at 224x224"
    _timed_with_peak(benchmark, _grasp, impl, *resnet50_cuda, rounds=3)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_exact_masks_identical_to_official_cuda(vgg19_cuda, monkeypatch, cuda_graphs):
    """In float64 with deterministic cuDNN: float32 runs TF32 convolutions by default, and no two different
    programs (the official loop and graspext) round alike there, so near-threshold weights would flip."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, x, y = vgg19_cuda
    model, x = copy.deepcopy(model).double(), x.double()  # a copy: the fixture is shared
    ours = grasp_graspext(model, x, y, cuda_graphs=cuda_graphs)
    ref = grasp_official(model, x, y)
    assert differences_from_official(ours, ref) == (1, 0)  # only the official `<=` threshold weight


def test_1b_fits_where_the_concatenation_does_not():
    """With this process's GPU memory capped at the 1 B scores plus 1.5 GiB (graspext's stash is n/8 values,
    0.5 GiB), the concatenation alone (4 GiB) runs out of memory and graspext still selects exactly."""
    total = SIZES["1B"]
    g = torch.Generator(device="cuda").manual_seed(1)
    scores = [torch.randn(total // 16, generator=g, device="cuda") for _ in range(16)]
    k = int(total // 16 * 16 * 0.98)
    want = _topk_torch(scores, k).item()  # uncapped
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    capacity = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 1.5 * 2**30) / capacity)
    try:
        assert _kth_graspext(scores, k).item() == want
        with pytest.raises(torch.OutOfMemoryError):
            _topk_torch(scores, k)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del scores
        torch.cuda.empty_cache()
