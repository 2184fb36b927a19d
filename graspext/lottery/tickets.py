"""The pieces of iterative magnitude pruning (IMP) and of its sanity checks, on :class:`graspext.Masks`.

- :func:`dense_masks`: the all-kept masks IMP starts from, over the prunable layers (Ma et al. leave ResNet's
  first convolution and the classifier dense: ``keep_first_dense`` / ``keep_last_dense``).
- :func:`prune_remaining`: one IMP round's pruning, exactly ``floor(rate * kept)`` of the kept weights by
  ``|w|``, over all layers together (global, Frankle & Carbin) or per layer; :func:`prune_to` prunes to a
  given count at once (one-shot magnitude pruning, OMP).
- :class:`RewindCapture`: a trainer callback that keeps the model's state after ``step`` training steps (late
  rewinding; step 0 is the initialisation, the lottery ticket's reset).
- :func:`rewind_`: resets a model to a captured state; the masks then zero the pruned positions, so the kept
  weights are the captured values bit for bit.
- :func:`random_masks_like`: the same per-layer counts at random positions (random pruning).
- :func:`reinitialized`: the same architecture with a fresh draw of the initialisation (random re-init, RR).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from graspext.callbacks import Callback
from graspext.masks import Masks
from graspext.pruning.layers import prunable_modules, weight_name
from graspext.pruning.selection import report_collapse, select_masks

SCOPES = ("global", "layerwise")
ON_COLLAPSE = ("raise", "warn", "ignore")


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < float(rate) < 1:
        raise ValueError(f"rate must be a fraction of the remaining weights in (0, 1), got {rate!r}")
    return float(rate)


def dense_masks(model: nn.Module, *, keep_first_dense: bool = False, keep_last_dense: bool = False,
                exclude=None) -> Masks:
    """All-True masks over the layers IMP prunes."""
    modules = prunable_modules(model, exclude=exclude, keep_first_dense=keep_first_dense,
                               keep_last_dense=keep_last_dense)
    return Masks({weight_name(n): torch.ones_like(m.weight, dtype=torch.bool) for n, m in modules.items()},
                 {"method": "dense", "sparsity": 0.0})


def prune_remaining(model: nn.Module, masks: Masks, rate: float, scope: str = "global",
                    on_collapse: str = "raise") -> Masks:
    """``masks`` less ``floor(rate * kept)`` of their kept weights, those of smallest ``|w|`` in ``model``.

    ``scope="global"`` ranks every layer's weights together; ``"layerwise"`` removes ``floor(rate * kept_l)`` in
    each layer. Pruned weights stay pruned. A layer left with no weight raises (``on_collapse="raise"``), warns or
    is ignored.
    """
    rate = check_rate(rate)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    kept = [int(m.sum()) for m in masks.values()]
    if scope == "global":
        return _magnitude_masks(model, masks, [sum(kept) - int(rate * sum(kept))], on_collapse, rate=rate)
    return _magnitude_masks(model, masks, [k - int(rate * k) for k in kept], on_collapse, rate=rate)


def prune_to(model: nn.Module, masks: Masks, num_kept: int, on_collapse: str = "raise") -> Masks:
    """``masks`` pruned by global ``|w|`` in ``model`` down to ``num_kept`` weights in all (one-shot magnitude
    pruning to a given count: OMP at the sparsity of an IMP round)."""
    if isinstance(num_kept, bool) or not isinstance(num_kept, numbers.Integral) or not 0 < num_kept <= masks.num_kept():
        raise ValueError(f"num_kept must be an int in (0, {masks.num_kept()}] (the kept weights), got {num_kept!r}")
    return _magnitude_masks(model, masks, [int(num_kept)], on_collapse)


@torch.no_grad()
def _magnitude_masks(model: nn.Module, masks: Masks, keep: list[int], on_collapse: str, rate: float | None = None
                     ) -> Masks:
    """Keeps the ``keep`` largest ``|w|`` among the kept weights: one count over all layers, or one per layer."""
    if on_collapse not in ON_COLLAPSE:
        raise ValueError(f"on_collapse must be one of {ON_COLLAPSE}, got {on_collapse!r}")
    masks.check_fits(model)
    params = dict(model.named_parameters())
    names = list(masks)
    # |w| >= 0 on kept weights; -1 on pruned ones, which therefore go first and never come back.
    scores = [params[n].detach().abs().float().masked_fill(~masks[n].to(params[n].device), -1.0) for n in names]
    sizes = [masks[n].numel() for n in names]
    if len(keep) == 1:
        new, new_kept = select_masks(scores, sum(sizes) - keep[0], remove_largest=False)
    else:
        new, new_kept = [], []
        for score, size, k in zip(scores, sizes, keep):
            mask, count = select_masks([score], size - k, remove_largest=False)
            new += mask
            new_kept += count
    collapsed = report_collapse(names, new_kept, on_collapse)
    meta = {**masks.meta, "method": "magnitude", "sparsity": 1 - sum(new_kept) / sum(sizes),
            "scope": "global" if len(keep) == 1 else "layerwise", "rate": rate, "collapsed_layers": collapsed}
    return Masks({n: m.to(masks[n].device) for n, m in zip(names, new)}, meta)


def random_masks_like(masks: Masks, seed: int) -> Masks:
    """Masks with each layer's kept count of ``masks`` at uniformly random positions (random pruning)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=gen)[: int(mask.sum())]] = True
        out[name] = flat.view(mask.shape).to(mask.device)
    return Masks(out, {**masks.meta, "method": "random_like", "seed": seed})


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state (parameters and buffers) under its state_dict keys."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind_(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Loads ``state`` (a :func:`state_copy`) into ``model``: parameters and buffers, BatchNorm statistics too."""
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"state: the rewind point lacks {sorted(missing)[:5]}; it belongs to another model")
    model.load_state_dict(state)
    return model


def reinitialized(make_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make_model()`` drawn under ``torch.manual_seed(seed)``, the global RNG restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model()


class RewindCapture(Callback):
    """Keeps the model's state after ``step`` training steps of a run (before step ``step`` trains).

    Step 0 is the state training starts from. The captured state travels in the trainer's checkpoints, so a run
    killed after the capture resumes with it.
    """

    def __init__(self, step: int):
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0 (training steps), got {step!r}")
        self.step = int(step)
        self.state: dict[str, Tensor] | None = None

    def on_fit_start(self, trainer) -> None:
        if trainer.total_steps is not None and self.step >= trainer.total_steps:
            raise ValueError(f"rewind step {self.step} lies beyond the training, whose steps are "
                             f"0..{trainer.total_steps - 1}")

    def on_train_batch_start(self, trainer, inputs, targets) -> None:
        if self.state is None and trainer.global_step == self.step:
            self.state = state_copy(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["step"] != self.step:
            raise ValueError(f"the checkpoint captured the rewind point at step {state['step']}, this run asks for "
                             f"step {self.step}")
        self.state = state["state"]
