"""DDP communication hooks as trainer callbacks: a byte meter over the plain all-reduce, and top-k compression.

Both count the payload each rank hands the collective per training step (``comm_bytes_per_step`` in every
epoch's record and in ``summary.json``): for the all-reduce that is the gradient bucket itself; for top-k the
packed (index, value) pairs each rank all-gathers.

**Top-k with error feedback** (Stich et al. 2018; Lin et al.'s Deep Gradient Compression keeps the same
residual): per parameter, the ``ratio`` largest entries of ``gradient + residual`` by magnitude are sent and
the rest is kept as the next step's residual, so nothing is lost, only delayed. The selection is graspext's
exact-count selection (:func:`graspext.pruning.selection.select_masks`). With
``sign=True`` the sent values are quantised as TopAgg does (DataLens, Wang et al. 2021): each kept entry sends
its sign (one byte), scaled on arrival by the mean magnitude of that parameter's kept entries; the
quantisation error goes to the residual too. Every rank adds all ranks' sparse contributions and divides by the
world size, the average the plain all-reduce computes.

Selection runs per parameter (not per bucket), so the result does not depend on how DDP lays out or rebuilds
its buckets, and the residuals (every rank's, saved in the checkpoint by parameter name) resume bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from graspext._validation import boolean, positive
from graspext.callbacks import Callback


class _HookCallback(Callback):
    """Registers ``self._hook`` on the trainer's DDP model and counts the bytes it hands the collective."""

    def __init__(self):
        self.bytes_total = 0
        self.group = None
        self._names: dict[int, str] = {}
        self._steps_at_epoch_start = 0
        self._bytes_at_epoch_start = 0

    def on_fit_start(self, trainer) -> None:
        self.register(trainer.forward_model, trainer.distributed.group)

    def register(self, ddp_model, group=None) -> None:
        """Installs the hook on a DistributedDataParallel model (the trainer does this at the start of fit)."""
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(ddp_model, DistributedDataParallel):
            raise ValueError(f"{type(self).__name__} is a DDP communication hook: it needs a torch.distributed "
                             "process group of more than one process (launch with torchrun or --nproc)")
        self.group = group
        self._names = {id(p): n for n, p in ddp_model.module.named_parameters()}
        ddp_model.register_comm_hook(self, type(self)._hook)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self._steps_at_epoch_start, self._bytes_at_epoch_start = trainer.global_step, self.bytes_total

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        steps = trainer.global_step - self._steps_at_epoch_start
        record["comm_bytes_per_step"] = (self.bytes_total - self._bytes_at_epoch_start) / max(1, steps)

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        summary["comm_bytes_per_step"] = self.bytes_total / max(1, trainer.global_step)

    def _hook(self, bucket):  # (unannotated: DDP compares annotations with the classes themselves)
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"bytes_total": self.bytes_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes_total = state["bytes_total"]


class CommunicationMeter(_HookCallback):
    """DDP's own all-reduce (average of the gradient buckets), counting its bytes."""

    def _hook(self, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.bytes_total += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(self.group, bucket)


def top_k_indices(values: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` largest ``|values|``, ascending, by graspext's exact-count selection (which
    removes tied entries in index order, so of tied entries the higher indices stay)."""
    from graspext.pruning.selection import select_masks

    flat = values.reshape(-1)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    (keep,), _ = select_masks([flat.abs()], flat.numel() - k, remove_largest=False)
    return keep.nonzero().squeeze(1)


class TopKCompression(_HookCallback):
    """Top-k gradient compression with error feedback, optionally sign-quantised; see the module docstring.

    ``ratio`` is the fraction of each parameter's entries sent per step (at least one entry).
    """

    def __init__(self, ratio: float = 0.01, *, sign: bool = False):
        super().__init__()
        if positive(ratio, "ratio") > 1:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
        self.ratio, self.sign = float(ratio), boolean(sign, "sign")
        self.residuals: dict[str, Tensor] = {}

    def _encode(self, bucket) -> tuple[Tensor, list[int]]:
        """This rank's packed contribution (uint8) and the kept count per parameter of the bucket."""
        buffer = bucket.buffer()
        indices, values, scales, counts = [], [], [], []
        offset = 0
        for p in bucket.parameters():
            n, name = p.numel(), self._names[id(p)]
            acc = buffer[offset:offset + n].clone()
            residual = self.residuals.get(name)
            if residual is not None:
                acc += residual.to(acc.device)
            k = min(n, max(1, math.ceil(self.ratio * n)))
            idx = top_k_indices(acc, k)
            kept = acc[idx]
            if self.sign:
                scale = kept.abs().mean()
                signs = torch.sign(kept)
                acc[idx] -= signs * scale  # the quantisation error stays in the residual
                values.append(signs.to(torch.int8))
                scales.append(scale.reshape(1))
            else:
                acc[idx] = 0
                values.append(kept)
            self.residuals[name] = acc
            indices.append((idx + offset).to(torch.int32))
            counts.append(k)
            offset += n
        parts = [torch.cat(indices).view(torch.uint8), torch.cat(values).contiguous().view(torch.uint8)]
        if self.sign:
            parts.append(torch.cat(scales).view(torch.uint8))
        return torch.cat(parts), counts

    def _decode(self, packed: Tensor, counts: list[int], like: Tensor) -> tuple[Tensor, Tensor]:
        def field(start: int, stop: int, dtype: torch.dtype) -> Tensor:
            return packed[start:stop].clone().view(dtype)  # a copy: the bytes of a field need not be aligned

        total = sum(counts)
        idx_bytes = 4 * total
        idx = field(0, idx_bytes, torch.int32).long()
        if not self.sign:
            return idx, field(idx_bytes, packed.numel(), like.dtype)
        signs = field(idx_bytes, idx_bytes + total, torch.int8).to(like.dtype)
        scales = field(idx_bytes + total, packed.numel(), like.dtype)
        per_entry = torch.repeat_interleave(scales, torch.tensor(counts, device=scales.device))
        return idx, signs * per_entry

    def _hook(self, bucket):
        buffer = bucket.buffer()
        packed, counts = self._encode(bucket)
        self.bytes_total += packed.numel()
        world = dist.get_world_size(self.group)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        work = dist.all_gather(gathered, packed, group=self.group, async_op=True)

        def combine(_fut) -> Tensor:
            out = torch.zeros_like(buffer)
            for contribution in gathered:
                idx, vals = self._decode(contribution, counts, buffer)
                out.index_add_(0, idx, vals)
            return out.div_(world)

        return work.get_future().then(combine)

    def state_dict(self) -> dict[str, Any]:
        # The residuals are each rank's own: every rank's go into the checkpoint (rank 0 writes it), gathered
        # here, where every rank builds the checkpoint's state.
        mine = {n: r.cpu() for n, r in self.residuals.items()}
        by_rank = [mine]
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            by_rank = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(by_rank, mine, group=self.group)
        return {**super().state_dict(), "ratio": self.ratio, "sign": self.sign, "residuals_by_rank": by_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["ratio"], state["sign"]) != (self.ratio, self.sign):
            raise ValueError(f"the checkpoint's top-k compression ran with ratio={state['ratio']}, "
                             f"sign={state['sign']}; this run has ratio={self.ratio}, sign={self.sign}")
        super().load_state_dict(state)
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        self.residuals = dict(state["residuals_by_rank"][rank])
