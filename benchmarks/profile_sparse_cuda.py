"""Where a sparse layer's forward + backward spends its time on the GPU: per-kernel device time (torch.profiler)
of graspext's CUDA kernels against cuDNN for a few VGG19/ResNet32 layers at 98 % sparsity, batch 128.

Run: GRASPEXT_CUDA_SPARSE=1 python benchmarks/profile_sparse_cuda.py
"""

import os

import torch
from torch.profiler import ProfilerActivity, profile

os.environ["GRASPEXT_CUDA_SPARSE"] = "1"
from sparse_workloads import ConvCase  # noqa: E402  (after the switch above)

LAYERS = [("vgg19_bn", "64->64 k3 s1 32x32"), ("vgg19_bn", "512->512 k3 s1 4x4"),
          ("resnet32_grasp", "32->64 k1 s2 32x32")]


def main(sparsity: float = 0.98, rows: int = 12) -> None:
    from test_gpu_sparse import _to_cuda

    for model_name, key in LAYERS:
        case = ConvCase(model_name, key, sparsity)
        _to_cuda(case)
        for name, fn in (("sparse", case.sparse), ("dense", case.dense)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows,
                                              max_name_column_width=70)
            print(f"\n##### {model_name} {key} at {sparsity:.0%}, {name}, 10 calls\n{table}")


if __name__ == "__main__":
    main()
