"""One mask update of one layer: drop the weakest active weights, grow as many elsewhere.

The rule of google-research/rigl (``SparseSETOptimizerBase._get_update_op``), on a layer's dense-shaped tensors:

- **drop:** keep the ``n_active - n_drop`` active weights with the largest ``|w| + noise`` (TF adds N(0, 1e-5)
  noise as a tie-break);
- **grow:** among the positions the drop step did not keep -- just-dropped ones included -- take the ``n_drop``
  with the largest grow score (RigL: ``|dL/dW|``; SET: uniform random numbers);
- ties go to the lower flat index, as TF's ``top_k`` breaks them.

Deviation, on purpose: the official drop step ranks every position, inactive ones scoring their noise alone, so an
active weight within noise of zero can lose its place to an inactive position (whose stale value TF revives).
Here only active weights compete for the kept places; with weights above the noise the two agree.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def top_k_first_index(score: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``score``; among equal scores the lower index wins.

    ``torch.topk`` does not promise an order among ties; this picks the same set as a stable sort would, at
    ``topk``'s cost.
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=score.device)
    if k >= score.numel():
        return torch.arange(score.numel(), device=score.device)
    kth = torch.topk(score, k, sorted=False).values.min()
    above = (score > kth).nonzero().flatten()
    ties = (score == kth).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, ties])


def drop_and_grow(mask: Tensor, weight: Tensor, grow_score: Tensor, n_drop: int,
                  drop_noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(new_mask, grown)`` for one layer; ``grown`` marks the positions the grow step chose.

    ``mask``, ``weight`` and ``grow_score`` have the weight's shape; ``drop_noise`` has one entry per active
    weight, in flat-index order. The kept count is unchanged: ``n_drop`` go, ``n_drop`` come.
    """
    flat_mask = mask.reshape(-1)
    active = flat_mask.nonzero().flatten()
    if not 0 <= n_drop <= active.numel():
        raise ValueError(f"n_drop must be in [0, {active.numel()}] (the active weights), got {n_drop}")
    drop_score = weight.detach().reshape(-1)[active].abs()
    if drop_noise is not None:
        if drop_noise.numel() != active.numel():
            raise ValueError(f"drop_noise must have one entry per active weight ({active.numel()}), "
                             f"got {drop_noise.numel()}")
        drop_score = drop_score + drop_noise.reshape(-1).to(device=drop_score.device, dtype=drop_score.dtype)
    kept_after_drop = torch.zeros_like(flat_mask)
    kept_after_drop[active[top_k_first_index(drop_score, active.numel() - n_drop)]] = True

    score = grow_score.detach().reshape(-1)
    if not bool(torch.isfinite(score).all()):
        raise FloatingPointError("the grow scores (RigL: the dense gradient) hold NaN or infinity; the training "
                                 "has diverged, so no mask update can rank connections")
    score = score.masked_fill(kept_after_drop, float("-inf"))  # TF lifts them to min - 1: never chosen
    grown = torch.zeros_like(flat_mask)
    grown[top_k_first_index(score, n_drop)] = True
    return (kept_after_drop | grown).view(mask.shape), grown.view(mask.shape)


def stateless_generator(*key) -> torch.Generator:
    """A CPU generator seeded by ``key`` alone (as TF's stateless ops are by (seed, step)): a resumed run draws
    the same numbers without saving any RNG state."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return gen
