"""The 2-process DDP train step (gloo over loopback), dense against sparse, with the bytes each rank communicates
per step in ``extra_info``. This pytest process is rank 0; a spawned peer runs rank 1 through the same number of
steps (pedantic rounds are fixed for that reason). ``distributed_step.py`` prints the same cases side by side.

Run: python -m pytest benchmarks/test_distributed.py --benchmark-group-by=group
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_workloads import CASES, DDPStepCase

MODEL, ROUNDS, WARMUP = "vgg19_bn", 5, 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _peer(case: str, port: int, steps: int, threads: int) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(threads)
    _join(1, port)
    work = DDPStepCase(case, MODEL)
    for _ in range(steps):
        work.step()
    dist.destroy_process_group()


@pytest.mark.parametrize("case", [c for c in CASES if c != "dense_bf16_channels_last"]
                         + [pytest.param("dense_bf16_channels_last", marks=pytest.mark.skipif(
                             not torch.backends.mkldnn.is_available(), reason="no oneDNN"))])
def test_ddp_step(benchmark, case):
    threads = max(1, (os.cpu_count() or 2) // 2)
    port = _port()
    peer = mp.get_context("spawn").Process(target=_peer, args=(case, port, ROUNDS + WARMUP, threads))
    peer.start()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _join(0, port)
        work = DDPStepCase(case, MODEL)
        benchmark.group = f"DDP step, 2 processes, {MODEL} 98 %"
        benchmark.pedantic(work.step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        benchmark.extra_info["bytes_per_step_per_rank"] = work.bytes_per_step
        dist.destroy_process_group()
    finally:
        torch.set_num_threads(previous)
        peer.join(timeout=600)
    assert peer.exitcode == 0
