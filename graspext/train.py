"""Training pruned networks: the GraSP paper's recipe, masks enforced, resumable.

Recipe (Wang et al. 2020, following the official code): SGD with momentum 0.9, lr 0.1 divided by 10 at 50 %
and 75 % of the epochs, weight decay 5e-4 (VGG) / 1e-4 (ResNet), batch 128; the reported figure is the best
test accuracy.

Features beyond the loop itself (dynamic sparse training: ``dst=graspext.dst.RigL()``) drive it through
callbacks (:mod:`graspext.callbacks`).

Checkpoints are written atomically after every epoch. Every epoch starts from RNG seeds derived from
(seed, epoch) — global torch/numpy/python RNGs and the DataLoader's own generator — so a run resumed after a
kill replays exactly the epochs an uninterrupted run would have.

Under ``torchrun`` (a torch.distributed process group of N > 1 processes, :mod:`graspext.distributed`) the same
trainer runs data-parallel: the loaders' batch size is the global batch, each rank computes its 1/N slice of
every global batch through DistributedDataParallel (the learning rate is the single-process one), metrics are
summed over the ranks, BatchNorm running statistics are averaged after each training epoch, and rank 0 alone
writes the checkpoint and result files. A checkpoint resumes only with the world size that wrote it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graspext._io import atomic_write, csv_text, write_text
from graspext.allocator import keep_freed_memory
from graspext.callbacks import Callback
from graspext.distributed.runtime import Distributed
from graspext.distributed.sampler import shard_loader
from graspext.init import INITS, apply_init_, masked_layers
from graspext.masks import Masks
from graspext.nn.convert import (
    AUTO_MIN_SAVING,
    densify,
    format_sparsity_report,
    predicted_saving,
    sparsify,
    tied_weights,
)
from graspext.nn.modules import SparseConv2d, SparseLinear
from graspext.pruning.data import check_logits

CHECKPOINT = "checkpoint.pt"
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
SUMMARY = "summary.json"
SPARSITY_REPORT = "sparsity_report.txt"
FINAL_MASKS = "final_masks.pt"
KERNELS = ("auto", "sparse", "dense")
# The settings a resumed run must share with its checkpoint (the others -- out_dir, progress, ... -- change
# nothing that trains; `kernels` is compared by the path it resolves to, see _load).
RESUME_MUST_MATCH = ("epochs", "lr", "momentum", "weight_decay", "lr_milestones", "lr_gamma", "seed", "amp",
                     "sparse_policy", "train_batch_size", "init")


def _comparable(value):
    return tuple(value) if isinstance(value, list) else value


@dataclass
class TrainConfig:
    epochs: int = 160
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)   # fractions of the epochs
    lr_gamma: float = 0.1
    seed: int = 0
    # Mixed precision: False, "bf16" (torch.autocast in bfloat16, on the CPU or CUDA; float32 master weights, no
    # loss scaling) or "fp16" (CUDA only, with a GradScaler); True means "fp16".
    amp: bool | str = False
    device: str | None = None                         # default: the model's device
    out_dir: str | None = None                        # checkpoints and results; None keeps nothing
    resume: bool = True                               # continue from out_dir's checkpoint if present
    progress: bool = True                             # tqdm bars
    tensorboard: bool = False
    # With masks: "sparse" trains through graspext.sparsify (only kept weights are computed; per layer sparse or
    # dense by `sparse_policy`), "dense" trains masked dense weights, "auto" is sparse where graspext has sparse
    # kernels for the device (CPU) and the cost model predicts them to save AUTO_MIN_SAVING of the masked layers'
    # time (graspext.nn.predicted_saving), masked dense weights otherwise: sparse layers that run dense add a
    # scatter and a gather per step, and a network mixed between the two layouts converts between them.
    kernels: str = "auto"
    sparse_policy: str = "auto"
    # With masks: a sparse-aware initialisation (graspext.init.INITS; Evci et al. 2022) drawn before training
    # from a generator seeded by `seed`; None trains from the model's own weights.
    init: str | None = None

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        for name, positive in (("lr", True), ("lr_gamma", True), ("momentum", False), ("weight_decay", False)):
            value = getattr(self, name)
            # Any real number (numpy's too); never NaN or infinity, which would train to NaN silently.
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if (positive and not value > 0) or value < 0:
                raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, "
                                 f"got {value!r}")
            setattr(self, name, float(value))
        self.lr_milestones = tuple(self.lr_milestones)
        if any(not isinstance(f, numbers.Real) or not 0 < f < 1 for f in self.lr_milestones):
            raise ValueError(f"lr_milestones must be fractions of the run in (0, 1), got {self.lr_milestones}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.amp is True:
            self.amp = "fp16"
        if self.amp not in (False, None, "fp16", "bf16"):
            raise ValueError(f"amp must be False, 'bf16' or 'fp16' (True), got {self.amp!r}")
        self.amp = self.amp or False
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        from graspext.nn.convert import POLICIES

        if self.sparse_policy not in POLICIES or self.sparse_policy == "measure":
            allowed = tuple(p for p in POLICIES if p != "measure")
            raise ValueError(f"sparse_policy must be one of {allowed}, got {self.sparse_policy!r}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"init must be None or one of {INITS}, got {self.init!r}")


@dataclass
class TrainResult:
    best_test_acc: float
    final_test_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)
    # The masks at the end of training (dynamic sparse training moves them); None for a dense run.
    masks: Masks | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # what summary.json holds


def _seed_epoch(seed: int, epoch: int, loaders) -> None:
    s = (seed * 1_000_003 + epoch) % (2**63 - 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    for loader in loaders:
        gen = getattr(loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(s)


class Trainer:
    """``Trainer(model, train_loader, test_loader, config, masks).fit() -> TrainResult``. Trains in place."""

    def __init__(self, model: nn.Module, train_loader, test_loader, config: TrainConfig | None = None,
                 masks: Masks | None = None, *, callbacks=(), dst=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        if masks is not None:
            if not isinstance(masks, Masks):
                raise TypeError(f"masks must be graspext.Masks, got {type(masks).__name__}")
            masks.check_fits(model)
        self.model, self.masks = model, masks
        for name, loader in (("train_loader", train_loader), ("test_loader", test_loader)):
            # Checked now, not after the first epoch has trained.
            if loader is None or not hasattr(loader, "__iter__"):
                raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, such as a DataLoader, "
                                f"got {type(loader).__name__}")
        self.train_loader, self.test_loader = train_loader, test_loader
        # Under torch.distributed: this rank's share of every global batch (graspext.distributed.sampler).
        self.distributed = Distributed()
        d = self.distributed
        self._train_batches = shard_loader(train_loader, d.rank, d.world_size, train=True) if d.active else train_loader
        self._test_batches = shard_loader(test_loader, d.rank, d.world_size, train=False) if d.active else test_loader
        if masks is not None:
            # Every rank must train the same sparse network: a mismatch is an error now, never a silent divergence.
            d.check_identical(dict(masks), "masks at the start of training")
        device = self.config.device or next(model.parameters()).device
        self.device = torch.device(device)
        if self.config.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device, but training runs on {self.device}; "
                             "use amp='bf16' on the CPU")
        # Tied weights stay one tensor on the masked dense path; sparse layers would untie them.
        self._tied = tied_weights(model, masks) if masks is not None else {}
        self._auto_sparse: bool | None = None  # kernels="auto" on the CPU: whether the sparse layers would pay
        if self.config.kernels == "sparse" and self._tied:
            name, others = next(iter(self._tied.items()))
            raise ValueError(f"kernels='sparse' cannot train tied weights ({name} is shared with "
                             f"{', '.join(others)}); use kernels='auto' or 'dense' (masked dense weights)")
        if self.config.kernels == "sparse" and masks is not None and "weight" in masks:
            raise ValueError("kernels='sparse' cannot train a model that is itself the masked layer (mask key "
                             "'weight'): train graspext.sparsify(model, masks) with masks=None, or use kernels='auto'")
        if self.config.kernels == "sparse" and masks is None:
            raise ValueError("kernels='sparse' needs masks: a dense model has no sparse layers to compute")
        if self.config.init is not None:
            if masks is None:
                raise ValueError(f"init={self.config.init!r} needs masks: it scales each weight by the kept "
                                 "connections of its unit")
            masked_layers(model, masks)  # every mask a Conv2d/Linear weight, checked before any work
        self.callbacks: list[Callback] = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be graspext.callbacks.Callback instances, got {type(cb).__name__}")
        self.dst = dst
        if dst is not None:
            from graspext.dst import DynamicSparsity

            if not isinstance(dst, DynamicSparsity):
                raise TypeError(f"dst must be graspext.dst.RigL(...) or graspext.dst.SET(...), got {type(dst).__name__}")
            if masks is None:
                raise ValueError("dst needs masks: the initial sparse pattern it moves (graspext.dst.initial_masks("
                                 "model, sparsity, 'erk'), or the masks of any pruning method)")
            self.callbacks.append(dst.callback())
        # Set by fit(): what the callbacks drive.
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = None
        self.mask_handle = None
        self.sparse_layers: dict[str, SparseConv2d | SparseLinear] = {}
        self.global_step = 0
        # The module the training forward runs through: the model, or DDP around it while fit() runs.
        self.forward_model: nn.Module = model
        self.steps_per_epoch = len(self._train_batches) if hasattr(self._train_batches, "__len__") else None
        self.total_steps = self.steps_per_epoch * self.config.epochs if self.steps_per_epoch is not None else None

    @property
    def uses_sparse_kernels(self) -> bool:
        """Whether fit() trains through graspext.sparsify (see TrainConfig.kernels).

        A model that is itself the masked layer (mask key ``"weight"``) trains as masked dense weights: the
        trainer trains the caller's model in place, and a sparse layer cannot take the place of the root. So do
        tied weights (one tensor used by several modules), which sparse layers would untie.
        """
        if self.masks is None or self.config.kernels == "dense" or "weight" in self.masks or self._tied:
            return False
        if self.config.kernels == "sparse":
            return True
        if self.device.type != "cpu":
            return False
        if self._auto_sparse is None:  # decided once: a dynamic-sparse update keeps every layer's density
            saving = predicted_saving(self.model, self.masks, policy=self.config.sparse_policy,
                                      dtype=torch.bfloat16 if self.config.amp == "bf16" else None)
            self._auto_sparse = saving >= AUTO_MIN_SAVING
        return self._auto_sparse

    # ------------------------------------------------------------------ checkpoints
    def _train_batch_size(self) -> int | None:
        """The training loader's batch size where it has one (a DataLoader), for the resume check."""
        return getattr(self.train_loader, "batch_size", None)

    def _checkpoint_path(self) -> str | None:
        return os.path.join(self.config.out_dir, CHECKPOINT) if self.config.out_dir else None

    def current_masks(self) -> Masks | None:
        """The masks as they stand now (dynamic sparse training moves them), keyed like the given ones."""
        if self.masks is None:
            return None
        if self.sparse_layers:
            current = {n: layer.mask() for n, layer in self.sparse_layers.items()}
        elif self.mask_handle is not None:
            current = {n: self.mask_handle.mask(n) for n in self.masks}
        else:
            return self.masks
        return Masks({n: current.get(n, m).to(m.device) for n, m in self.masks.items()}, self.masks.meta)

    def _save(self, epoch, optimizer, scheduler, scaler, history, best) -> None:
        state = {"format": "graspext.train", "version": 1, "epoch": epoch, "model": self.model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "history": history,
                 "best_test_acc": best, "config": asdict(self.config),
                 "masks": {n: m.cpu() for n, m in self.masks.items()} if self.masks is not None else None,
                 "sparse_kernels": self.uses_sparse_kernels, "train_batch_size": self._train_batch_size(),
                 "global_step": self.global_step, "callbacks": [cb.state_dict() for cb in self.callbacks],
                 "world_size": self.distributed.world_size}
        if self.distributed.is_main:
            atomic_write(self._checkpoint_path(), lambda f: torch.save(state, f))

    def _load(self, optimizer, scheduler, scaler):
        path = self._checkpoint_path()
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise ValueError(f"checkpoint {path!r} is corrupt or unreadable ({exc}); delete it or pass "
                             "resume=False to start over") from exc
        if not isinstance(state, dict) or state.get("format") != "graspext.train":
            raise ValueError(f"checkpoint {path!r} is not a graspext training checkpoint")
        saved_world = state.get("world_size", 1)
        if saved_world != self.distributed.world_size:
            # Each rank's share of the global batch, and so every step after the resume, depends on the world size.
            raise ValueError(f"checkpoint {path!r} was written by a run of {saved_world} process(es); this run has "
                             f"{self.distributed.world_size}: resume it with the same number (--nproc "
                             f"{saved_world}), or use another out_dir")
        saved_masks = state["masks"]
        if (saved_masks is None) != (self.masks is None) or (
                saved_masks is not None and (set(saved_masks) != set(self.masks) or any(
                    not torch.equal(saved_masks[n].cpu(), self.masks[n].cpu()) for n in saved_masks))):
            raise ValueError(f"checkpoint {path!r} was trained with other masks than the ones given; "
                             "use another out_dir or resume=False")
        saved = {**state["config"], "train_batch_size": state.get("train_batch_size")}
        if saved.get("amp") is True:  # checkpoints from before amp took "bf16"/"fp16"
            saved["amp"] = "fp16"
        current = {**asdict(self.config), "train_batch_size": self._train_batch_size()}
        # Every setting that changes what trains must match: a resumed run that silently kept the
        # checkpoint's settings would record the new ones in summary.json without having run them. (A setting
        # an older checkpoint does not record is not compared.)
        # `init` is recorded even when None (no init is a setting too), so it is compared whenever recorded.
        changed = [k for k in RESUME_MUST_MATCH
                   if (saved.get(k) is not None or (k == "init" and k in state["config"]))
                   and _comparable(saved[k]) != _comparable(current[k])]
        if changed:
            raise ValueError(f"checkpoint {path!r} belongs to a run with "
                             + ", ".join(f"{k}={_comparable(saved[k])!r}" for k in changed) + "; this run has "
                             + ", ".join(f"{k}={_comparable(current[k])!r}" for k in changed)
                             + "; use the same settings, another out_dir, or resume=False")
        if state.get("sparse_kernels", False) != self.uses_sparse_kernels:
            # The optimizer's momentum is per kept weight on one path and per dense weight on the other.
            raise ValueError(f"checkpoint {path!r} was trained with kernels="
                             f"{'sparse' if state.get('sparse_kernels') else 'dense'}; resume it the same way")
        saved_callbacks = state.get("callbacks", [])
        if len(saved_callbacks) != len(self.callbacks):
            raise ValueError(f"checkpoint {path!r} was trained with {len(saved_callbacks)} callbacks (dst included), "
                             f"this run has {len(self.callbacks)}; resume it with the same ones")
        self.model.load_state_dict(state["model"])  # sparse layers take their saved patterns from it
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        for cb, cb_state in zip(self.callbacks, saved_callbacks):
            cb.load_state_dict(cb_state)
        self.global_step = state.get("global_step", (state["epoch"] + 1) * (self.steps_per_epoch or 0))
        return state["epoch"] + 1, state["history"], state["best_test_acc"]

    def _write_results(self, history) -> None:
        if not self.distributed.is_main:
            return
        out = self.config.out_dir
        write_text(os.path.join(out, RESULTS_JSONL), "".join(json.dumps(r) + "\n" for r in history))
        write_text(os.path.join(out, RESULTS_CSV), csv_text(history))

    # ------------------------------------------------------------------ loops
    def _forward(self, x, train: bool):
        try:
            return (self.forward_model if train else self.model)(x)
        except RuntimeError as exc:
            if self.uses_sparse_kernels and "view size is not compatible" in str(exc):
                raise RuntimeError(
                    f"{exc}\n(graspext: the sparse layers' outputs, and the BatchNorm and pooling layers after "
                    "them, have batch-innermost storage ([H, W, C, N] in memory), which Tensor.view cannot "
                    "reshape across; use x.reshape(...) or torch.flatten(x, 1) in the model, or "
                    "graspext.sparsify(..., keep_layout=False))") from exc
            raise

    def _autocast(self):
        amp = self.config.amp
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=bool(amp))

    def _run_epoch(self, epoch, optimizer, scaler, train: bool):
        loader = self._train_batches if train else self._test_batches
        self.model.train(train)
        total_loss, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        bar = None
        if self.config.progress and self.distributed.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(loader) if hasattr(loader, "__len__") else None, leave=False,
                       desc=f"epoch {epoch + 1}/{self.config.epochs} {'train' if train else 'test'}")
        with torch.set_grad_enabled(train):
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if train:
                    for cb in self.callbacks:
                        cb.on_train_batch_start(self, x, y)
                with self._autocast():
                    out = self._forward(x, train)
                if seen == 0:  # the first batch of each epoch: a clear error instead of one from inside torch
                    check_logits(out, y)
                # float16/bfloat16 logits (autocast) in float32; float64 stays float64
                loss = F.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
                if train:
                    optimizer.zero_grad(set_to_none=True)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    skip = False
                    for cb in self.callbacks:
                        skip = bool(cb.on_after_backward(self)) or skip
                    if not skip and scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    elif not skip:
                        optimizer.step()
                    for cb in self.callbacks:
                        cb.on_train_batch_end(self, loss.detach())
                    self.global_step += 1
                total_loss += loss.item() * len(y)
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}",
                                    img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if bar is not None:
            bar.close()
        total_loss, correct, seen = self.distributed.sum_numbers(total_loss, correct, seen)
        if seen == 0:
            raise ValueError(f"{'train' if train else 'test'}_loader yielded no samples")
        if train:  # one model again before evaluation and the checkpoint
            self.distributed.average_buffers_(self.model)
        return total_loss / seen, correct / seen, seen / (time.perf_counter() - start)

    def fit(self) -> TrainResult:
        c = self.config
        torch.manual_seed(c.seed)
        self.model.to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if c.init is not None:
            # Before the masks are applied (or the model sparsified); a resumed run's checkpoint then
            # overwrites these weights with the trained ones.
            apply_init_(c.init, self.model, self.masks, generator=torch.Generator().manual_seed(c.seed))
        sparse = self.uses_sparse_kernels
        handle = None
        if sparse:
            # In place, so the caller's model is the one trained; densified again (in place) however fit ends.
            sparsify(self.model, self.masks, inplace=True, policy=c.sparse_policy,
                     dtype=torch.bfloat16 if c.amp == "bf16" else None)
            self.sparse_layers = {f"{name}.weight" if name else "weight": m for name, m in self.model.named_modules()
                                  if isinstance(m, (SparseConv2d, SparseLinear))}
        elif self.masks is not None:
            handle = self.mask_handle = self.masks.apply_(self.model)
        try:
            self.forward_model = self.distributed.wrap(self.model, self.device)
            history, best = self._fit()
            final_masks = self.current_masks()
        finally:
            self.forward_model = self.model  # DDP's reducer goes with its wrapper
            if handle is not None:
                handle.remove()
            if sparse:
                densify(self.model, inplace=True)
            self.sparse_layers, self.mask_handle = {}, None
        summary = {"best_test_acc": best, "final_test_acc": history[-1]["test_acc"], "epochs": c.epochs,
                   "sparse_kernels": sparse, "config": asdict(c)}
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        result = TrainResult(best_test_acc=best, final_test_acc=history[-1]["test_acc"], history=history,
                             masks=final_masks, summary=summary)
        if c.out_dir and self.distributed.is_main:
            if final_masks is not None and any(not torch.equal(final_masks[n].cpu(), self.masks[n].cpu())
                                               for n in self.masks):
                final_masks.save(os.path.join(c.out_dir, FINAL_MASKS))
            write_text(os.path.join(c.out_dir, SUMMARY), json.dumps(summary, indent=2))
        return result

    def _fit(self):
        c = self.config
        optimizer = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)
        milestones = sorted({max(1, int(round(f * c.epochs))) for f in c.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=c.lr_gamma)
        scaler = torch.amp.GradScaler("cuda") if c.amp == "fp16" else None
        self.optimizer, self.scaler, self.global_step = optimizer, scaler, 0
        for cb in self.callbacks:
            cb.on_fit_start(self)
        start_epoch, history, best = 0, [], -math.inf
        main = self.distributed.is_main
        if c.out_dir:
            os.makedirs(c.out_dir, exist_ok=True)
            # Rank 0 decides, so that every rank resumes or starts over together.
            resume = self.distributed.broadcast_object(c.resume and os.path.exists(self._checkpoint_path()))
            if resume:
                start_epoch, history, best = self._load(optimizer, scheduler, scaler)
            elif main and os.path.exists(os.path.join(c.out_dir, SUMMARY)):
                os.unlink(os.path.join(c.out_dir, SUMMARY))  # a fresh run must not look finished early
            if self.uses_sparse_kernels and main:
                write_text(os.path.join(c.out_dir, SPARSITY_REPORT), format_sparsity_report(self.model) + "\n")
        writer = None
        if c.tensorboard and c.out_dir and main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(c.out_dir, "tensorboard"))
        try:
            for epoch in range(start_epoch, c.epochs):
                _seed_epoch(c.seed, epoch, [self._train_batches, self._test_batches])
                for cb in self.callbacks:
                    cb.on_epoch_start(self, epoch)
                lr = optimizer.param_groups[0]["lr"]
                train_loss, train_acc, images_per_s = self._run_epoch(epoch, optimizer, scaler, train=True)
                test_loss, test_acc, _ = self._run_epoch(epoch, optimizer, scaler, train=False)
                scheduler.step()
                best = max(best, test_acc)
                record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                          "test_loss": test_loss, "test_acc": test_acc, "best_test_acc": best,
                          "train_images_per_s": images_per_s}
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, record)
                history.append(record)
                if writer is not None:
                    for k, v in record.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                if c.out_dir:
                    self._save(epoch, optimizer, scheduler, scaler, history, best)
                    self._write_results(history)
                    if self.uses_sparse_kernels and main:  # now with the dtype each layer ran in
                        write_text(os.path.join(c.out_dir, SPARSITY_REPORT), format_sparsity_report(self.model) + "\n")
                    self.distributed.barrier()  # the checkpoint is complete before any rank goes on
        finally:
            if writer is not None:
                writer.close()
        return history, best


def train(model: nn.Module, train_loader, test_loader, *, masks: Masks | None = None, dst=None, callbacks=(),
          **config: Any) -> TrainResult:
    """Functional form: ``graspext.train(model, train_loader, test_loader, epochs=160, masks=masks)``.

    ``dst=graspext.dst.RigL()`` (or ``SET()``) moves the masks during training; ``callbacks`` are
    :class:`graspext.callbacks.Callback` instances.
    """
    try:
        cfg = TrainConfig(**config)
    except TypeError as exc:
        valid = ", ".join(f.name for f in TrainConfig.__dataclass_fields__.values())
        raise TypeError(f"{exc}; valid training options: {valid}") from exc
    return Trainer(model, train_loader, test_loader, cfg, masks, callbacks=callbacks, dst=dst).fit()
