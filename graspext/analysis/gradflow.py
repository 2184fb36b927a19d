"""Gradient-flow diagnostics for sparse training (Evci et al., "Gradient flow in sparse neural networks and how
lottery tickets win", AAAI 2022).

The paper explains why sparse networks trained from scratch lag behind by how well gradients flow through them:

- :func:`masked_gradient_norms`: the norm of the loss gradient restricted to the kept weights, on a fixed batch;
- :class:`GradientFlow`: a trainer callback that logs it every ``every`` steps and just before and after each
  dynamic-sparse-training mask update (RigL's updates raise it, the paper's Fig. 3);
- :func:`distance_to_init`: how far training moved the weights from their initialization;
- :func:`interpolate`: the loss along the line between two solutions (the paper's linear-mode-connectivity plots,
  on α ∈ [-0.2, 1.2] as the official ``rigl_tf2`` code evaluates it).

All of them leave training undisturbed: no parameter, gradient, BatchNorm statistic or RNG state changes.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graspext._io import write_text
from graspext.analysis.evaluation import evaluate
from graspext.callbacks import Callback
from graspext.nn.modules import SparseConv2d, SparseLinear

__all__ = ["GRADIENT_FLOW_JSONL", "GradientFlow", "default_alphas", "distance_to_init", "interpolate",
           "masked_gradient_norms"]

GRADIENT_FLOW_JSONL = "gradient_flow.jsonl"
_SPARSE = (SparseConv2d, SparseLinear)


def default_alphas() -> list[float]:
    """29 points evenly on [-0.2, 1.2] (step 0.05), with 0 and 1 exactly among them."""
    return [round(-0.2 + 0.05 * i, 10) for i in range(29)]


# ---------------------------------------------------------------------------------------------- helpers
def _check_batch(batch) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
        raise ValueError(f"batch must be an (inputs, targets) pair of tensors, got {type(batch).__name__}")
    return batch[0], batch[1]


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _sparse_values(model: nn.Module) -> dict[str, nn.Module]:
    """``"<layer>.values"`` -> the sparse layer holding it."""
    return {f"{name}.values" if name else "values": m for name, m in model.named_modules() if isinstance(m, _SPARSE)}


def _reported(name: str, sparse: Mapping[str, nn.Module]) -> str:
    """The name a parameter is reported under: a sparse layer's values under its dense weight's name."""
    return name[: -len("values")] + "weight" if name in sparse else name


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None,
                 sparse: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """The masks keyed by reported name, checked against the model (ValueError naming the mask key)."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be graspext.Masks or a mapping of parameter name to bool tensor, "
                        f"got {type(masks).__name__}")
    shapes = {}
    layers = {}
    for name, p in model.named_parameters():
        if name in sparse:
            layer = sparse[name]
            shapes[_reported(name, sparse)] = tuple(layer.mask().shape)
            layers[_reported(name, sparse)] = layer
        else:
            shapes[name] = tuple(p.shape)
    out = {}
    for key, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{key!r}] must be a bool tensor")
        if key not in shapes:
            raise ValueError(f"masks: {key!r} is not a parameter of the model; the masks belong to another model")
        if tuple(m.shape) != shapes[key]:
            raise ValueError(f"masks: {key!r} has shape {tuple(m.shape)} but the model's parameter has {shapes[key]}")
        if key in layers and not torch.equal(m.to(layers[key].values.device), layers[key].mask()):
            raise ValueError(f"masks: {key!r} differs from the sparse layer's own mask; a sparse layer computes "
                             "gradients at its kept weights only (pass masks=None to use the layers' masks)")
        if key not in layers:
            out[key] = m
    return out


def _layer_flags(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Per-module state a forward pass may change besides buffers: train flags and sparse-layer capture state."""
    saved = []
    for m in model.modules():
        flags = {"training": m.training}
        if isinstance(m, _SPARSE):
            flags.update(_dense_grad_request=m._dense_grad_request, _dense_grad_box=m._dense_grad_box,
                         computed_dtype=m.computed_dtype)
        saved.append((m, flags))
    return saved


def _restore_flags(saved) -> None:
    for m, flags in saved:
        for k, v in flags.items():
            setattr(m, k, v)


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _norms(model: nn.Module, masks: Mapping[str, Tensor] | None, batch, loss_fn: Callable,
           check_finite: bool) -> dict[str, float]:
    x, y = _check_batch(batch)
    sparse = _sparse_values(model)
    checked = _check_masks(model, masks, sparse)
    device = _device(model)
    x, y = x.to(device), y.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: it has no parameter that requires grad, so there is no gradient to measure")
    # Fresh leaves sharing the parameters' storage: autograd.grad fills no .grad and fires none of the
    # parameters' own hooks (MaskHandle's, which capture RigL's dense gradient).
    leaves = {n: p.detach().requires_grad_(True) for n, p in named}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm updates the copies, not the model
    saved = _layer_flags(model)
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)), torch.enable_grad():
            # The network the masks define, w * m: its gradient in w is the masked gradient (g * m).
            weights = {n: p.detach() * checked[n].to(p.device) for n, p in model.named_parameters() if n in checked}
            weights.update({n: leaf * checked[n].to(leaf.device) if n in checked else leaf
                            for n, leaf in leaves.items()})
            out = torch.func.functional_call(model, {**weights, **buffers}, (x,))
            loss = loss_fn(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            if check_finite and not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"batch: the loss on it is not finite ({float(loss.detach()):g}), so the gradient "
                                 "norm is undefined; check the model and the batch")
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    finally:
        _restore_flags(saved)
    result, total = {}, 0.0
    for (name, p), g in zip(named, grads):
        key = _reported(name, sparse)
        if g is None:
            g = torch.zeros_like(p)
        sq = float(g.detach().double().pow(2).sum())
        result[key] = math.sqrt(sq)
        total += sq
    result["total"] = math.sqrt(total)
    return result


# ---------------------------------------------------------------------------------------------- public
def masked_gradient_norms(model: nn.Module, masks: Mapping[str, Tensor] | None, batch,
                          loss_fn: Callable = F.cross_entropy) -> dict[str, float]:
    """L2 norms of the gradient of ``loss_fn(model(x), y)`` on ``batch = (x, y)``, pruned positions left out.

    This is the gradient flow of Evci et al. (AAAI 2022): each masked weight's gradient is multiplied by its
    mask; unmasked parameters count with their whole gradient. Keys are parameter names (a sparse layer's
    ``values`` under ``"<layer>.weight"``), plus ``"total"``, the norm over all of them. The loss is taken at the
    masked weights w * m, the network the masks define (w itself where training keeps pruned weights at zero).
    With a :func:`graspext.sparsify`'d model ``masks`` may be None: each layer holds its mask.

    Computed in the model's dtype and current train/eval mode, without disturbing training: parameters, their
    ``.grad``, BatchNorm running statistics and the global RNG are left as they were.
    """
    return _norms(model, masks, batch, loss_fn, check_finite=True)


def _dense_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter under its state-dict name, a sparse layer's as its dense weight."""
    sparse = _sparse_values(model)
    return {_reported(n, sparse): (sparse[n].dense_weight() if n in sparse else p).detach()
            for n, p in model.named_parameters()}


def _cosine(dot: float, na: float, nb: float) -> float:
    if na == 0.0 and nb == 0.0:
        return 1.0  # two zero vectors (a zero-initialized bias that stayed zero) are identical
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / (na * nb)


@torch.no_grad()
def distance_to_init(model: nn.Module, init_state: Mapping[str, Tensor]) -> dict[str, Any]:
    """How far the parameters moved from ``init_state`` (e.g. ``graspext.lottery.state_copy(model)`` at init).

    Returns ``{"l2_distance", "cosine_similarity", "layers": {name: {"l2_distance", "cosine_similarity"}}}``,
    the totals over all parameters flattened into one vector, in float64. Sparse layers count with their dense
    weights, so a state taken before :func:`graspext.sparsify` compares by name. A zero vector has cosine 1 with
    itself and 0 with anything else.
    """
    if not isinstance(init_state, Mapping):
        raise TypeError("init_state must be a state dict (a mapping of name to tensor), "
                        f"got {type(init_state).__name__}")
    current = _dense_params(model)
    layers, dot, na, nb, dist = {}, 0.0, 0.0, 0.0, 0.0
    for name, w in current.items():
        if name not in init_state:
            raise ValueError(f"init_state: it lacks {name!r}; it belongs to another model")
        w0 = init_state[name]
        if not isinstance(w0, Tensor) or tuple(w0.shape) != tuple(w.shape):
            raise ValueError(f"init_state: {name!r} has shape {tuple(getattr(w0, 'shape', ()))} but the model's "
                             f"parameter has {tuple(w.shape)}; it belongs to another model")
        a, b = w.double().flatten(), w0.to(w.device).double().flatten()
        d, ab, aa, bb = float((a - b).pow(2).sum()), float(a @ b), float(a @ a), float(b @ b)
        layers[name] = {"l2_distance": math.sqrt(d), "cosine_similarity": _cosine(ab, math.sqrt(aa), math.sqrt(bb))}
        dist, dot, na, nb = dist + d, dot + ab, na + aa, nb + bb
    return {"l2_distance": math.sqrt(dist), "cosine_similarity": _cosine(dot, math.sqrt(na), math.sqrt(nb)),
            "layers": layers}


def _check_state(name: str, state, reference: Mapping[str, Tensor]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a state dict (a mapping of name to tensor), got {type(state).__name__}")
    missing = [k for k in reference if k not in state]
    if missing:
        raise ValueError(f"{name}: it lacks {missing[0]!r}; it belongs to another model")
    extra = [k for k in state if k not in reference]
    if extra:
        raise ValueError(f"{name}: {extra[0]!r} is not in the model's state dict; it belongs to another model")
    for k, ref in reference.items():
        t = state[k]
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: {k!r} has shape {tuple(getattr(t, 'shape', ()))} but the model's has "
                             f"{tuple(ref.shape)}; it belongs to another model")


def interpolate(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], loader: Iterable,
                alphas: Sequence[float] | None = None, loss_fn: Callable = F.cross_entropy) -> list[dict[str, float]]:
    """Loss and accuracy on ``loader`` along θ(α) = (1 − α)·θ_a + α·θ_b (Evci et al., AAAI 2022, Sec. 5).

    ``state_a``/``state_b`` are state dicts of ``model``; every floating entry is interpolated (parameters and
    BatchNorm running statistics), integer buffers (``num_batches_tracked``) come from ``state_a``. ``alphas``
    defaults to 29 points on [-0.2, 1.2] (:func:`default_alphas`). Evaluated in eval mode; the model gets its
    state and modes back afterwards (a sparsified model is evaluated on a dense copy, since θ(α) may leave its
    pattern). Returns ``[{"alpha", "loss", "accuracy"}]``.
    """
    if alphas is None:
        alphas = default_alphas()
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise TypeError(f"alphas must be a sequence of numbers, got {type(alphas).__name__}")
    alphas = list(alphas)
    if not alphas or any(isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a)
                         for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of finite numbers, got {alphas!r}")
    if loader is None or not hasattr(loader, "__iter__"):
        raise TypeError(f"loader must be an iterable of (inputs, targets) batches, got {type(loader).__name__}")
    target = model
    if any(isinstance(m, _SPARSE) for m in model.modules()):
        from graspext.nn import densify

        target = densify(model)  # a copy; the caller's model is never touched
    reference = target.state_dict()
    _check_state("state_a", state_a, reference)
    _check_state("state_b", state_b, reference)
    device = _device(target)
    original = {k: v.detach().clone() for k, v in reference.items()} if target is model else None
    saved = _layer_flags(target)
    results = []
    try:
        target.eval()
        for alpha in alphas:
            alpha = float(alpha)
            theta = {}
            for k, ref in reference.items():
                a, b = state_a[k].to(ref.device), state_b[k].to(ref.device)
                theta[k] = (1 - alpha) * a + alpha * b if ref.is_floating_point() else a
            target.load_state_dict(theta)
            loss, acc = evaluate(target, loader, loss_fn, device)
            results.append({"alpha": alpha, "loss": loss, "accuracy": acc})
    finally:
        if original is not None:
            target.load_state_dict(original)
        _restore_flags(saved)
    return results


# ---------------------------------------------------------------------------------------------- callback
class GradientFlow(Callback):
    """Logs the masked gradient norm on a fixed ``batch`` during :func:`graspext.train` (Evci et al., AAAI 2022).

    Every ``every`` steps, before the step, it appends ``{"step", "total", "layers": {name: norm}}`` to
    ``history``, with the masks the trainer trains at that moment. With dynamic sparse training
    (``dst=graspext.dst.RigL(...)`` or ``SET``) it also appends ``{"step", "before", "after", "change"}`` to
    ``mask_updates`` for each update step: the total norm just before and just after the masks moved. RigL's
    update replaces the optimizer step, so "before" is the state at the step's start and "after" at its end. SET's
    follows the step: "before" is taken after the step and "after" when the next step starts (or at the epoch's
    end), where this callback runs before the dst one, as with ``dst=``; listed after it, "before" is the state
    at the step's start.

    Each epoch record gets ``grad_flow_total`` (the last logged total). With ``out_dir`` set it writes
    ``gradient_flow.jsonl`` at every epoch's end. Its state is saved with the trainer's checkpoints. The norm is
    computed in train mode, as the step sees the model; a non-finite loss is logged as NaN rather than stopping
    the run.
    """

    def __init__(self, batch, every: int = 100, loss_fn: Callable = F.cross_entropy):
        _check_batch(batch)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.batch, self.every, self.loss_fn = tuple(batch), int(every), loss_fn
        self.history: list[dict[str, Any]] = []
        self.mask_updates: list[dict[str, Any]] = []
        self._on_device = None
        self._dst = None
        self._dst_after_me = True
        self._pending: dict[str, Any] | None = None  # an update whose "before" is known, "after" not yet
        self._start: dict[str, float] | None = None  # this step's norms at its start, if computed

    # ------------------------------------------------------------------ measuring
    def _measure(self, trainer) -> dict[str, float]:
        model = trainer.model
        if self._on_device is None or self._on_device[0].device != trainer.device:
            self._on_device = tuple(t.to(trainer.device) for t in self.batch)
        masks = None if trainer.sparse_layers else trainer.current_masks()
        modes = [(m, m.training) for m in model.modules()]
        model.train()  # as the training step sees it, also when measured after the test epoch
        try:
            return _norms(model, masks, self._on_device, self.loss_fn, check_finite=False)
        finally:
            for m, mode in modes:
                m.training = mode

    def _finish_update(self, after: float) -> None:
        record = self._pending
        record["after"] = after
        record["change"] = after - record["before"]
        self.mask_updates.append(record)
        self._pending = None

    # ------------------------------------------------------------------ events
    def on_fit_start(self, trainer) -> None:
        from graspext.dst.callback import DynamicSparsityCallback

        self.history, self.mask_updates, self._pending, self._on_device = [], [], None, None
        dst = [cb for cb in trainer.callbacks if isinstance(cb, DynamicSparsityCallback)]
        self._dst = dst[0] if dst else None
        if self._dst is not None:
            self._dst_after_me = trainer.callbacks.index(self._dst) > trainer.callbacks.index(self)

    def _is_update(self, step: int) -> bool:
        return self._dst is not None and self._dst.schedule is not None and self._dst.schedule.is_update(step)

    def on_train_batch_start(self, trainer, inputs, targets) -> None:
        step = trainer.global_step
        self._start = None
        if self._pending is not None:  # SET's update at the previous step: the masks have moved since
            self._finish_update(self._measure(trainer)["total"])
        if step % self.every == 0:
            self._start = self._measure(trainer)
            self.history.append({"step": step, "total": self._start["total"],
                                 "layers": {k: v for k, v in self._start.items() if k != "total"}})
        if self._is_update(step):
            replaces = self._dst.config.update_replaces_step
            if replaces or not self._dst_after_me:
                # RigL: nothing changes the weights before the update. SET with the dst callback first: the
                # step's start is the last point seen before the update.
                before = (self._start or self._measure(trainer))["total"]
                self._pending = {"step": step, "before": before, "awaiting": "end"}
            else:
                self._pending = {"step": step, "awaiting": "before"}

    def on_train_batch_end(self, trainer, loss) -> None:
        if self._pending is None or self._pending["step"] != trainer.global_step:
            return
        if self._pending.pop("awaiting") == "end":  # the update has run (in on_after_backward, or before us)
            self._finish_update(self._measure(trainer)["total"])
        else:  # SET, the dst callback after us: after the optimizer step, before the update
            self._pending["before"] = self._measure(trainer)["total"]

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        if self._pending is not None and "before" in self._pending:  # SET's update at the epoch's last step
            self._finish_update(self._measure(trainer)["total"])
        record["grad_flow_total"] = self.history[-1]["total"] if self.history else None
        if trainer.config.out_dir:
            write_text(os.path.join(trainer.config.out_dir, GRADIENT_FLOW_JSONL), self.jsonl())

    def jsonl(self) -> str:
        """The log as JSON lines, by step: ``{"event": "norm", ...}`` and ``{"event": "mask_update", ...}``."""
        rows = [(r["step"], 0, {"event": "norm", **r}) for r in self.history]
        rows += [(r["step"], 1, {"event": "mask_update", **r}) for r in self.mask_updates]
        return "".join(json.dumps(r) + "\n" for _, _, r in sorted(rows, key=lambda t: t[:2]))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "history": copy.deepcopy(self.history),
                "mask_updates": copy.deepcopy(self.mask_updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("every") != self.every:
            raise ValueError(f"every: the checkpoint's gradient flow was logged every {state.get('every')} steps, "
                             f"this run every {self.every}; use the same, another out_dir, or resume=False")
        self.history = copy.deepcopy(state["history"])
        self.mask_updates = copy.deepcopy(state["mask_updates"])
        self._pending = None
