"""The process group a run trains in, as one object the trainer and the scoring methods call.

:class:`Distributed` wraps ``torch.distributed`` for graspext's needs: DDP wrapping without the per-step buffer
broadcast, metric sums, BatchNorm running statistics averaged across ranks, and a cheap check (a SHA-256 of
every tensor, all-gathered) that masks and other decisions are identical on every rank. In a single process
every method is a no-op, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn


class RankMismatchError(RuntimeError):
    """Ranks hold different values where graspext needs identical ones (masks, scores' decisions)."""


def init_from_env(backend: str | None = None) -> bool:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` ...).

    Returns whether a group of more than one process is active afterwards. Without ``WORLD_SIZE`` (a plain
    single-process run) or with ``WORLD_SIZE=1`` nothing is initialized. ``backend`` defaults to NCCL when the
    process has a CUDA device (``LOCAL_RANK`` selects it) and gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for {world} processes, but this torch build has no "
                           "torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def _digest(t: Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


class Distributed:
    """The default process group when one of more than one process is initialized, else a single process."""

    def __init__(self, group=None, *, enabled: bool = True):
        self.group = group
        self.active = enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1

    @classmethod
    def single_process(cls) -> Distributed:
        """One process, even inside a process group (every rank computes everything itself)."""
        return cls(enabled=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints and result files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------ reductions
    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sums ``tensor`` over the ranks, in place (gloo and NCCL give every rank the same bits)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_mean_(self, tensor: Tensor) -> Tensor:
        if self.active:
            self.all_reduce_sum_(tensor).div_(self.world_size)
        return tensor

    def sum_numbers(self, *values: float) -> list[float]:
        """Python numbers summed over the ranks, in float64 (metric counts and loss sums)."""
        if not self.active:
            return [float(v) for v in values]
        backend = dist.get_backend(self.group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        return self.all_reduce_sum_(t).tolist()

    @torch.no_grad()
    def average_buffers_(self, model: nn.Module) -> None:
        """Averages the floating-point buffers (BatchNorm running statistics) over the ranks, in place.

        DDP here does not broadcast buffers every step (that would resend the sparse layers' index buffers);
        each rank's running statistics follow its own shard instead, and this makes them one model again
        before evaluation and checkpointing. Integer buffers (the indices, BatchNorm's batch counter) are
        identical on every rank and left alone.
        """
        if not self.active:
            return
        for buf in model.buffers():
            if buf.is_floating_point():
                self.all_reduce_mean_(buf)

    # ------------------------------------------------------------------ identical on every rank
    def check_identical(self, tensors: Mapping[str, Tensor], what: str) -> None:
        """Raises :class:`RankMismatchError` naming the first tensor that differs between ranks.

        Each rank hashes its tensors and the digests are all-gathered (a few dozen bytes per tensor), so the
        check is cheap enough to run after every mask update.
        """
        if not self.active:
            return
        mine = {name: _digest(t) for name, t in tensors.items()}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        for rank, theirs in enumerate(gathered):
            if set(theirs) != set(mine):
                raise RankMismatchError(f"{what}: rank {rank} holds {sorted(theirs)}, rank {self.rank} holds "
                                        f"{sorted(mine)}")
            for name, digest in mine.items():
                if theirs[name] != digest:
                    raise RankMismatchError(
                        f"{what}: {name!r} differs between rank {rank} and rank {self.rank}; every process must "
                        "hold the same masks (prune with the same seed and data on every rank, or prune on one rank "
                        "and load its masks file everywhere)")

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` under DistributedDataParallel (itself in a single process).

        No per-step buffer sync (``broadcast_buffers=False``): DDP would otherwise send every buffer from rank 0 before each forward, the
        sparse layers' index buffers included; they are identical on every rank by construction (checked), and
        the BatchNorm statistics are averaged per epoch instead (:meth:`average_buffers_`). DDP's buckets carry
        only the parameters' gradients, so a sparse layer communicates its kept values alone.
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        # Newer torch names the option forward_sync_buffers (buffers are still synced once, at construction).
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.group, **no_buffer_sync)
