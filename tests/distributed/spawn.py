"""Runs a function in N spawned processes joined by gloo over loopback (the 2-process tests of this folder)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args, **kwargs)
        # Every rank done before any tears the group down: a rank that exits while a peer still talks to it
        # aborts that peer (gloo's "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world_size: int = 2, **kwargs) -> None:
    """``fn(rank, *args, **kwargs)`` on every rank; raises if any rank raised. ``fn`` must be a module-level
    function."""
    mp.start_processes(_entry, args=(fn, world_size, _free_port(), args, kwargs), nprocs=world_size, join=True,
                       start_method="spawn")
