"""Data-parallel train step, dense against sparse, side by side in one run: median step time and bytes per step.

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step.py [--model vgg19_bn] [--repeats 10]

The same script runs on N GPUs (``--device cuda``: NCCL, one GPU per process). The cases (see
distributed_workloads.py) are built on every rank and timed interleaved, round by round, so that machine noise
falls on all of them alike; rank 0 prints the medians (of rank 0's step times; DDP keeps the ranks in step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_workloads import CASES, DDPStepCase
from ratios import machine

from graspext.distributed import init_from_env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="vgg19_bn")
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--batch", type=int, default=128, help="the global batch")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", help="also write the figures here (rank 0)")
    args = p.parse_args()
    if not init_from_env("nccl" if args.device == "cuda" else "gloo"):
        raise SystemExit("run under torchrun with --nproc-per-node >= 2")
    import torch.distributed as dist

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if args.device == "cuda" else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    names = args.cases.split(",")
    cases = {n: DDPStepCase(n, args.model, args.sparsity, args.batch, device) for n in names}
    for case in cases.values():  # warm-up: allocators, oneDNN primitives, DDP's bucket rebuild
        case.step()
        case.step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for n, case in cases.items():
            dist.barrier()
            start = time.perf_counter()
            case.step()
            times[n].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        where = torch.cuda.get_device_name() if args.device == "cuda" else machine()
        print(f"{args.model}, {args.sparsity:.0%} GraSP masks, global batch {args.batch}, {world} processes "
              f"({dist.get_backend()}), {where}, {args.repeats} interleaved rounds")
        print("| case | median step (ms) | vs dense | vs dense bf16 channels_last | bytes per step per rank |")
        print("| --- | ---: | ---: | ---: | ---: |")
        med = {n: statistics.median(t) for n, t in times.items()}
        rows = []
        def ratio(ref: str, n: str) -> str:
            return f"{med[ref] / med[n]:.2f}x" if ref in med else "-"

        for n in names:
            mb = cases[n].bytes_per_step
            print(f"| {n} | {1000 * med[n]:.1f} | {ratio('dense', n)} | {ratio('dense_bf16_channels_last', n)} | "
                  f"{mb / 1e6:.3f} MB |")
            rows.append({"case": n, "median_s": med[n], "bytes_per_step": mb, "times_s": times[n]})
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "sparsity": args.sparsity, "world": world,
                                                   "backend": dist.get_backend(), "machine": where,
                                                   "rows": rows}, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
