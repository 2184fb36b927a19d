"""Per-layer forward+backward: graspext's sparse kernels against dense torch (oneDNN/MKL), in float32 and
bfloat16 (the kernels on bfloat16 activations; dense under CPU autocast in channels_last), and for Linear
against torch.sparse CSR; every distinct conv of VGG19- and ResNet32-CIFAR at batch 128; and BatchNorm+ReLU,
torch's modules against graspext's fused op, at VGG19's shapes.

Run: python -m pytest benchmarks/test_sparse_layers.py --benchmark-group-by=group
"""

import pytest

from sparse_workloads import BATCH_NORM_SHAPES, MODELS, SPARSITIES, BatchNormCase, ConvCase, LinearCase, conv_layers

CONVS = [(m, key) for m in MODELS for key in conv_layers(m)]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("model_name,key", CONVS, ids=[f"{m}:{k}" for m, k in CONVS])
@pytest.mark.parametrize("impl", ["dense", "sparse", "dense_bf16", "sparse_bf16"])
def test_conv_layer(benchmark, model_name, key, sparsity, impl):
    case = ConvCase(model_name, key, sparsity)
    benchmark.group = f"conv {key} at {sparsity:.0%}"
    benchmark.pedantic(getattr(case, impl), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("impl", ["dense", "sparse", "torch_csr"])
def test_linear_4096(benchmark, sparsity, impl):
    case = LinearCase(sparsity)
    benchmark.group = f"linear 4096x4096 batch 256 at {sparsity:.0%}"
    benchmark.pedantic(getattr(case, impl), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("channels,size", BATCH_NORM_SHAPES)
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_batch_norm_relu(benchmark, channels, size, impl):
    case = BatchNormCase(channels, size)
    benchmark.group = f"BatchNorm+ReLU {channels}x{size}x{size} batch 128"
    benchmark.pedantic(getattr(case, impl), rounds=5, warmup_rounds=1)
