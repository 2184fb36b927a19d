"""An independent plain-torch re-implementation of google-research/rigl's TF1 mask update, for tests.

It follows ``sparse_optimizers_base.py`` op by op on dense tensors: ``score_drop = |mask * w| + noise`` over every
position, a full descending sort (TF's ``top_k`` with ``k = n_total``: ties to the lower index), ``mask1`` from
the first ``n_keep``, grow scores of ``mask1`` lifted to ``min - 1``, a second full sort, ``mask2`` from the first
``n_prune``, ``new_connections = mask2 & ~mask`` (or ``mask2`` with ``reinit_when_same``), and momentum reset
there. ``masked_dense_rigl`` runs it in a masked dense training loop (TF1 RigL: no optimizer step on update
iterations), as the official code trains: dense weights multiplied by their masks.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cosine_drop_fraction_official(global_step: int, initial: float, begin_step: int, end_step: int) -> float:
    """TF's ``cosine_decay(initial, global_step, end_step - begin_step)`` (alpha 0), in float32 as TF runs it."""
    decay_steps = torch.tensor(float(end_step - begin_step), dtype=torch.float32)
    step = torch.minimum(torch.tensor(float(global_step), dtype=torch.float32), decay_steps)
    decayed = 0.5 * (1.0 + torch.cos(torch.tensor(math.pi, dtype=torch.float32) * step / decay_steps))
    return float(torch.tensor(initial, dtype=torch.float32) * decayed)


def is_mask_update_iter_official(global_step: int, last_update_step: int, begin_step: int, end_step: int,
                                 frequency: int) -> bool:
    in_range = global_step >= begin_step and (global_step <= end_step or end_step < 0)
    return in_range and last_update_step + frequency <= global_step


def _sorted_desc(score: Tensor) -> Tensor:
    return torch.sort(score, descending=True, stable=True).indices


def get_update_op_official(score_drop: Tensor, score_grow: Tensor, mask: Tensor, weights: Tensor,
                           drop_fraction: float, grow_tensor: Tensor, reinit_when_same: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """``(new_mask, new_weights, new_connections)``, as ``_get_update_op``; masks are float 0/1 as in TF."""
    mask = mask.to(torch.float32)
    n_total = score_drop.numel()
    n_ones = int(mask.sum())
    n_prune = int(torch.tensor(float(n_ones), dtype=torch.float32) * torch.tensor(drop_fraction, dtype=torch.float32))
    n_keep = n_ones - n_prune
    order = _sorted_desc(score_drop.reshape(-1))
    mask1 = torch.zeros(n_total)
    mask1[order] = (torch.arange(n_total) < n_keep).float()
    score_grow = score_grow.reshape(-1)
    lifted = torch.where(mask1 == 1, torch.ones_like(score_grow) * (score_grow.min() - 1), score_grow)
    order = _sorted_desc(lifted)
    mask2 = torch.zeros(n_total)
    mask2[order] = (torch.arange(n_total) < n_prune).float()
    assert float((mask1 * mask2).sum()) == 0.0, "masks must be disjoint"
    mask2 = mask2.view(mask.shape)
    if reinit_when_same:
        new_connections = mask2 == 1
    else:
        new_connections = (mask2 == 1) & (mask == 0)
    new_weights = torch.where(new_connections, grow_tensor, weights)
    return (mask1.view(mask.shape) + mask2).bool(), new_weights, new_connections


def rigl_mask_update_official(mask: Tensor, weights: Tensor, masked_grad: Tensor, drop_fraction: float,
                              noise: Tensor | None = None, reinit_when_same: bool = False):
    """``SparseRigLOptimizerBase.generic_mask_update`` with ``grow_init='zeros'``."""
    score_drop = (mask.to(weights.dtype) * weights).abs()
    if noise is not None:
        score_drop = score_drop + noise
    return get_update_op_official(score_drop, masked_grad.abs(), mask, weights, drop_fraction,
                                  torch.zeros_like(weights), reinit_when_same)


def set_mask_update_official(mask: Tensor, weights: Tensor, uniform: Tensor, drop_fraction: float,
                             noise: Tensor | None = None):
    """``SparseSETOptimizerBase.generic_mask_update`` with ``grow_init='zeros'`` (``uniform``: its random scores)."""
    score_drop = (mask.to(weights.dtype) * weights).abs()
    if noise is not None:
        score_drop = score_drop + noise
    return get_update_op_official(score_drop, uniform, mask, weights, drop_fraction, torch.zeros_like(weights))


def masked_dense_rigl(model: nn.Module, masks: dict[str, Tensor], epochs_of_batches, lrs: list[float], *,
                      frequency: int, end_step: int, drop_fraction: float = 0.3, momentum: float = 0.9,
                      weight_decay: float = 0.0, noise_fn=None) -> tuple[nn.Module, dict[str, Tensor], list[int]]:
    """TF1 RigL on a masked dense model: returns the trained model, the final masks and the update steps.

    ``epochs_of_batches``: per epoch, its list of ``(x, y)``; ``lrs``: the learning rate of each epoch;
    ``noise_fn(name, step, mask)``: the drop step's tie-break noise (None: none). Every batch is one step (TF1 RigL does
    not advance its global step on update iterations; graspext counts every batch).
    """
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    masks = {n: m.clone().bool() for n, m in masks.items()}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    buffers = {n: torch.zeros_like(p) for n, p in params.items()}
    started = {n: False for n in params}
    last_update, step, updates = -frequency, 0, []
    for lr, batches in zip(lrs, epochs_of_batches):
        model.train()
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)  # float64 logits stay float64, as in the trainer
            loss.backward()  # the weights are exactly zero off the masks: these are the masked-weight gradients
            if is_mask_update_iter_official(step, last_update, 0, end_step, frequency):
                fraction = cosine_drop_fraction_official(step, drop_fraction, 0, end_step)
                with torch.no_grad():
                    for n, m in masks.items():
                        p = params[n]
                        noise = noise_fn(n, step, m) if noise_fn is not None else None
                        new_mask, new_weights, new_conn = rigl_mask_update_official(m, p, p.grad, fraction, noise)
                        buffers[n] = torch.where(new_conn, torch.zeros_like(buffers[n]), buffers[n])
                        # graspext keeps no state off the mask: the official decaying momentum there never
                        # reaches a weight that stays masked, and a regrown one restarts from zero either way.
                        buffers[n] = buffers[n] * new_mask
                        p.copy_(new_weights * new_mask)
                        masks[n] = new_mask
                last_update = step
                updates.append(step)
            else:
                with torch.no_grad():
                    for n, p in params.items():
                        if p.grad is None:
                            continue
                        d = p.grad + weight_decay * p
                        if n in masks:
                            d = d * masks[n]
                        buffers[n] = d.clone() if not started[n] else buffers[n] * momentum + d
                        started[n] = True
                        p.sub_(lr * buffers[n])
            step += 1
    return model, masks, updates
