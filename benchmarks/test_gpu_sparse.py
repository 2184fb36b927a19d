"""GPU benchmarks of the sparse layers (skipped without CUDA): per-layer forward+backward for every distinct
conv of VGG19- and ResNet32-CIFAR at batch 128 and Linear 4096x4096 at batch 256, graspext's CUDA kernels
against dense cuDNN/cuBLAS with PyTorch's defaults (TF32 convolutions) and with strict FP32, against cuDNN on the
live channels only ("compact"), and against torch.sparse CSR (cuSPARSE) for Linear; and the end-to-end train
step, sparse against dense, eager and as a captured CUDA graph; and BatchNorm2d+ReLU at ResNet-50's ImageNet shapes
in the three layouts.

Every timed call ends with torch.cuda.synchronize(). The sparse modules use the CUDA kernels only with
GRASPEXT_CUDA_SPARSE=1 (they are still slower than cuDNN end to end); this file sets it.

Run: python -m pytest benchmarks/test_gpu_sparse.py --benchmark-group-by=group
"""

import contextlib
import os

import pytest
import torch

import graspext as gx

from sparse_workloads import (BATCH_NORM_SHAPES_IMAGENET, MODELS, SPARSITIES, BatchNormCase, ConvCase, LinearCase,
                              StepCase, conv_layers, step_to_time)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
os.environ["GRASPEXT_CUDA_SPARSE"] = "1"

CONVS = [(m, key) for m in MODELS for key in conv_layers(m)]


@contextlib.contextmanager
def strict_fp32(enabled: bool):
    """PyTorch's defaults allow TF32 in cuDNN convolutions; strict FP32 turns it off (and for matmuls)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if enabled:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()
    return call


def _to_cuda(case) -> None:
    for name, value in list(vars(case).items()):
        if isinstance(value, torch.Tensor):
            moved = value.detach().cuda()  # keeps the strides (batch-innermost stays so)
            if value.requires_grad:
                moved.requires_grad_()
            setattr(case, name, moved)
    if hasattr(case, "pattern"):
        case.pattern = case.pattern.to("cuda")
    if hasattr(case, "compact_layer"):
        case.compact_layer.cuda()


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("model_name,key", CONVS, ids=[f"{m}:{k}" for m, k in CONVS])
@pytest.mark.parametrize("impl", ["dense_tf32", "dense_fp32", "sparse", "compact_tf32"])
def test_conv_layer_cuda(benchmark, model_name, key, sparsity, impl):
    """``compact_tf32``: cuDNN on the live channels only (dead channels dropped; extra_info has their counts)."""
    case = ConvCase(model_name, key, sparsity)
    _to_cuda(case)
    benchmark.group = f"CUDA conv {key} at {sparsity:.0%}"
    benchmark.extra_info["dead_output_channels"], benchmark.extra_info["dead_input_channels"] = case.dead_channels
    with strict_fp32(impl == "dense_fp32"):
        fn = _synchronized({"sparse": case.sparse, "compact_tf32": case.compact}.get(impl, case.dense))
        benchmark.pedantic(fn, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("impl", ["dense_tf32", "dense_fp32", "sparse", "torch_csr"])
def test_linear_4096_cuda(benchmark, sparsity, impl):
    case = LinearCase(sparsity)
    _to_cuda(case)
    benchmark.group = f"CUDA linear 4096x4096 batch 256 at {sparsity:.0%}"
    with strict_fp32(impl == "dense_fp32"):
        fn = {"sparse": case.sparse, "torch_csr": case.torch_csr}.get(impl, case.dense)
        benchmark.pedantic(_synchronized(fn), rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("sparsity,policy", [(None, None), (0.95, "sparse"), (0.98, "sparse"), (0.95, "measure"),
                                             (0.98, "measure")],
                         ids=["dense", "95%-all-sparse", "98%-all-sparse", "95%-measured", "98%-measured"])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
def test_train_step_cuda(benchmark, model_name, sparsity, policy, graphs):
    """Every pruned layer on the sparse kernels ("all-sparse"), or each on whichever of the sparse kernels, cuDNN
    and cuDNN on the live channels ran its forward+backward fastest on this GPU (``policy="measure"``; the
    choices go to extra_info); eager, and replayed as one captured CUDA graph."""
    case = StepCase(model_name, sparsity, device="cuda", policy=policy)
    if sparsity is not None:
        report = gx.nn.sparsity_report(case.model)
        for mode in ("sparse", "compact"):
            benchmark.extra_info[f"{mode}_layers"] = sum(r.mode == mode for r in report)
        benchmark.extra_info["layers"] = len(report)
    benchmark.group = f"CUDA train step {model_name}" + (" (CUDA graph)" if graphs else "")
    step = step_to_time(case, graphs)
    benchmark.pedantic(_synchronized(step), rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("channels,size", BATCH_NORM_SHAPES_IMAGENET, ids=[f"{c}x{s}x{s}" for c, s in
                                                                        BATCH_NORM_SHAPES_IMAGENET])
@pytest.mark.parametrize("impl", ["torch", "torch_channels_last", "batch_innermost", "batch_innermost_fused"])
def test_batch_norm_relu_cuda(benchmark, monkeypatch, channels, size, impl):
    """BatchNorm2d+ReLU in training mode at ResNet-50's ImageNet shapes, batch 256: torch on NCHW and channels_last
    against the sparse layers' batch-innermost layout, through torch's kernels and through graspext's fused CUDA
    op (GRASPEXT_CUDA_FUSED_BN=1): the measurement that decides whether the fused op becomes the default."""
    monkeypatch.setenv("GRASPEXT_CUDA_FUSED_BN", "1" if impl == "batch_innermost_fused" else "0")
    case = BatchNormCase(channels, size, batch=256, device="cuda")
    benchmark.group = f"CUDA BatchNorm2d+ReLU {channels}x{size}x{size} batch 256"
    fn = {"torch": case.torch, "torch_channels_last": case.torch_channels_last}.get(impl, case.fused)
    benchmark.pedantic(_synchronized(fn), rounds=20, warmup_rounds=3)
