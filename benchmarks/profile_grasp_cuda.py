"""Where a GraSP scoring call spends its time on the GPU: torch.profiler tables (by device time and by host
time) of the official loop and of graspext's engines on VGG19-CIFAR (100 images). Prints the tables and the
wall time of each, after a warm-up call of each.

Run: python benchmarks/profile_grasp_cuda.py [rows]
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from workloads import grasp_graspext, grasp_official, vgg19_cifar_setup


def main(rows: int = 25) -> None:
    model, x, y = vgg19_cifar_setup()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    runs = {"official": lambda: grasp_official(model, x, y),
            "exact": lambda: grasp_graspext(model, x, y),
            "finite_difference": lambda: grasp_graspext(model, x, y, engine="finite_difference")}
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        device_total = sum(e.self_device_time_total for e in averages) / 1e3
        print(f"\n##### {name}: wall {wall * 1e3:.1f} ms, device busy {device_total:.1f} ms, "
              f"{sum(e.count for e in averages if e.device_type.name == 'CUDA')} kernels")
        print(averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
