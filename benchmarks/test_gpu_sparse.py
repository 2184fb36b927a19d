"""GPU benchmarks of the sparse layers (skipped without CUDA): per-layer forward+backward for every distinct
conv of VGG19- and ResNet32-CIFAR at batch 128 and Linear 4096x4096 at batch 256, graspext's CUDA kernels
against dense cuDNN/cuBLAS with PyTorch's defaults (TF32 convolutions) and with strict FP32, and against
torch.sparse CSR (cuSPARSE) for Linear; and the end-to-end train step, sparse against dense.

Every timed call ends with torch.cuda.synchronize(). The sparse modules use the CUDA kernels only with
GRASPEXT_CUDA_SPARSE=1 (they are still slower than cuDNN end to end); this file sets it.

Run: python -m pytest benchmarks/test_gpu_sparse.py --benchmark-group-by=group
"""

import contextlib
import os

import pytest
import torch

import graspext as gx

from sparse_workloads import MODELS, SPARSITIES, ConvCase, LinearCase, StepCase, conv_layers

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


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("model_name,key", CONVS, ids=[f"{m}:{k}" for m, k in CONVS])
@pytest.mark.parametrize("impl", ["dense_tf32", "dense_fp32", "sparse"])
def test_conv_layer_cuda(benchmark, model_name, key, sparsity, impl):
    case = ConvCase(model_name, key, sparsity)
    _to_cuda(case)
    benchmark.group = f"CUDA conv {key} at {sparsity:.0%}"
    with strict_fp32(impl == "dense_fp32"):
        fn = _synchronized(case.sparse if impl == "sparse" else case.dense)
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
def test_train_step_cuda(benchmark, model_name, sparsity, policy):
    """Every pruned layer on the sparse kernels ("all-sparse"), or each on whichever of the sparse kernels and
    cuDNN ran its forward+backward faster on this GPU (``policy="measure"``; the choices go to extra_info)."""
    case = StepCase(model_name, sparsity, device="cuda", policy=policy)
    if sparsity is not None:
        report = gx.nn.sparsity_report(case.model)
        benchmark.extra_info["sparse_layers"] = sum(r.mode == "sparse" for r in report)
        benchmark.extra_info["layers"] = len(report)
    benchmark.group = f"CUDA train step {model_name}"
    benchmark.pedantic(_synchronized(case.step), rounds=20, warmup_rounds=3)
