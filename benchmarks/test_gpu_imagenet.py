"""GPU benchmarks at ImageNet shapes (skipped without CUDA; workloads in imagenet_workloads.py): ResNet-50 at
batch 256 and VGG16 at batch 64, 224x224, GraSP masks at 90 / 95 / 98 %.

- Per layer (every distinct convolution, forward+backward): dense cuDNN under PyTorch's defaults (TF32) and under
  bfloat16 autocast with channels_last, the configuration a user would pick; graspext's sparse kernels in
  float32 and under bfloat16 autocast (float32 accumulation); cuDNN on the live channels only ("compact", TF32
  and bfloat16). ``gpu_report.py`` turns the JSON into the table of the fastest mode per layer and its ratio to
  the best dense configuration.
- Train steps (forward, backward, SGD): dense TF32 and dense bfloat16 channels_last, against the sparse model
  with each layer's mode measured (``policy="measure"``) in float32 and under bfloat16 autocast; eager and as one
  captured CUDA graph.

Every timed call ends with torch.cuda.synchronize(). Run (or through run_gpu.sh's imagenet-* stages):
    python -m pytest benchmarks/test_gpu_imagenet.py -k "resnet50 and layer" --benchmark-json out.json
    python benchmarks/gpu_report.py out.json
"""

import functools

import pytest
import torch

import graspext as gx

import imagenet_workloads as W
from sparse_workloads import ConvCase, step_to_time

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _cuda_sparse_kernels(monkeypatch):
    monkeypatch.setenv("GRASPEXT_CUDA_SPARSE", "1")  # the sparse modules may pick the CUDA kernels where faster


LAYER_IMPLS = ("dense_tf32", "dense_bf16_cl", "sparse", "sparse_bf16", "compact_tf32", "compact_bf16")
CONVS = [(name, key) for name, w in W.WORKLOADS.items() for key in W.conv_layers(w)]
# Test ids name the layers that carry the per-layer target ("target"), so that -k can pick them out.
CONV_IDS = [f"{m}:{k}" + (":target" if k in W.largest_stage_3x3(W.WORKLOADS[m]) else "") for m, k in CONVS]


DEVICE = "cuda"  # tests/benchmarks runs these functions on the CPU at a small scale


def _synchronized(fn):
    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return call


@functools.lru_cache(maxsize=1)  # one layer's tensors at a time: the impls of a layer run one after another
def _case(model_name: str, key: str, sparsity: float) -> ConvCase:
    return W.conv_case(W.WORKLOADS[model_name], key, sparsity, DEVICE)


# The impl varies fastest (pytest exhausts the top decorator first), so each layer is built once per sparsity.
@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("sparsity", W.SPARSITIES)
@pytest.mark.parametrize("model_name,key", CONVS, ids=CONV_IDS)
def test_layer(benchmark, model_name, key, sparsity, impl):
    case = _case(model_name, key, sparsity)
    benchmark.group = f"{model_name} layer {key} at {sparsity:.0%}"
    benchmark.extra_info.update(model=model_name, layer=key, sparsity=sparsity, impl=impl, density=case.density,
                                dense_macs=case.dense_macs, sparse_macs=case.sparse_macs,
                                dead_output_channels=case.dead_channels[0], dead_input_channels=case.dead_channels[1],
                                largest_stage_3x3=key in W.largest_stage_3x3(W.WORKLOADS[model_name]))
    fn = {"dense_tf32": case.dense, "dense_bf16_cl": case.dense_bf16, "sparse": case.sparse,
          "sparse_bf16": case.sparse_bf16, "compact_tf32": case.compact, "compact_bf16": case.compact_bf16}[impl]
    benchmark.pedantic(_synchronized(fn), rounds=10, warmup_rounds=2)


STEPS = [("dense_tf32", None, False, False), ("dense_bf16_cl", None, True, True)]
STEPS += [(f"sparse_{s:g}", s, False, False) for s in W.SPARSITIES]
STEPS += [(f"sparse_bf16_{s:g}", s, True, False) for s in W.SPARSITIES]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("config,sparsity,amp,channels_last", STEPS, ids=[s[0] for s in STEPS])
@pytest.mark.parametrize("model_name", list(W.WORKLOADS))
def test_step(benchmark, model_name, config, sparsity, amp, channels_last, graphs):
    case = W.ImageNetStep(W.WORKLOADS[model_name], sparsity, DEVICE, amp=amp, channels_last=channels_last)
    benchmark.group = f"{model_name} train step" + (" (CUDA graph)" if graphs else "")
    benchmark.extra_info.update(model=model_name, config=config, sparsity=sparsity, graphs=graphs)
    if sparsity is not None:
        report = gx.nn.sparsity_report(case.model)
        benchmark.extra_info["modes"] = {mode: sum(r.mode == mode for r in report)
                                         for mode in sorted({r.mode for r in report})}
    step = step_to_time(case, graphs)
    benchmark.pedantic(_synchronized(step), rounds=10, warmup_rounds=3)
    del case, step
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
